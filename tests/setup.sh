#!/usr/bin/env bash
# Installs what the tests need when it is missing (part of the README's test command):
#   - prometheus + promtool (Debian package `prometheus`): tests/prometheus.rs starts a real
#     Prometheus; deploy/validate.sh runs promtool;
#   - kubernetes-validate (PyPI): deploy/validate.sh checks the Kubernetes manifests offline;
#   - redis-server (Debian package `redis-server`): tests/scale_out.rs starts its own, on a free
#     port, for the shared state replicas use; deploy/validate.sh runs the bundled Redis's
#     arguments with it (redis-cli comes with it);
#   - chromium (Debian package `chromium`): tests/browser.rs loads pages in headless Chromium
#     to show CORS working, and blocking, in a real browser;
#   - openapi-spec-validator (PyPI): tests/openapi.rs validates the per-client OpenAPI
#     documents with it, a standard OpenAPI 3.1 validator independent of erpgate;
#   - schemathesis (PyPI): tests/openapi.rs runs its property-based API tests, driven by the
#     per-client OpenAPI documents, against erpgate in front of the test upstream;
#   - standardwebhooks (PyPI, the Standard Webhooks reference library): tests/events.rs verifies
#     the relay's delivery signatures with it, an implementation independent of erpgate's.
# Not installed here: wrk, nginx, haproxy and nginx-extras (Lua) serve only the load comparison,
# and benches/load/run.sh installs them itself when missing; no test needs them.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "== installing prometheus (Debian package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "== installing redis-server (Debian package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  # Tests start their own servers; the package's own service is not needed.
  as_root service redis-server stop >/dev/null 2>&1 || true
fi
if ! command -v chromium >/dev/null; then
  echo "== installing chromium (Debian package)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! python3 -c 'import standardwebhooks' >/dev/null 2>&1; then
  echo "== installing standardwebhooks (PyPI)"
  python3 -m pip install --quiet standardwebhooks
fi
if ! python3 -c 'import openapi_spec_validator' >/dev/null 2>&1; then
  echo "== installing openapi-spec-validator (PyPI)"
  python3 -m pip install --quiet 'openapi-spec-validator==0.9.0'
fi
if ! command -v st >/dev/null || ! python3 -c 'import schemathesis' >/dev/null 2>&1; then
  echo "== installing schemathesis (PyPI)"
  # Pinned: the test drives its command line, which changes between major versions.
  python3 -m pip install --quiet 'schemathesis==4.32.5'
fi
if ! command -v kubernetes-validate >/dev/null; then
  echo "== installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet kubernetes-validate
fi
