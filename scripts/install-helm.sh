#!/usr/bin/env bash
# Tools for the Helm chart's tests, installed under .cache; idempotent (skips what is there).
# - helm 3, built from the Go module proxy into .cache/bin with the ldflags of helm's own
#   Makefile (its version, and the Kubernetes version of its client-go as the default
#   for `helm lint` / `helm template`: without them a `go install`ed helm assumes 1.20);
# - checkov (the security scan), in its own venv .cache/checkov-venv: its dependencies
#   would downgrade the project's (packaging, ...), so it stays out of .venv.
# Prints the helm binary's path.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_KUBE_MINOR="${HELM_KUBE_MINOR:-37}"   # helm v3.22.0 builds with k8s.io/client-go v0.37
CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
BIN="$REPO/.cache/bin/helm"
mkdir -p "$REPO/.cache/bin"

if [ ! -x "$BIN" ] || ! "$BIN" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  command -v go >/dev/null || { echo "install-helm: Go is required" >&2; exit 1; }
  echo "install-helm: building helm $HELM_VERSION (a few minutes the first time)" >&2
  ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in pkg/chartutil pkg/lint/rules; do
    ldflags="$ldflags -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1"
    ldflags="$ldflags -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$HELM_KUBE_MINOR"
  done
  GOBIN="$REPO/.cache/bin" GOFLAGS=-mod=mod go install -ldflags "$ldflags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" > "$REPO/.cache/helm-build.log" 2>&1 \
    || { tail -20 "$REPO/.cache/helm-build.log" >&2; exit 1; }
fi

VENV="$REPO/.cache/checkov-venv"
if [ ! -x "$VENV/bin/checkov" ] || ! "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
  echo "install-helm: installing checkov $CHECKOV_VERSION into .cache/checkov-venv" >&2
  python3 -m venv "$VENV"
  {
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "checkov==$CHECKOV_VERSION"
  } > "$REPO/.cache/checkov-install.log" 2>&1 \
    || { tail -20 "$REPO/.cache/checkov-install.log" >&2; exit 1; }
fi
echo "$BIN"
