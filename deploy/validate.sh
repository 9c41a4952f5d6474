#!/usr/bin/env bash
# Checks everything in deploy/ that can be checked without a cluster or a Docker engine:
# Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline), the
# resources each kustomization names, the ServiceMonitor's shape, the gateway.yaml inside every
# ConfigMap (with `erpgate check`), the Prometheus config and alerting rules (promtool), the
# Grafana dashboard, the bundled Redis's arguments (run by a local redis-server), and the
# Dockerfile's basics. Needs: python3 with kubernetes-validate, promtool, redis-server, and a
# built erpgate (tests/setup.sh and cargo test see to all four).
set -euo pipefail
cd "$(dirname "$0")/.."
ERPGATE="${ERPGATE:-${CARGO_TARGET_DIR:-target}/debug/erpgate}"

echo "== kubernetes-validate (strict)"
manifests=$(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
# shellcheck disable=SC2086
kubernetes-validate --strict --quiet $manifests

echo "== kustomizations, ServiceMonitor, ConfigMaps"
python3 - "$ERPGATE" <<'PY'
import os, subprocess, sys, tempfile, yaml

erpgate = sys.argv[1]
failures = []

for root, _, files in os.walk("deploy/kubernetes"):
    if "kustomization.yaml" in files:
        k = yaml.safe_load(open(os.path.join(root, "kustomization.yaml")))
        assert k["kind"] == "Kustomization", root
        for resource in k["resources"]:
            if not os.path.exists(os.path.join(root, resource)):
                failures.append(f"{root}/kustomization.yaml: missing resource {resource}")
        listed = set(k["resources"])
        for f in files:
            if f.endswith(".yaml") and f != "kustomization.yaml" and f not in listed:
                failures.append(f"{root}/{f} is not in its kustomization")

def docs():
    for root, _, files in os.walk("deploy/kubernetes"):
        for f in files:
            if f.endswith(".yaml") and f != "kustomization.yaml":
                for doc in yaml.safe_load_all(open(os.path.join(root, f))):
                    yield os.path.join(root, f), doc

services = {}
for path, doc in docs():
    if doc["kind"] == "Service":
        services[doc["metadata"]["name"]] = doc

def pod_specs():
    for path, doc in docs():
        if doc["kind"] == "Deployment":
            yield path, doc["spec"]["template"]

# Every Service selects at least one pod, and every pod it selects has the port it targets:
# the public erpgate Service must never pick up the Redis pod, nor the other way round.
for name, svc in services.items():
    want = svc["spec"]["selector"]
    selected = [(path, t) for path, t in pod_specs()
                if all(t["metadata"]["labels"].get(k) == v for k, v in want.items())]
    if not selected:
        failures.append(f"Service {name} selects no pod")
    for path, t in selected:
        ports = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            if isinstance(port["targetPort"], str) and port["targetPort"] not in ports:
                failures.append(f"Service {name} selects {path}, which has no port {port['targetPort']}")

# Every key a pod takes from a Secret exists in it; the environment it builds is what the
# ConfigMap's gateway.yaml is checked with below.
secrets = {doc["metadata"]["name"]: doc.get("stringData", {})
           for _, doc in docs() if doc["kind"] == "Secret"}
pod_env = {}
for path, t in pod_specs():
    env = pod_env.setdefault(os.path.dirname(path), {})
    spec = t["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            if ref["key"] not in secrets.get(ref["name"], {}):
                failures.append(f"{path}: {e['name']} names {ref['name']}/{ref['key']}, which does not exist")
            else:
                env[e["name"]] = secrets[ref["name"]][ref["key"]]
    for v in spec.get("volumes", []):
        if "secret" in v:
            for item in v["secret"].get("items", []):
                if item["key"] not in secrets.get(v["secret"]["secretName"], {}):
                    failures.append(f"{path}: volume {v['name']} names missing key {item['key']}")

for path, doc in docs():
    if doc["kind"] == "ServiceMonitor":
        spec = doc["spec"]
        want = spec["selector"]["matchLabels"]
        ports = [p["name"] for s in services.values()
                 if all(s["metadata"]["labels"].get(k) == v for k, v in want.items())
                 for p in s["spec"]["ports"]]
        for endpoint in spec["endpoints"]:
            if endpoint["port"] not in ports:
                failures.append(f"{path}: no selected Service has a port named {endpoint['port']}")
            if endpoint.get("path", "/metrics") != "/metrics":
                failures.append(f"{path}: erpgate serves /metrics")
    if doc["kind"] == "ConfigMap" and "gateway.yaml" in doc.get("data", {}):
        with tempfile.TemporaryDirectory() as tmp:
            text = doc["data"]["gateway.yaml"].replace("/etc/erpgate/secrets/", tmp + "/")
            for line in text.splitlines():
                if tmp in line:
                    name = line.split(tmp + "/")[1].split()[0].rstrip("}").strip()
                    open(os.path.join(tmp, name), "w").write("placeholder-secret\n")
            cfg = os.path.join(tmp, "gateway.yaml")
            open(cfg, "w").write(text)
            env = dict(os.environ, **pod_env.get(os.path.dirname(path), {}))
            out = subprocess.run([erpgate, "check", cfg], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                failures.append(f"{path}: gateway.yaml does not pass erpgate check:\n{out.stderr}")
        # The edge replicas share state through Redis; a sidecar serves one integration
        # alone and must not need one.
        shared = "shared_state" in yaml.safe_load(doc["data"]["gateway.yaml"])
        if "/edge/" in path and not shared:
            failures.append(f"{path}: the edge replicas need shared_state")
        if "/sidecar/" in path and shared:
            failures.append(f"{path}: the sidecar must stay Redis-free")

import json
dashboard = json.load(open("deploy/prometheus/grafana-dashboard.json"))
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        if "erpgate_" not in target["expr"]:
            failures.append(f"grafana panel {panel['title']!r}: expression without an erpgate metric")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("ok")
PY

echo "== the bundled Redis starts with its manifest's arguments and password"
python3 - <<'PY'
import os, socket, subprocess, sys, time, yaml

docs = list(yaml.safe_load_all(open("deploy/kubernetes/edge/redis.yaml")))
container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
secret = yaml.safe_load(open("deploy/kubernetes/edge/secret.yaml"))["stringData"]
password = secret["redis-password"]
args = [a.replace("$(REDIS_PASSWORD)", password) for a in container["args"]]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
local = ["--port", str(port), "--bind", "127.0.0.1", "--dir", "/tmp"]
server = subprocess.Popen(container["command"] + args + local,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
authed = dict(os.environ, REDISCLI_AUTH=password)
try:
    cli = ["redis-cli", "-p", str(port)]
    for _ in range(50):
        if server.poll() is not None:
            sys.exit(f"redis-server refused the manifest's arguments:\n{server.stdout.read()}")
        out = subprocess.run(cli + ["ping"], capture_output=True, text=True, env=authed)
        if out.stdout.strip() == "PONG":
            break
        time.sleep(0.1)
    else:
        sys.exit("the bundled Redis does not answer PING with its password")
    anon = subprocess.run(cli + ["ping"], capture_output=True, text=True).stdout
    if "NOAUTH" not in anon:
        sys.exit(f"the bundled Redis answers without its password: {anon!r}")
    policy = subprocess.run(cli + ["config", "get", "maxmemory-policy"], capture_output=True,
                            text=True, env=authed).stdout.split()
    if policy[-1:] != ["volatile-ttl"]:
        sys.exit(f"maxmemory-policy is {policy}")
finally:
    server.terminate()
    server.wait()
print("ok")
PY

echo "== promtool"
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml

echo "== Dockerfile (no Docker engine here: the basics)"
grep -q '^USER ' deploy/Dockerfile
grep -q '^HEALTHCHECK ' deploy/Dockerfile
grep -q '^FROM .* AS build' deploy/Dockerfile
echo "deploy/: all checks passed"
