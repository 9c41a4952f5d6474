#!/usr/bin/env bash
# Checks everything in deploy/ that can be checked without a cluster or a Docker engine:
# Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline), the
# resources each kustomization names, the ServiceMonitor's shape, the gateway.yaml inside every
# ConfigMap (with `erpgate check`), that every directory a shipped config has erpgate write is a
# writable volume of its container, that every shipped config requires an admin token and a
# NetworkPolicy guards its pods, the Prometheus config and alerting rules (promtool), the
# Grafana dashboard, the bundled Redis's arguments and persistence (run by a local
# redis-server), and the Dockerfile's basics. Needs: python3 with kubernetes-validate, promtool, redis-server, and a
# built erpgate (tests/setup.sh and cargo test see to all four).
set -euo pipefail
cd "$(dirname "$0")/.."
ERPGATE="${ERPGATE:-${CARGO_TARGET_DIR:-target}/debug/erpgate}"

echo "== kubernetes-validate (strict)"
manifests=$(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
# shellcheck disable=SC2086
kubernetes-validate --strict --quiet $manifests

# The ConfigMaps' directories (/var/spool/erpgate, ...) do not exist here: where `erpgate check`
# can skip probing them (--config-only), it must; older builds never probe.
check=(check)
if "$ERPGATE" check --help 2>/dev/null | grep -q -- '--config-only'; then
    check+=(--config-only)
fi

echo "== kustomizations, ServiceMonitor, NetworkPolicies, ConfigMaps and their volumes"
python3 - "$ERPGATE" "${check[@]}" <<'PY'
import os, re, subprocess, sys, tempfile, yaml

erpgate, check = sys.argv[1], sys.argv[2:]
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
            if "value" in e:
                env[e["name"]] = e["value"]
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
            out = subprocess.run([erpgate, *check, cfg], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                failures.append(f"{path}: gateway.yaml does not pass erpgate check:\n{out.stderr}")
        # The edge replicas share state through Redis; a sidecar serves one integration
        # alone and must not need one.
        shared = "shared_state" in yaml.safe_load(doc["data"]["gateway.yaml"])
        if "/edge/" in path and not shared:
            failures.append(f"{path}: the edge replicas need shared_state")
        if "/sidecar/" in path and shared:
            failures.append(f"{path}: the sidecar must stay Redis-free")

# Every ConfigMap's gateway.yaml, with the erpgate container(s) that mount it as their config.
def erpgate_containers(configmap, where):
    for path, t in pod_specs():
        if os.path.dirname(path) != where:
            continue
        spec = t["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            if "run" in c.get("args", []) and any(
                    volumes.get(m["name"], {}).get("configMap", {}).get("name") == configmap
                    for m in c.get("volumeMounts", [])):
                yield path, t, c, volumes

# Every directory erpgate writes (src/config/types.rs: buffering.directory, the spool of bodies
# over buffering.memory; events.directory, the embedded event store) must be on a writable
# volume of the container that runs the config: the root filesystems are read-only, so without
# one a body over 1 MiB, or any event, fails at run time, never at `erpgate check` here.
WRITTEN = [("buffering", "directory"), ("events", "directory")]

def expand(text, env):
    def one(m):
        if m.group(1) not in env:
            raise KeyError(m.group(1))
        return env[m.group(1)]
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", one, text)

for path, doc in docs():
    if doc["kind"] != "ConfigMap" or "gateway.yaml" not in doc.get("data", {}):
        continue
    cfg = yaml.safe_load(doc["data"]["gateway.yaml"]) or {}
    name, where = doc["metadata"]["name"], os.path.dirname(path)
    # admin_listen serves cache purges, dead letters and replays: never without a token.
    if not (cfg.get("admin_token") or cfg.get("admin_token_file")):
        failures.append(f"{path}: gateway.yaml sets no admin_token (or admin_token_file): "
                        "any pod reaching the admin port could purge, read dead letters, replay")
    users = list(erpgate_containers(name, where))
    if not users:
        failures.append(f"{path}: no erpgate container in {where} runs ConfigMap {name}")
    for dpath, t, c, volumes in users:
        env = pod_env.get(where, {})
        read_only_root = c.get("securityContext", {}).get("readOnlyRootFilesystem", False)
        buffering = cfg.get("buffering") or {}
        if (read_only_root and not buffering.get("directory")
                and (buffering.get("requests", True) or buffering.get("responses", True))):
            failures.append(f"{path}: buffering.directory is unset and {dpath} container "
                            f"{c['name']} has a read-only root filesystem: bodies over "
                            "buffering.memory could not be spooled")
        for section, key in WRITTEN:
            raw = (cfg.get(section) or {}).get(key)
            if raw is None:
                continue
            where_key = f"{section}.{key}"
            try:
                dir_ = os.path.normpath(expand(str(raw), env))
            except KeyError as e:
                failures.append(f"{path}: {where_key} {raw!r} names ${{{e.args[0]}}}, "
                                f"which {dpath} does not set")
                continue
            # The mount that backs the directory: the deepest one at or above it.
            mounts = [m for m in c.get("volumeMounts", [])
                      if dir_ == os.path.normpath(m["mountPath"])
                      or dir_.startswith(os.path.normpath(m["mountPath"]).rstrip("/") + "/")]
            mount = max(mounts, key=lambda m: len(os.path.normpath(m["mountPath"])), default=None)
            where_c = f"{dpath} container {c['name']}"
            if mount is None:
                failures.append(f"{path}: {where_key} is {dir_}, but no volume is mounted there "
                                f"in {where_c} (read-only root filesystem: nothing could be written)")
                continue
            volume = volumes.get(mount["name"], {})
            if mount.get("readOnly"):
                failures.append(f"{path}: {where_key} is {dir_}, mounted readOnly in {where_c}")
            elif not ("emptyDir" in volume or "persistentVolumeClaim" in volume):
                failures.append(f"{path}: {where_key} is {dir_}, on volume {mount['name']} in "
                                f"{where_c}, which is neither an emptyDir nor a PersistentVolumeClaim")
            elif section == "events" and "persistentVolumeClaim" not in volume:
                failures.append(f"{path}: {where_key} is {dir_}, on emptyDir {mount['name']} in "
                                f"{where_c}: the event store must outlive the pod (a PersistentVolumeClaim)")

# Every pod running erpgate is selected by a NetworkPolicy of its own kustomization that admits
# each port only from named peers, and names only ports the pod has.
policies = [(path, doc) for path, doc in docs() if doc["kind"] == "NetworkPolicy"]
for path, t in pod_specs():
    spec = t["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    if not any("run" in c.get("args", []) and "erpgate" in c.get("image", "") for c in containers):
        continue
    labels = t["metadata"]["labels"]
    port_names = {p.get("name") for c in containers for p in c.get("ports", [])}
    port_numbers = {p["containerPort"] for c in containers for p in c.get("ports", [])}
    selecting = [
        (ppath, p) for ppath, p in policies
        if os.path.dirname(ppath) == os.path.dirname(path)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and not p["spec"]["podSelector"].get("matchExpressions")
        and all(labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())
    ]
    if not selecting:
        failures.append(f"{path}: no NetworkPolicy in {os.path.dirname(path)} selects its pods "
                        f"({labels}): every pod can reach the admin port")
    for ppath, p in selecting:
        for rule in p["spec"].get("ingress", []):
            if not rule.get("from") or not rule.get("ports"):
                failures.append(f"{ppath}: an ingress rule without `from` or `ports` admits "
                                "anyone, or every port, of the erpgate pods")
            for port in rule.get("ports", []):
                known = port_names if isinstance(port.get("port"), str) else port_numbers
                if port.get("port") not in known:
                    failures.append(f"{ppath}: port {port.get('port')!r} is not a port of {path}")

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

echo "== the bundled Redis starts with its manifest's arguments and password, and keeps its data"
python3 - <<'PY'
import os, socket, subprocess, sys, tempfile, time, yaml

docs = list(yaml.safe_load_all(open("deploy/kubernetes/edge/redis.yaml")))
pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
container = pod["containers"][0]
secret = yaml.safe_load(open("deploy/kubernetes/edge/secret.yaml"))["stringData"]
password = secret["redis-password"]
args = [a.replace("$(REDIS_PASSWORD)", password) for a in container["args"]]

# Its data directory (--dir, else the image's working directory /data) is a writable volume
# that outlives the pod: a PersistentVolumeClaim of this file.
data_dir = args[args.index("--dir") + 1] if "--dir" in args else "/data"
volumes = {v["name"]: v for v in pod.get("volumes", [])}
mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == data_dir), None)
if mount is None or mount.get("readOnly"):
    sys.exit(f"redis.yaml: the Redis data directory {data_dir} is not a writable volume mount")
claim = volumes.get(mount["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
if claim not in {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}:
    sys.exit(f"redis.yaml: {data_dir} is not on a PersistentVolumeClaim of redis.yaml "
             f"(volume {mount['name']}: {volumes.get(mount['name'])})")

authed = dict(os.environ, REDISCLI_AUTH=password)
with tempfile.TemporaryDirectory() as data:
    def start():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # The manifest's arguments with a local port and a scratch data directory (Redis
        # changes into each --dir as it reads it, so the manifest's is replaced, not overridden).
        here = [data if i and args[i - 1] == "--dir" else a for i, a in enumerate(args)]
        local = ["--port", str(port), "--bind", "127.0.0.1"]
        if "--dir" not in args:
            local += ["--dir", data]
        server = subprocess.Popen(container["command"] + here + local,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        cli = ["redis-cli", "-p", str(port)]
        for _ in range(50):
            if server.poll() is not None:
                sys.exit(f"redis-server refused the manifest's arguments:\n{server.stdout.read()}")
            out = subprocess.run(cli + ["ping"], capture_output=True, text=True, env=authed)
            if out.stdout.strip() == "PONG":
                return server, cli
            time.sleep(0.1)
        server.terminate()
        sys.exit("the bundled Redis does not answer PING with its password")

    def stop(server):
        server.terminate()
        server.wait()

    def config(cli, name):
        return subprocess.run(cli + ["config", "get", name], capture_output=True, text=True,
                              env=authed).stdout.split()[-1:]

    server, cli = start()
    try:
        anon = subprocess.run(cli + ["ping"], capture_output=True, text=True).stdout
        if "NOAUTH" not in anon:
            sys.exit(f"the bundled Redis answers without its password: {anon!r}")
        # Claims, records and events are never evicted: at maxmemory writes are refused.
        # And what is written is kept: an append-only file fsynced every second.
        for name, want in [("maxmemory-policy", "noeviction"), ("appendonly", "yes"),
                           ("appendfsync", "everysec")]:
            if config(cli, name) != [want]:
                sys.exit(f"the bundled Redis's {name} is {config(cli, name)}, not {want}")
        set_ = subprocess.run(cli + ["set", "erpgate:validate", "kept", "EX", "600"],
                              capture_output=True, text=True, env=authed).stdout.strip()
        if set_ != "OK":
            sys.exit(f"the bundled Redis refused a write: {set_!r}")
    finally:
        stop(server)
    # A restart on the same data directory finds it again.
    server, cli = start()
    try:
        got = subprocess.run(cli + ["get", "erpgate:validate"], capture_output=True, text=True,
                             env=authed).stdout.strip()
        if got != "kept":
            sys.exit(f"the bundled Redis lost a key across a restart (got {got!r})")
    finally:
        stop(server)
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
