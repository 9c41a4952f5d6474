"""Drives the load comparison; see run.sh. Standard library only.

Targets (TARGETS, comma-separated; default all):
  direct              the upstream itself (nginx `return 200`), the limit
  nginx               nginx as a plain reverse proxy (proxy_pass, upstream keep-alive)
  haproxy             HAProxy doing erpgate's job: key id -> SHA-256 map, sha2(256) of the secret,
                      a per-client stick-table rate, the path rule, the header swap
  nginx-lua           nginx + Lua (nginx_peer.lua) doing the same job, limit_req per key id
  erpgate             the full stack, cache off
  erpgate-cache       the full stack serving cache hits       (first connection count, log off)
  erpgate-unbuffered  the full stack with buffering off        (first connection count, log off)
  erpgate-before      another erpgate binary (ERPGATE_BEFORE=path, e.g. a build of an earlier
                      commit), same config: before/after a change, in the same rounds

Every proxy target except the two marked runs once per access-log mode (LOG_MODES, default
"off on") as a separate process; all of them are measured in the same alternating rounds, at
each of CONNECTION_COUNTS (default "64 256"). Tables are printed per connection count and log
mode.

scale_out.py imports from here: keep BODY, CONNECTIONS, DURATION, PATH, ROUNDS, TICKS,
cpu_ticks, erpgate_conf, measure, nginx_conf, stop, wait_port and wrk compatible.
"""

import hashlib
import http.client
import json
import os
import re
import resource
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
CPUS = len(os.sched_getaffinity(0))

UPSTREAM = 18081
FIRST_PORT, FIRST_ADMIN = 18082, 19082  # the proxies under test, in the order they start
WEBHOOK_FLOOD = int(os.environ.get("WEBHOOK_FLOOD", "1000"))
SECRET = "load-test-client-secret"
SECRET_SHA256 = hashlib.sha256(SECRET.encode()).hexdigest()
KEY_ID = "ek_load"
TOKEN = f"token {KEY_ID}:{SECRET}"
PATH = "/api/resource/ToDo?limit=20"
HERE = os.path.dirname(os.path.abspath(__file__))

ERPGATE_BEFORE = os.environ.get("ERPGATE_BEFORE", "")
ALL_TARGETS = ("direct", "nginx", "haproxy", "nginx-lua", "erpgate", "erpgate-cache", "erpgate-unbuffered") \
    + (("erpgate-before",) if ERPGATE_BEFORE else ())
LOGGED = ("nginx", "haproxy", "nginx-lua", "erpgate", "erpgate-before")  # with an access-log-on variant
EXTRAS = ("erpgate-cache", "erpgate-unbuffered")  # measured at the first connection count, log off
CHECKING = ("haproxy", "nginx-lua", "erpgate", "erpgate-cache", "erpgate-unbuffered", "erpgate-before")
LABELS = {"erpgate-cache": "erpgate cache", "erpgate-unbuffered": "erpgate unbuffered"}

BODY = json.dumps({"data": [{"name": f"TODO-{i:04}", "status": "Open", "owner": "sync@example.com"}
                            for i in range(16)]})
assert 900 < len(BODY) < 1300, len(BODY)


def env_list(name, default):
    return os.environ.get(name, default).replace(",", " ").split()


def nginx_conf(work, name, server_block, access_log="off", main="", http=""):
    """An nginx config: `main` goes at the top level (load_module), `http` into the http block."""
    conf = f"""{main}
worker_processes auto;
pid {work}/{name}.pid;
error_log {work}/{name}.error.log error;
daemon off;
events {{ worker_connections 16384; }}
http {{
  access_log {access_log};
  client_body_temp_path {work}/{name}-body;
  proxy_temp_path {work}/{name}-proxy;
  fastcgi_temp_path {work}/{name}-fastcgi;
  uwsgi_temp_path {work}/{name}-uwsgi;
  scgi_temp_path {work}/{name}-scgi;
  keepalive_requests 1000000;
  {http}
  {server_block}
}}
"""
    path = os.path.join(work, f"{name}.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def erpgate_conf(work, name, port, admin, cache, buffering=True, upstream=UPSTREAM, top="", client="",
                 log_level="error"):
    """An erpgate config: `top` is added at the top level, `client` to the load client."""
    rules = "cache:\n  rules:\n    - { doctype: ToDo, ttl: 3600s }\n" if cache else ""
    if not buffering:
        rules += "buffering: { requests: false, responses: false }\n"
    webhook = "\n    webhook: { secret: load-webhook-secret }" if cache else ""
    conf = f"""
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
log: {{ format: json, level: {log_level} }}
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
    key_id: {KEY_ID}
    secret_sha256: "{SECRET_SHA256}"
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

UPSTREAM_BLOCK = f"upstream frappe {{ server 127.0.0.1:{UPSTREAM}; keepalive 256; }}"


def nginx_proxy_conf(work, name, port, access_log="off"):
    """nginx as a plain reverse proxy: no checks, keep-alive upstream."""
    return nginx_conf(work, name, f"""
  {UPSTREAM_BLOCK}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://frappe;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host erp.localhost;
    }}
  }}""", access_log=access_log)


def nginx_lua_conf(work, name, port, access_log="off"):
    """nginx doing erpgate's job: nginx_peer.lua checks the key (SHA-256 through LuaJIT FFI to
    libcrypto) and the path rule in the access phase, limit_req keeps a per-client rate (never
    triggers), proxy_set_header swaps the credentials. The Lua module is a dynamic module of
    Debian's nginx (nginx-extras), loaded here; the plain proxy's config loads nothing."""
    with open(os.path.join(work, "peer_keys.lua"), "w") as f:
        f.write(f'return {{ ["{KEY_ID}"] = "{SECRET_SHA256}" }}\n')
    return nginx_conf(work, name, f"""
  {UPSTREAM_BLOCK}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      limit_req zone=per_client burst=100000000 nodelay;
      access_by_lua_block {{ require("nginx_peer").access() }}
      proxy_pass http://frappe;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host erp.localhost;
      proxy_set_header Authorization "token load-key:load-secret";
      proxy_set_header X-Frappe-Site-Name erp.localhost;
    }}
  }}""", access_log=access_log,
                      main="load_module /usr/lib/nginx/modules/ndk_http_module.so;\n"
                           "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;",
                      http=f"""lua_package_path "{HERE}/?.lua;{work}/?.lua;;";
  init_by_lua_block {{ require("nginx_peer") }}
  # limit_req runs before the access phase, so its key comes from the header itself.
  map $http_authorization $key_id {{ "~^token (?<id>[^:]+):" $id; default ""; }}
  limit_req_zone $key_id zone=per_client:10m rate=100000000r/s;""")


def haproxy_conf(work, name, port, log):
    """HAProxy doing erpgate's job: the key id's expected SHA-256 from a map, sha2(256) of the
    presented secret compared with secure_memcmp (401), a per-client request rate in a
    stick-table (never triggers), the path rule (403), the header swap, keep-alive upstream."""
    keys = os.path.join(work, "haproxy-keys.map")
    with open(keys, "w") as f:
        # The `hex` converter writes upper case, so the map holds the digest that way.
        f.write(f"{KEY_ID} {SECRET_SHA256.upper()}\n")
    logging = ("  log stdout format raw local0 info\n", "  log global\n  option httplog\n") if log == "on" \
        else ("", "")
    # Each connection takes two descriptors (client, server); stay within what we may open.
    maxconn = max(1000, min(30000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2))
    conf = f"""global
  nbthread {CPUS}
  maxconn {maxconn}
{logging[0]}
defaults
  mode http
  maxconn {maxconn}
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
{logging[1]}
backend per_client
  stick-table type string len 64 size 100k expire 60s store http_req_rate(1s)

frontend gate
  bind 127.0.0.1:{port}
  acl token_scheme req.fhdr(authorization) -m beg "token "
  http-request deny deny_status 401 unless token_scheme
  http-request set-var(txn.key_id) req.fhdr(authorization),field(1,:),field(2,' ')
  http-request set-var(txn.expected) var(txn.key_id),map_str({keys})
  http-request set-var(txn.presented) req.fhdr(authorization),field(2,:,0),sha2(256),hex
  acl secret_ok var(txn.presented),secure_memcmp(txn.expected)
  http-request deny deny_status 401 unless secret_ok
  http-request track-sc0 var(txn.key_id) table per_client
  http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 100000000 }}
  acl any_method path /api/resource/ToDo /api/method/frappe.client.get_list /api/method/frappe.client.get_count
  acl any_method path_beg /api/resource/ToDo/
  acl read_only path /api/resource/Item
  acl read_only path_beg /api/resource/Item/
  http-request deny deny_status 403 unless any_method or read_only METH_GET
  http-request set-header Authorization "token load-key:load-secret"
  http-request set-header X-Frappe-Site-Name erp.localhost
  default_backend frappe

backend frappe
  http-reuse always
  server frappe 127.0.0.1:{UPSTREAM}
"""
    path = os.path.join(work, f"{name}.cfg")
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
            p.wait()


def wait_port(port, timeout=20, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"the process meant to listen on {port} exited with {proc.returncode}")
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
    errors = re.search(r"Socket errors:.*", out)
    if errors:
        print(f"  warning: port {port}: {errors.group(0)}", file=sys.stderr)

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    result.update(rps=rps, requests=total, p50=pct(50), p99=pct(99))
    return result


def measure(name, port, pids, path=PATH, connections=CONNECTIONS):
    before = cpu_ticks(pids)
    result = wrk(port, path, connections=connections)
    used = (cpu_ticks(pids) - before) / TICKS
    result["cpu_per_10k"] = used / result["requests"] * 10000
    result["rss_peak_mib"] = rss_kib(pids, "VmHWM") / 1024
    print(f"  {name:<24} {result['rps']:>10.0f} req/s  p50 {result['p50']:.2f} ms  "
          f"p99 {result['p99']:.2f} ms  cpu/10k {result['cpu_per_10k']:.3f} s", file=sys.stderr)
    return result


def status_of(port, path, authorization, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = b"{}" if method == "POST" else None
        headers = {"Authorization": authorization}
        if body:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def smoke_check(name, port, checking):
    """A good token gets 200; where the target checks keys and rules, a wrong secret and an
    unknown key id get 401 and a path outside the rules gets 403."""
    checks = [("good token", "GET", PATH, TOKEN, 200)]
    if checking:
        checks += [("wrong secret", "GET", PATH, f"token {KEY_ID}:{SECRET}x", 401),
                   ("unknown key id", "GET", PATH, f"token ek_nobody:{SECRET}", 401),
                   ("not a token", "GET", PATH, f"Basic {SECRET}", 401),
                   ("forbidden path", "GET", "/api/resource/User?limit=20", TOKEN, 403),
                   ("read-only doctype written", "POST", "/api/resource/Item", TOKEN, 403),
                   ("allowed method", "GET", "/api/method/frappe.client.get_count?doctype=ToDo", TOKEN, 200)]
    failed = []
    for what, method, path, authorization, expected in checks:
        got = status_of(port, path, authorization, method)
        if got != expected:
            failed.append(f"{what}: {got}, expected {expected}")
    if failed:
        sys.exit(f"smoke check of {name} (port {port}) failed: " + "; ".join(failed))
    print(f"  smoke check {name:<24} ok: " + ", ".join(f"{c[0]} {c[4]}" for c in checks), file=sys.stderr)
    return len(checks)


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


class Instance:
    """One running target: a process (and its workers), its port, its access log if any."""

    def __init__(self, target, log, port):
        self.target, self.log, self.port = target, log, port
        self.name = LABELS.get(target, target) + (" (log on)" if log == "on" else "")
        self.proc, self.pids, self.log_path = None, [], None
        self.requests = 0  # every request sent, warm-up included, to compare with log lines
        self.log_bytes = self.log_lines = 0

    def harvest_log(self):
        """Counts what the access log holds, then empties it so that a long run does not fill
        the disk. nginx and erpgate append; HAProxy resets its stdout to plain O_NONBLOCK
        (no O_APPEND), so it goes on writing at its offset and the file becomes sparse: reading
        starts at the first data and skips the zeros of a partial hole block."""
        if not self.log_path or not os.path.exists(self.log_path):
            return
        with open(self.log_path, "rb") as f:
            try:
                f.seek(os.lseek(f.fileno(), 0, os.SEEK_DATA))
            except OSError:  # ENXIO: nothing but holes
                return
            while chunk := f.read(1 << 20):
                self.log_bytes += len(chunk) - chunk.count(b"\0")
                self.log_lines += chunk.count(b"\n")
        os.truncate(self.log_path, 0)


def start_all(work, targets, log_modes, procs):
    """Starts the upstream and every (target, log mode) instance; returns them by key."""
    up_conf = nginx_conf(work, "upstream", f"""
  server {{
    listen 127.0.0.1:{UPSTREAM} backlog=4096;
    location / {{ default_type application/json; return 200 '{BODY}'; }}
  }}""")
    upstream = subprocess.Popen(["nginx", "-c", up_conf, "-p", work])
    procs.append(upstream)
    direct = Instance("direct", "off", UPSTREAM)
    direct.proc = upstream
    instances = {("direct", "off"): direct} if "direct" in targets else {}
    wait_port(UPSTREAM, proc=upstream)

    index = 0
    for target in targets:
        if target == "direct":
            continue
        for log in log_modes:
            if log == "on" and target not in LOGGED:
                continue
            if target in EXTRAS and log != "off":
                continue
            inst = Instance(target, log, FIRST_PORT + index)
            admin = FIRST_ADMIN + index
            index += 1
            stem = f"{target}-log-{log}"
            nginx_log = "off"
            if log == "on":
                suffix = "access.log" if target in ("nginx", "nginx-lua") else "stdout.log"
                inst.log_path = os.path.join(work, f"{stem}.{suffix}")
                nginx_log = f"{inst.log_path} combined buffer=64k flush=1s"
            stdout = subprocess.DEVNULL
            if inst.log_path and target not in ("nginx", "nginx-lua"):
                # As a container runtime collects it: stdout into a file (appending, so that
                # harvest_log can empty it under the running process; see there for HAProxy).
                stdout = open(inst.log_path, "ab")
            if target in ("nginx", "nginx-lua"):
                conf = (nginx_proxy_conf if target == "nginx" else nginx_lua_conf)(work, stem, inst.port, nginx_log)
                cmd = ["nginx", "-c", conf, "-p", work]
            elif target == "haproxy":
                cmd = ["haproxy", "-db", "-f", haproxy_conf(work, stem, inst.port, log)]
            else:
                conf = erpgate_conf(work, stem, inst.port, admin, cache=target == "erpgate-cache",
                                    buffering=target != "erpgate-unbuffered",
                                    log_level="info" if log == "on" else "error")
                binary = ERPGATE_BEFORE if target == "erpgate-before" else "target/release/erpgate"
                cmd = [binary, "run", "--config", conf]
            inst.proc = subprocess.Popen(cmd, stdout=stdout)
            procs.append(inst.proc)
            if stdout is not subprocess.DEVNULL:
                stdout.close()
            instances[(target, log)] = inst
            wait_port(inst.port, proc=inst.proc)
    direct.pids = pids_of(upstream.pid)
    for inst in instances.values():
        inst.pids = pids_of(inst.proc.pid)
    return direct, instances


def main():
    targets = env_list("TARGETS", ",".join(ALL_TARGETS))
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        sys.exit(f"unknown TARGETS {sorted(unknown)}; known: {', '.join(ALL_TARGETS)}")
    targets = [t for t in ALL_TARGETS if t in targets]
    log_modes = [m for m in ("off", "on") if m in env_list("LOG_MODES", "off on")]
    if not log_modes:
        sys.exit("LOG_MODES must name off, on or both")
    # CONNECTIONS (one count) is what the harness took before; CONNECTION_COUNTS wins.
    counts = [int(c) for c in env_list("CONNECTION_COUNTS", os.environ.get("CONNECTIONS", "64 256"))]

    work = tempfile.mkdtemp(prefix="erpgate-load-")
    procs = []
    try:
        direct, instances = start_all(work, targets, log_modes, procs)
        time.sleep(0.5)
        gate = instances.get(("erpgate", "off"))
        idle_rss = rss_kib([gate.proc.pid]) / 1024 if gate else None

        print("smoke checks", file=sys.stderr)
        for inst in instances.values():
            inst.requests += smoke_check(inst.name, inst.port, inst.target in CHECKING)

        # Warm-up: pools, caches, page faults; then every access log must have lines in it.
        for inst in instances.values():
            inst.requests += wrk(inst.port, PATH, duration=min(2, DURATION), connections=counts[0])["requests"]
        time.sleep(1.2)  # past nginx's flush=1s
        for inst in instances.values():
            if inst.log_path:
                inst.harvest_log()
                if inst.log_lines == 0:
                    sys.exit(f"{inst.name} wrote no access log lines to {inst.log_path}")

        runs = {}  # (connections, target, log) -> [result]
        for n, conns in enumerate(counts):
            here = [inst for inst in instances.values() if n == 0 or inst.target not in EXTRAS]
            for r in range(ROUNDS):
                print(f"{conns} connections, round {r + 1}/{ROUNDS}", file=sys.stderr)
                # Alternate the order each round to cancel drift.
                order = here if r % 2 == 0 else list(reversed(here))
                for inst in order:
                    result = measure(inst.name, inst.port, inst.pids, connections=conns)
                    inst.requests += result["requests"]
                    inst.harvest_log()
                    runs.setdefault((conns, inst.target, inst.log), []).append(result)

        def med(conns, target, key, log="off"):
            return statistics.median(run[key] for run in runs[(conns, target, log)])

        def have(conns, *targets_, log="off"):
            return all((conns, t, log) in runs for t in targets_)

        first = counts[0]
        # p99 at half of erpgate's saturating rate: wrk's per-connection delay paces the load.
        paced = {}
        if have(first, "erpgate", "direct"):
            half = med(first, "erpgate", "rps") / 2
            delay_ms = first * 1000 / half
            script = os.path.join(work, "pace.lua")
            with open(script, "w") as f:
                f.write(f"function delay() return {delay_ms:.3f} end\n")
            for name, port in (("direct", UPSTREAM), ("erpgate", gate.port)) * 2:
                paced.setdefault(name, []).append(wrk(port, PATH, extra=["-s", script], connections=first))

        cache = instances.get(("erpgate-cache", "off"))
        flood = webhook_flood(cache.port, cache.proc.pid, WEBHOOK_FLOOD) if cache and WEBHOOK_FLOOD else None

        rss_idle_conns = None
        if gate and IDLE_CONNECTIONS:
            conns = hold_idle_connections(gate.port, IDLE_CONNECTIONS)
            time.sleep(1)
            rss_idle_conns = rss_kib([gate.proc.pid]) / 1024
            for s in conns:
                s.close()

        time.sleep(1.2)  # nginx flushes its log buffers within a second
        for inst in instances.values():
            inst.harvest_log()

        print()
        print(f"Median of {ROUNDS} alternating rounds; wrk {THREADS} threads, {DURATION} s each, at "
              f"{' and '.join(map(str, counts))} connections; {CPUS} CPUs; response {len(BODY)} bytes. "
              f"Access log off: erpgate `log.level: error`, nginx `access_log off`, HAProxy no `log`; "
              f"on: erpgate JSON lines at `info` on stdout into a file, nginx `access_log <file> "
              f"combined buffer=64k flush=1s`, HAProxy `option httplog` to `log stdout` into a file.")
        for conns in counts:
            for log in log_modes:
                rows = [t for t in targets if (conns, t, log) in runs]
                if not rows:
                    continue
                print()
                print(f"**{conns} connections, access log {log}**")
                print()
                print("| target | req/s | p50 ms | p99 ms | CPU s per 10k req (proxy) | peak RSS MiB |")
                print("|---|---|---|---|---|---|")
                for t in rows:
                    rs = runs[(conns, t, log)]
                    print(f"| {LABELS.get(t, t)} | {med(conns, t, 'rps', log):.0f} | {med(conns, t, 'p50', log):.2f} | "
                          f"{med(conns, t, 'p99', log):.2f} | {med(conns, t, 'cpu_per_10k', log):.3f} | "
                          f"{max(r['rss_peak_mib'] for r in rs):.1f} |")
                ratios = []
                for peer, target_rps, target_cpu in (("nginx", "≥ 1.0", "≤ 1.0"), ("haproxy", "", ""),
                                                     ("nginx-lua", "", "")):
                    if have(conns, "erpgate", peer, log=log):
                        ratios.append((f"erpgate ÷ {peer} req/s",
                                       f"{med(conns, 'erpgate', 'rps', log) / med(conns, peer, 'rps', log):.2f}",
                                       target_rps))
                        ratios.append((f"erpgate ÷ {peer} CPU per request",
                                       f"{med(conns, 'erpgate', 'cpu_per_10k', log) / med(conns, peer, 'cpu_per_10k', log):.2f}",
                                       target_cpu))
                if have(conns, "erpgate", "erpgate-before", log=log):
                    ratios.append(("erpgate ÷ erpgate-before req/s",
                                   f"{med(conns, 'erpgate', 'rps', log) / med(conns, 'erpgate-before', 'rps', log):.2f}", ""))
                    ratios.append(("erpgate ÷ erpgate-before CPU per request",
                                   f"{med(conns, 'erpgate', 'cpu_per_10k', log) / med(conns, 'erpgate-before', 'cpu_per_10k', log):.2f}", ""))
                if have(conns, "erpgate", log=log) and have(conns, "direct"):
                    ratios.append(("erpgate ÷ direct req/s (direct: no log)",
                                   f"{med(conns, 'erpgate', 'rps', log) / med(conns, 'direct', 'rps'):.2f}", ""))
                if ratios:
                    print()
                    print("| ratio | value | target |")
                    print("|---|---|---|")
                    for row in ratios:
                        print("| " + " | ".join(row) + " |")
            logged = [t for t in LOGGED if have(conns, t, log="off") and have(conns, t, log="on")]
            if logged:
                print()
                print(f"**{conns} connections: access log on ÷ off**")
                print()
                print("| target | req/s on ÷ off | CPU per request on ÷ off |")
                print("|---|---|---|")
                for t in logged:
                    print(f"| {t} | {med(conns, t, 'rps', 'on') / med(conns, t, 'rps'):.2f} | "
                          f"{med(conns, t, 'cpu_per_10k', 'on') / med(conns, t, 'cpu_per_10k'):.2f} |")

        written = [inst for inst in instances.values() if inst.log_path]
        if written:
            print()
            print("| access log (whole run, warm-up included) | lines per request | bytes per line | MiB |")
            print("|---|---|---|---|")
            for inst in written:
                print(f"| {inst.name} | {inst.log_lines / max(inst.requests, 1):.3f} | "
                      f"{inst.log_bytes / max(inst.log_lines, 1):.0f} | {inst.log_bytes / 2**20:.0f} |")

        extras = []
        if have(first, "erpgate", "erpgate-cache"):
            extras.append(("erpgate cache hit ÷ erpgate req/s",
                           f"{med(first, 'erpgate-cache', 'rps') / med(first, 'erpgate', 'rps'):.2f}", "≥ 2.0"))
        if have(first, "erpgate", "erpgate-unbuffered"):
            extras.append(("erpgate buffered ÷ unbuffered req/s",
                           f"{med(first, 'erpgate', 'rps') / med(first, 'erpgate-unbuffered', 'rps'):.2f}", ""))
            extras.append(("erpgate buffered ÷ unbuffered CPU per request",
                           f"{med(first, 'erpgate', 'cpu_per_10k') / med(first, 'erpgate-unbuffered', 'cpu_per_10k'):.2f}",
                           ""))
        if flood:
            extras.append((f"RSS under a flood of {WEBHOOK_FLOOD} slow webhook bodies: before / during / after",
                           f"{flood[0]:.1f} / {flood[1]:.1f} / {flood[2]:.1f} MiB", ""))
        if paced:
            p99_direct = statistics.median(r["p99"] for r in paced["direct"])
            p99_gate = statistics.median(r["p99"] for r in paced["erpgate"])
            rate = statistics.median(r["rps"] for r in paced["erpgate"])
            extras.append((f"p99 at {rate:.0f} req/s (half of erpgate's saturation): erpgate − direct",
                           f"{p99_gate - p99_direct:.2f} ms ({p99_gate:.2f} vs {p99_direct:.2f})", "≤ 1 ms"))
        if idle_rss is not None:
            extras.append(("erpgate idle RSS", f"{idle_rss:.1f} MiB", "≤ 20 MiB"))
        if rss_idle_conns is not None:
            extras.append((f"erpgate RSS holding {IDLE_CONNECTIONS} idle keep-alive connections",
                           f"{rss_idle_conns:.1f} MiB", "≤ 150 MiB"))
        if extras:
            print()
            print(f"**{first} connections, access log off**")
            print()
            print("| ratio | value | target |")
            print("|---|---|---|")
            for row in extras:
                print("| " + " | ".join(row) + " |")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
