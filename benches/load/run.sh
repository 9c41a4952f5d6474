#!/usr/bin/env bash
# The load harness: erpgate (full stack, cache off) against nginx as a plain reverse proxy, both
# in front of the same fast upstream, driven by identical wrk load in alternating rounds; plus
# the upstream direct (the limit), erpgate serving cache hits, p99 at half of erpgate's
# saturating rate, idle RSS, and RSS while holding 10,000 idle keep-alive connections.
#
#   benches/load/run.sh                 # 10 s runs, 64 connections, 3 rounds (A B A B A B)
#   DURATION=20 CONNECTIONS=128 ROUNDS=5 benches/load/run.sh
#
# Installs wrk and nginx (Debian) when missing; builds erpgate in release mode; everything
# listens on 127.0.0.1 and stops by itself. Prints a Markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq wrk nginx >/dev/null
fi
cargo build --release --locked --bin erpgate
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 benches/load/harness.py
