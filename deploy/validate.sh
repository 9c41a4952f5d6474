#!/usr/bin/env bash
# Checks everything in deploy/ that can be checked without a cluster or a Docker engine:
# Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline), the
# resources each kustomization names, the ServiceMonitor's shape, the gateway.yaml inside every
# ConfigMap (with `erpgate check`), the Prometheus config and alerting rules (promtool), the
# Grafana dashboard, and the Dockerfile's basics. Needs: python3 with kubernetes-validate,
# promtool, and a built erpgate (tests/setup.sh and cargo test see to all three).
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
            env = dict(os.environ, ERP_SYNC_API_KEY="placeholder-key")
            out = subprocess.run([erpgate, "check", cfg], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                failures.append(f"{path}: gateway.yaml does not pass erpgate check:\n{out.stderr}")

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

echo "== promtool"
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml

echo "== Dockerfile (no Docker engine here: the basics)"
grep -q '^USER ' deploy/Dockerfile
grep -q '^HEALTHCHECK ' deploy/Dockerfile
grep -q '^FROM .* AS build' deploy/Dockerfile
echo "deploy/: all checks passed"
