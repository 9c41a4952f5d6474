"""Drives the load comparison; see run.sh. Standard library only."""

import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

DURATION = int(os.environ.get("DURATION", "10"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "64"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
IDLE_CONNECTIONS = int(os.environ.get("IDLE_CONNECTIONS", "10000"))
THREADS = 2
TICKS = os.sysconf("SC_CLK_TCK")

UPSTREAM, NGINX, ERPGATE, ERPGATE_CACHE, ERPGATE_STREAM = 18081, 18082, 18083, 18084, 18085
ADMIN, ADMIN_CACHE, ADMIN_STREAM = 19083, 19084, 19085
WEBHOOK_FLOOD = int(os.environ.get("WEBHOOK_FLOOD", "1000"))
SECRET = "load-test-client-secret"
TOKEN = f"token ek_load:{SECRET}"
PATH = "/api/resource/ToDo?limit=20"

BODY = json.dumps({"data": [{"name": f"TODO-{i:04}", "status": "Open", "owner": "sync@example.com"}
                            for i in range(16)]})
assert 900 < len(BODY) < 1300, len(BODY)


def nginx_conf(work, name, server_block):
    conf = f"""
worker_processes auto;
pid {work}/{name}.pid;
error_log {work}/{name}.error.log error;
daemon off;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {work}/{name}-body;
  proxy_temp_path {work}/{name}-proxy;
  fastcgi_temp_path {work}/{name}-fastcgi;
  uwsgi_temp_path {work}/{name}-uwsgi;
  scgi_temp_path {work}/{name}-scgi;
  keepalive_requests 1000000;
  {server_block}
}}
"""
    path = os.path.join(work, f"{name}.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def erpgate_conf(work, name, port, admin, cache, buffering=True, upstream=UPSTREAM, top="", client=""):
    """An erpgate config: `top` is added at the top level, `client` to the load client."""
    secret_hash = hashlib.sha256(SECRET.encode()).hexdigest()
    rules = "cache:\n  rules:\n    - { doctype: ToDo, ttl: 3600s }\n" if cache else ""
    if not buffering:
        rules += "buffering: { requests: false, responses: false }\n"
    webhook = "\n    webhook: { secret: load-webhook-secret }" if cache else ""
    conf = f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
log: {{ format: json, level: error }}
max_in_flight: 100000
rate_limit: {{ per_second: 100000000, burst: 100000000 }}
limits: {{ max_connections: 30000 }}
sites:
  erp:
    backends: [http://127.0.0.1:{upstream}]
    site_name: erp.localhost
    service_accounts:
      sync: {{ api_key: load-key, api_secret: load-secret }}
    breaker: {{ consecutive_failures: 5 }}
    retry: {{ max_retries: 2 }}{webhook}
clients:
  load:
    key_id: ek_load
    secret_sha256: "{secret_hash}"
    site: erp
    service_account: sync
    allow:
      resources: {{ ToDo: [read, write], Item: [read] }}
      methods: [frappe.client.get_list, frappe.client.get_count]
{client}{rules}{top}"""
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(conf)
    return path


def stop(procs):
    """Terminates what is still running, then kills what does not exit within 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def pids_of(root):
    """The process and its children (nginx workers)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(root)], capture_output=True, text=True)
    return [root] + [int(p) for p in out.stdout.split()]


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def rss_kib(pids, field="VmRSS"):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
    return total


def wrk(port, path, extra=(), headers=True, duration=DURATION, connections=CONNECTIONS,
        refusals_expected=False):
    cmd = ["wrk", "-t", str(THREADS), "-c", str(connections), "-d", f"{duration}s", "--latency"]
    if headers:
        cmd += ["-H", f"Authorization: {TOKEN}"]
    cmd += list(extra) + [f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {"refused": int(bad.group(1)) if bad else 0}
    if bad and not refusals_expected:
        sys.exit(f"{bad.group(1)} failed responses from port {port}:\n{out}")

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    result.update(rps=rps, requests=total, p50=pct(50), p99=pct(99))
    return result


def measure(name, port, pids, path=PATH):
    before = cpu_ticks(pids)
    result = wrk(port, path)
    used = (cpu_ticks(pids) - before) / TICKS
    result["cpu_per_10k"] = used / result["requests"] * 10000
    result["rss_peak_mib"] = rss_kib(pids, "VmHWM") / 1024
    print(f"  {name:<16} {result['rps']:>10.0f} req/s  p50 {result['p50']:.2f} ms  "
          f"p99 {result['p99']:.2f} ms  cpu/10k {result['cpu_per_10k']:.3f} s", file=sys.stderr)
    return result


def hold_idle_connections(port, count):
    """Opens `count` keep-alive connections, one request on each, and leaves them idle."""
    conns = []
    request = (f"GET /api/method/ping HTTP/1.1\r\nHost: erp\r\nAuthorization: {TOKEN}\r\n\r\n").encode()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        conns.append(s)
    for s in conns:
        s.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
    return conns


def webhook_flood(port, pid, count):
    """RSS of the gateway before, during and after `count` strangers each start a 60 kB webhook
    body and send one byte (the endpoint needs no key)."""
    before = rss_kib([pid]) / 1024
    head = ("POST /_erpgate/webhooks/frappe/erp HTTP/1.1\r\nHost: erp\r\n"
            "Content-Type: application/json\r\nX-Frappe-Webhook-Signature: c2ln\r\n"
            "Content-Length: 60000\r\n\r\n{").encode()
    conns = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        conns.append(s)
    time.sleep(1)
    during = rss_kib([pid]) / 1024
    time.sleep(6)  # past the 5 s read deadline
    for s in conns:
        s.close()
    time.sleep(1)
    after = rss_kib([pid]) / 1024
    return before, during, after


def main():
    work = tempfile.mkdtemp(prefix="erpgate-load-")
    procs = []
    try:
        up_conf = nginx_conf(work, "upstream", f"""
  server {{
    listen 127.0.0.1:{UPSTREAM} backlog=4096;
    location / {{ default_type application/json; return 200 '{BODY}'; }}
  }}""")
        proxy_conf = nginx_conf(work, "proxy", f"""
  upstream frappe {{ server 127.0.0.1:{UPSTREAM}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{NGINX} backlog=4096;
    location / {{
      proxy_pass http://frappe;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host erp.localhost;
    }}
  }}""")
        upstream = subprocess.Popen(["nginx", "-c", up_conf, "-p", work])
        procs.append(upstream)
        nginx = subprocess.Popen(["nginx", "-c", proxy_conf, "-p", work])
        procs.append(nginx)
        gate = subprocess.Popen(["target/release/erpgate", "run", "--config",
                                 erpgate_conf(work, "erpgate", ERPGATE, ADMIN, False)],
                                stdout=subprocess.DEVNULL)
        procs.append(gate)
        gate_cache = subprocess.Popen(["target/release/erpgate", "run", "--config",
                                       erpgate_conf(work, "erpgate-cache", ERPGATE_CACHE, ADMIN_CACHE, True)],
                                      stdout=subprocess.DEVNULL)
        procs.append(gate_cache)
        gate_stream = subprocess.Popen(["target/release/erpgate", "run", "--config",
                                        erpgate_conf(work, "erpgate-stream", ERPGATE_STREAM, ADMIN_STREAM,
                                                     False, buffering=False)],
                                       stdout=subprocess.DEVNULL)
        procs.append(gate_stream)
        for port in (UPSTREAM, NGINX, ERPGATE, ERPGATE_CACHE, ERPGATE_STREAM):
            wait_port(port)
        time.sleep(0.5)
        idle_rss = rss_kib([gate.pid]) / 1024

        # Warm-up: pools, caches, page faults.
        for port in (UPSTREAM, NGINX, ERPGATE, ERPGATE_CACHE, ERPGATE_STREAM):
            wrk(port, PATH, duration=2)

        targets = [("direct", UPSTREAM, pids_of(upstream.pid)),
                   ("nginx", NGINX, pids_of(nginx.pid)),
                   ("erpgate", ERPGATE, [gate.pid]),
                   ("erpgate cache", ERPGATE_CACHE, [gate_cache.pid]),
                   ("erpgate unbuffered", ERPGATE_STREAM, [gate_stream.pid])]
        runs = {name: [] for name, _, _ in targets}
        for r in range(ROUNDS):
            print(f"round {r + 1}/{ROUNDS}", file=sys.stderr)
            # Alternate the order each round to cancel drift.
            order = targets if r % 2 == 0 else list(reversed(targets))
            for name, port, pids in order:
                runs[name].append(measure(name, port, pids))

        def med(name, key):
            return statistics.median(run[key] for run in runs[name])

        # p99 at half of erpgate's saturating rate: wrk's per-connection delay paces the load.
        half = med("erpgate", "rps") / 2
        delay_ms = CONNECTIONS * 1000 / half
        script = os.path.join(work, "pace.lua")
        with open(script, "w") as f:
            f.write(f"function delay() return {delay_ms:.3f} end\n")
        paced = {}
        for name, port in (("direct", UPSTREAM), ("erpgate", ERPGATE), ("direct", UPSTREAM), ("erpgate", ERPGATE)):
            paced.setdefault(name, []).append(wrk(port, PATH, extra=["-s", script]))

        flood = webhook_flood(ERPGATE_CACHE, gate_cache.pid, WEBHOOK_FLOOD)

        conns = hold_idle_connections(ERPGATE, IDLE_CONNECTIONS)
        time.sleep(1)
        rss_10k = rss_kib([gate.pid]) / 1024
        for s in conns:
            s.close()

        print()
        print(f"Median of {ROUNDS} alternating rounds; wrk {THREADS} threads, {CONNECTIONS} connections, "
              f"{DURATION} s each; {os.cpu_count()} CPUs; response {len(BODY)} bytes.")
        print()
        print("| target | req/s | p50 ms | p99 ms | CPU s per 10k req (proxy) | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for name, _, _ in targets:
            print(f"| {name} | {med(name, 'rps'):.0f} | {med(name, 'p50'):.2f} | {med(name, 'p99'):.2f} | "
                  f"{med(name, 'cpu_per_10k'):.3f} | {max(r['rss_peak_mib'] for r in runs[name]):.1f} |")
        print()
        p99_direct = statistics.median(r["p99"] for r in paced["direct"])
        p99_gate = statistics.median(r["p99"] for r in paced["erpgate"])
        rate = statistics.median(r["rps"] for r in paced["erpgate"])
        print("| ratio | value | target |")
        print("|---|---|---|")
        print(f"| erpgate ÷ nginx req/s | {med('erpgate', 'rps') / med('nginx', 'rps'):.2f} | ≥ 1.0 |")
        print(f"| erpgate ÷ nginx CPU per request | {med('erpgate', 'cpu_per_10k') / med('nginx', 'cpu_per_10k'):.2f} | ≤ 1.0 |")
        print(f"| erpgate cache hit ÷ erpgate req/s | {med('erpgate cache', 'rps') / med('erpgate', 'rps'):.2f} | ≥ 2.0 |")
        print(f"| erpgate ÷ direct req/s | {med('erpgate', 'rps') / med('direct', 'rps'):.2f} | |")
        print(f"| erpgate buffered ÷ unbuffered req/s | {med('erpgate', 'rps') / med('erpgate unbuffered', 'rps'):.2f} | |")
        print(f"| erpgate buffered ÷ unbuffered CPU per request | "
              f"{med('erpgate', 'cpu_per_10k') / med('erpgate unbuffered', 'cpu_per_10k'):.2f} | |")
        print(f"| RSS under a flood of {WEBHOOK_FLOOD} slow webhook bodies: before / during / after | "
              f"{flood[0]:.1f} / {flood[1]:.1f} / {flood[2]:.1f} MiB | |")
        print(f"| p99 at {rate:.0f} req/s (half of erpgate's saturation): erpgate − direct | "
              f"{p99_gate - p99_direct:.2f} ms ({p99_gate:.2f} vs {p99_direct:.2f}) | ≤ 1 ms |")
        print(f"| erpgate idle RSS | {idle_rss:.1f} MiB | ≤ 20 MiB |")
        print(f"| erpgate RSS holding {IDLE_CONNECTIONS} idle keep-alive connections | {rss_10k:.1f} MiB | ≤ 150 MiB |")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
