#!/usr/bin/env bash
# The load harness: erpgate (full stack, cache off) against its peers, all in front of the same
# fast upstream (nginx `return 200`), driven by identical wrk load in alternating rounds:
#
#   direct             the upstream itself (the limit)
#   nginx              nginx as a plain reverse proxy (proxy_pass, upstream keep-alive)
#   haproxy            HAProxy doing erpgate's job: key id -> hex SHA-256 map, sha2(256) of the
#                      presented secret compared with secure_memcmp (401), a per-client
#                      stick-table rate (never triggers), the path rule (403), the header swap,
#                      http-reuse always, nbthread = CPUs
#   nginx-lua          nginx + Lua (benches/load/nginx_peer.lua, access_by_lua_block) doing the
#                      same: SHA-256 by LuaJIT FFI to libcrypto, limit_req per key id, path rule,
#                      proxy_set_header swap
#   erpgate            the full stack (auth, access rules, quota too high to trigger, breaker,
#                      retries, metrics), cache off
#   erpgate-cache      the same serving cache hits            } first connection count,
#   erpgate-unbuffered the same with buffering off            } access log off only
#
# Each proxy runs twice, as separate processes: access log off (erpgate `log.level: error`,
# nginx `access_log off`, HAProxy without `log`) and on (erpgate JSON lines at `info` on stdout
# into a file, as a container runtime collects it; nginx `access_log <file> combined
# buffer=64k flush=1s`; HAProxy `option httplog` to `log stdout` into a file). Every round set
# runs at each connection count. Before measuring, a smoke check per target: a good token gets
# 200; for erpgate, HAProxy and nginx-lua also a wrong secret / unknown key id / non-token 401,
# a path outside the rules 403. Then p99 at half of erpgate's saturating rate, idle RSS, RSS
# under a flood of slow webhook bodies, and RSS holding 10,000 idle keep-alive connections.
# Prints Markdown tables for BENCHMARKS.md: one per connection count and log mode, with
# erpgate ÷ nginx / HAProxy / nginx-lua ratios (req/s, CPU per request), log on ÷ off, the
# access log lines per request, and the extra rows.
#
#   benches/load/run.sh                 # 10 s runs, 3 rounds, at 64 and 256 connections
#   DURATION=20 ROUNDS=5 CONNECTION_COUNTS="64 128 256" benches/load/run.sh
#   DURATION=3 ROUNDS=1 TARGETS=erpgate,nginx,haproxy LOG_MODES=off CONNECTION_COUNTS=64 \
#     IDLE_CONNECTIONS=0 WEBHOOK_FLOOD=0 benches/load/run.sh      # a quick look
#
# Environment: DURATION (s per wrk run, 10), ROUNDS (3), CONNECTION_COUNTS ("64 256"; the older
# CONNECTIONS=N alone means just N), TARGETS (comma-separated names above, default all),
# LOG_MODES ("off on"), IDLE_CONNECTIONS (10000; 0 skips), WEBHOOK_FLOOD (1000; 0 skips).
#
# Installs from Debian when missing: wrk, nginx, haproxy, and nginx-extras when nginx has no
# Lua module (on Debian 12 nginx-extras is the same /usr/sbin/nginx plus dynamic modules, which
# only the nginx-lua config loads; lua-resty-core comes with it). Builds erpgate in release
# mode; everything listens on 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx)
command -v haproxy >/dev/null || missing+=(haproxy)
if ! { nginx -V 2>&1 | grep -qi lua; } && [ ! -e /usr/lib/nginx/modules/ngx_http_lua_module.so ]; then
  missing+=(nginx-extras)
fi
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --locked --bin erpgate
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 benches/load/harness.py
