#!/usr/bin/env bash
# Verifies the deployment files with the real tools (CI runs this after the tests):
#  1. hadolint on the Dockerfile;
#  2. for the default values and every helm/tessera/ci/*.yaml: helm lint --strict, helm template, and
#     kubernetes-validate --strict on what it renders;
#  3. every helm/tests/negative/*.yaml must be refused (helm template fails);
#  4. scripts/check_chart.py: every flag the chart passes to tessera exists in `tessera SUBCOMMAND --help`
#     of the binary given (default target/debug/tessera), and the ports agree.
# Usage: scripts/check-chart.sh [TESSERA_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(scripts/fetch-chart-tools.sh)
helm="$tools/helm"
py="$tools/venv/bin/python"
tessera=${1:-target/debug/tessera}
chart=helm/tessera
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "-- hadolint Dockerfile"
"$tools/venv/bin/hadolint" Dockerfile

echo "-- the Dockerfile's build stage copies every workspace member"
# A member left out fails `docker build` (the workspace manifest names it), which CI cannot run: it has no
# Docker engine. tessera-gguf was left out when it joined the workspace.
missing=$("$py" - <<'PY'
import re, tomllib
members = tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"]
copied = set(re.findall(r"^COPY\s+(\S+)\s+(?:\./)?\1/?\s*$", open("Dockerfile").read(), re.M))
print(" ".join(m for m in members + ["models", ".cargo", "scripts/protoc"] if m not in copied))
PY
)
[ -z "$missing" ] || { echo "Dockerfile: the build stage does not COPY $missing"; exit 1; }

sets=(default "$chart"/ci/*.yaml)
for set in "${sets[@]}"; do
  name=$(basename "$set" .yaml)
  args=()
  [ "$set" = default ] || args=(-f "$set")
  echo "-- $name: helm lint --strict, helm template, kubernetes-validate --strict"
  "$helm" lint --strict "$chart" "${args[@]}" >"$out/lint.txt" 2>&1 || { cat "$out/lint.txt"; exit 1; }
  "$helm" template tessera "$chart" --namespace serving "${args[@]}" >"$out/$name.yaml"
  "$tools/venv/bin/kubernetes-validate" --strict --quiet "$out/$name.yaml"
done

failed=0
for neg in helm/tests/negative/*.yaml; do
  if "$helm" template tessera "$chart" -f "$neg" >/dev/null 2>"$out/err.txt"; then
    echo "NOT REFUSED: $neg rendered without error"
    failed=1
  else
    echo "-- refused as it should be: $(basename "$neg"): $(grep -m1 -E 'error|Error|at ' "$out/err.txt" | cut -c1-150)"
  fi
done
[ "$failed" = 0 ]

echo "-- flags and ports against $tessera"
"$py" scripts/check_chart.py "$tessera" "$out"/*.yaml
echo "chart checks passed"
