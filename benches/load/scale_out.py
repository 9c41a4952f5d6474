"""Scale-out figures (issue 10): the full stack with quotas in Redis against local quotas, Redis
round trips per request, and the quota overshoot with two replicas. See scale_out.sh.
Standard library only; reuses harness.py."""

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from harness import (BODY, CONNECTIONS, DURATION, PATH, ROUNDS, TICKS, cpu_ticks, erpgate_conf,
                     measure, nginx_conf, stop, wait_port, wrk)

UPSTREAM, COUNTED_UPSTREAM = 18181, 18182
LOCAL, SHARED, REPLICA_A, REPLICA_B, ALONE_A, ALONE_B = 18183, 18184, 18185, 18186, 18187, 18188
BATCHED, BATCHED_A, BATCHED_B = 18189, 18190, 18191
ADMIN = {port: port + 1000 for port in (LOCAL, SHARED, REPLICA_A, REPLICA_B, ALONE_A, ALONE_B,
                                        BATCHED, BATCHED_A, BATCHED_B)}
QUOTA_BATCH = int(os.environ.get("QUOTA_BATCH", "50"))
QUOTA_RATE = int(os.environ.get("QUOTA_RATE", "100"))
QUOTA_SECONDS = int(os.environ.get("QUOTA_SECONDS", "5"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_calls(port):
    """Round trips Redis has answered: script calls (EVALSHA, EVAL) and the health probe's
    PING; commands a script runs inside Redis (TIME, GET, SET) are no round trips."""
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    calls = {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\w+):calls=(\d+)", out)}
    return sum(calls.get(c, 0) for c in ("evalsha", "eval", "ping", "publish"))


def gateway_redis_commands(admin):
    """erpgate's own count of Redis commands (erpgate_redis_command_duration_seconds_count)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    return sum(float(m.group(1)) for m in
               re.finditer(r"^erpgate_redis_command_duration_seconds_count\{[^}]*\} ([\d.e+]+)$", text, re.M))


def counted(log):
    with open(log) as f:
        return sum(1 for _ in f)


def both(ports, seconds):
    """wrk on every port at once for `seconds`; requests that passed, requests refused."""
    procs = [subprocess.Popen([sys.executable, "-c", f"""
import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
from harness import wrk
print(json.dumps(wrk({port}, {PATH!r}, duration={seconds}, connections=16, refusals_expected=True)))
"""], stdout=subprocess.PIPE, text=True) for port in ports]
    import json
    results = [json.loads(p.communicate()[0]) for p in procs]
    passed = sum(r["requests"] - r["refused"] for r in results)
    return passed, sum(r["refused"] for r in results)


def main():
    work = tempfile.mkdtemp(prefix="erpgate-scale-out-")
    log = os.path.join(work, "upstream-counted.log")
    procs = []

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        redis_port = free_port()
        redis = start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no", "--dir", work])
        upstream = start(["nginx", "-p", work, "-c", nginx_conf(work, "upstream", f"""
  server {{
    listen 127.0.0.1:{UPSTREAM} backlog=4096;
    location / {{ default_type application/json; return 200 '{BODY}'; }}
  }}
  server {{
    listen 127.0.0.1:{COUNTED_UPSTREAM} backlog=4096;
    access_log {log};
    location / {{ default_type application/json; return 200 '{BODY}'; }}
  }}""")])
        shared = f"shared_state: {{ redis: {{ url: 'redis://127.0.0.1:{redis_port}/0' }} }}\n"
        # Each pair of replicas under a prefix of its own, so no phase inherits another's state.
        batched = shared.replace("{ redis:", f"{{ quota_batch: {QUOTA_BATCH}, redis:").replace(
            "/0' }", "/0', key_prefix: 'batched:' }")
        quota = f"    rate_limit: {{ per_second: {QUOTA_RATE}, burst: {QUOTA_RATE} }}\n"

        def gateway(name, port, top="", client="", upstream_port=UPSTREAM):
            return start(["target/release/erpgate", "run", "--config",
                          erpgate_conf(work, name, port, ADMIN[port], False, upstream=upstream_port,
                                       top=top, client=client)])

        local = gateway("local", LOCAL)
        shared_gate = gateway("shared", SHARED, top=shared)
        batched_gate = gateway("batched", BATCHED, top=batched)
        gateway("batched-a", BATCHED_A, top=batched, client=quota, upstream_port=COUNTED_UPSTREAM)
        gateway("batched-b", BATCHED_B, top=batched, client=quota, upstream_port=COUNTED_UPSTREAM)
        gateway("replica-a", REPLICA_A, top=shared, client=quota, upstream_port=COUNTED_UPSTREAM)
        gateway("replica-b", REPLICA_B, top=shared, client=quota, upstream_port=COUNTED_UPSTREAM)
        gateway("alone-a", ALONE_A, client=quota, upstream_port=COUNTED_UPSTREAM)
        gateway("alone-b", ALONE_B, client=quota, upstream_port=COUNTED_UPSTREAM)
        for port in (redis_port, UPSTREAM, COUNTED_UPSTREAM, *ADMIN):
            wait_port(port)
        time.sleep(1)  # the replicas' first Redis probe
        for port in (UPSTREAM, LOCAL, SHARED, BATCHED):
            wrk(port, PATH, duration=2)

        # 1. Throughput and CPU: the same stack with quotas local and in Redis, alternating.
        targets = [("local quotas", LOCAL, local), ("shared quotas", SHARED, shared_gate),
                   (f"shared, quota_batch {QUOTA_BATCH}", BATCHED, batched_gate)]
        runs = {name: [] for name, _, _ in targets}
        redis_cpu = {name: [] for name, _, _ in targets[1:]}
        trips_redis = {name: [] for name, _, _ in targets[1:]}
        trips_gate = {name: [] for name, _, _ in targets[1:]}
        for r in range(ROUNDS):
            print(f"round {r + 1}/{ROUNDS}", file=sys.stderr)
            for name, port, proc in (targets if r % 2 == 0 else targets[::-1]):
                ticks, calls, ours = cpu_ticks([redis.pid]), redis_calls(redis_port), gateway_redis_commands(ADMIN[port])
                result = measure(name, port, [proc.pid])
                runs[name].append(result)
                if name in redis_cpu:
                    redis_cpu[name].append((cpu_ticks([redis.pid]) - ticks) / TICKS / result["requests"] * 10000)
                    trips_redis[name].append((redis_calls(redis_port) - calls) / result["requests"])
                    trips_gate[name].append((gateway_redis_commands(ADMIN[port]) - ours) / result["requests"])

        def med(name, key):
            return statistics.median(run[key] for run in runs[name])

        # 2. Overshoot: two replicas, one client quota, load on both at once; what reached the
        # upstream, against what the quota allows in that time (burst + rate × seconds).
        allowed = QUOTA_RATE + QUOTA_RATE * QUOTA_SECONDS
        overshoot = {}
        for label, ports in (("shared (Redis up)", (REPLICA_A, REPLICA_B)),
                             (f"shared, quota_batch {QUOTA_BATCH} (batches of {max(1, min(QUOTA_BATCH, QUOTA_RATE // 20))})",
                              (BATCHED_A, BATCHED_B)),
                             ("local (no shared_state)", (ALONE_A, ALONE_B))):
            before = counted(log)
            passed, refused = both(ports, QUOTA_SECONDS)
            overshoot[label] = (passed, counted(log) - before, refused)
            time.sleep(2)  # the quotas refill
        redis.kill()
        redis.wait()
        time.sleep(1)  # the replicas notice at their next command or probe
        before = counted(log)
        passed, refused = both((REPLICA_A, REPLICA_B), QUOTA_SECONDS)
        overshoot["shared, Redis killed (fallback)"] = (passed, counted(log) - before, refused)

        print()
        print(f"Median of {ROUNDS} alternating rounds; wrk 2 threads, {CONNECTIONS} connections, "
              f"{DURATION} s each; {os.cpu_count()} CPUs; a local redis-server 7 on 127.0.0.1.")
        print()
        print("| target | req/s | p50 ms | p99 ms | CPU s per 10k req (erpgate) | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for name, _, _ in targets:
            print(f"| {name} | {med(name, 'rps'):.0f} | {med(name, 'p50'):.2f} | {med(name, 'p99'):.2f} | "
                  f"{med(name, 'cpu_per_10k'):.3f} | {max(r['rss_peak_mib'] for r in runs[name]):.1f} |")
        print()
        print("| ratio | value | target |")
        print("|---|---|---|")
        for name in redis_cpu:
            print(f"| {name} ÷ local quotas req/s | {med(name, 'rps') / med('local quotas', 'rps'):.2f} | ≥ 0.8 |")
            print(f"| {name} ÷ local quotas CPU per request (erpgate) | "
                  f"{med(name, 'cpu_per_10k') / med('local quotas', 'cpu_per_10k'):.2f} | |")
            print(f"| {name}: Redis CPU per request ÷ erpgate's | "
                  f"{statistics.median(redis_cpu[name]) / med(name, 'cpu_per_10k'):.2f} | |")
            print(f"| {name}: Redis round trips per request, counted by Redis | "
                  f"{statistics.median(trips_redis[name]):.3f} | ≤ 1 |")
            print(f"| {name}: Redis round trips per request, counted by erpgate | "
                  f"{statistics.median(trips_gate[name]):.3f} | ≤ 1 |")
        print()
        print(f"Quota {QUOTA_RATE}/s, burst {QUOTA_RATE}, for one client on two replicas, both loaded "
              f"for {QUOTA_SECONDS} s: the quota allows {allowed}.")
        print()
        print("| quotas | passed (client) | reached the upstream | refused 429 | reached ÷ allowed |")
        print("|---|---|---|---|---|")
        for label, (passed, reached, refused) in overshoot.items():
            print(f"| {label} | {passed} | {reached} | {refused} | {reached / allowed:.2f} |")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
