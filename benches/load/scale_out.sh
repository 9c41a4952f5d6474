#!/usr/bin/env bash
# Scale-out figures: the full stack with its quotas in Redis against the same stack with local
# quotas (alternating wrk rounds), Redis round trips per request (counted by Redis and by
# erpgate), and the quota overshoot with two replicas: shared, local, and with Redis killed.
#
#   benches/load/scale_out.sh
#   DURATION=10 ROUNDS=5 QUOTA_RATE=100 QUOTA_SECONDS=5 benches/load/scale_out.sh
#
# Installs wrk, nginx and redis-server (Debian) when missing; builds erpgate in release mode;
# everything listens on 127.0.0.1 and stops by itself. Prints Markdown tables for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v redis-server >/dev/null; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq wrk nginx redis-server >/dev/null
  as_root service redis-server stop >/dev/null 2>&1 || true
fi
cargo build --release --locked --bin erpgate
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 benches/load/scale_out.py
