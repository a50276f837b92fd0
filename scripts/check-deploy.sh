#!/usr/bin/env bash
# Checks what can be checked of the packaging without a container engine or a
# cluster: the Kubernetes manifest parses into the expected objects and
# validates against the API schema, the systemd unit passes
# `systemd-analyze verify`, and the Dockerfile's stages are in order.
# Needs target/debug/wasmgate (built by `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "check-deploy: deploy/kubernetes.yaml"
if python3 -c "import yaml" 2>/dev/null || python3 -m pip install --quiet pyyaml; then
  python3 - <<'PY'
import yaml
docs = [d for d in yaml.safe_load_all(open("deploy/kubernetes.yaml")) if d]
kinds = [d["kind"] for d in docs]
assert kinds == ["ConfigMap", "Deployment", "Service"], kinds
svc = docs[2]["spec"]["ports"][0]
assert svc["protocol"] == "UDP", svc
config = docs[0]["data"]["wasmgate.toml"]
open("target/kubernetes-wasmgate.toml", "w").write(config)
print("check-deploy: manifest parses:", ", ".join(kinds))
# ConfigMap edits must reach the pod (a subPath mount is never updated), and a
# read-only root needs writable volumes for the compile cache and its key.
container = docs[1]["spec"]["template"]["spec"]["containers"][0]
mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
assert not any("subPath" in m for m in mounts.values()), "a subPath mount is never updated"
args = container["args"]
def arg(flag):
    return args[args.index(flag) + 1]
def mounted(path, writable):
    return any(path.startswith(p + "/") and (not writable or not m.get("readOnly")) for p, m in mounts.items())
assert mounted(arg("--config"), False), "the config file is not under a mounted directory"
assert mounted(arg("--cache-dir") + "/x", True) and mounted(arg("--cache-key"), True), "the cache is not writable"
assert not mounted(arg("--cache-key"), True) or not arg("--cache-key").startswith(arg("--cache-dir") + "/"), "the key is inside the cache"
print("check-deploy: no subPath; config, modules, cache and key on directory mounts")
PY
  # The ConfigMap's wasmgate.toml must be a config wasmgate accepts (its module
  # path only exists in the pod, so a stand-in module is put at a local path).
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cp examples/echo.wat "$tmp/handler.wasm"
  sed "s#/etc/wasmgate/modules/handler.wasm#$tmp/handler.wasm#; s#0.0.0.0:8008#127.0.0.1:0#; s#0.0.0.0:9090#127.0.0.1:0#" \
    target/kubernetes-wasmgate.toml > "$tmp/wasmgate.toml"
  target/debug/wasmgate --config "$tmp/wasmgate.toml" > "$tmp/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do grep -q '"serving"\| serving ' "$tmp/log" && break; sleep 0.1; done
  kill -TERM "$pid"; wait "$pid"
  grep -q 'listener="handler"' "$tmp/log" || { cat "$tmp/log"; echo "check-deploy: the ConfigMap's config did not serve" >&2; exit 1; }
  echo "check-deploy: the ConfigMap's wasmgate.toml serves and stops cleanly"
else
  echo "check-deploy: WARNING: PyYAML is unavailable; the Kubernetes manifest was NOT checked"
fi

# Every object against the Kubernetes API schema, strictly (an unknown or
# misspelt field fails): what kubeconform does, from PyPI.
if command -v kubernetes-validate >/dev/null 2>&1 || python3 -m pip install --quiet kubernetes-validate >/dev/null 2>&1; then
  python3 -m kubernetes_validate --strict --quiet deploy/kubernetes.yaml
  echo "check-deploy: every object of the manifest validates against the Kubernetes API schema (strict)"
else
  echo "check-deploy: WARNING: kubernetes-validate could not be installed; the manifest was NOT checked against the Kubernetes schema"
fi

echo "check-deploy: deploy/wasmgate.service"
if command -v systemd-analyze >/dev/null 2>&1; then
  unit=$(mktemp -d)/wasmgate.service
  sed "s#/usr/local/bin/wasmgate#$(pwd)/target/debug/wasmgate#" deploy/wasmgate.service > "$unit"
  systemd-analyze verify "$unit"
  echo "check-deploy: the unit passes systemd-analyze verify"
else
  echo "check-deploy: WARNING: systemd-analyze is unavailable; the unit was NOT verified"
fi

echo "check-deploy: Dockerfile"
grep -q '^FROM rust:.* AS build$' Dockerfile && grep -q '^COPY --from=build ' Dockerfile
echo "check-deploy: Dockerfile has a build stage and a runtime stage (no engine here to build it)"
