#!/usr/bin/env bash
# Build geth (a real p2p Ethereum node, for peer tests) from the Go module proxy into .cache/bin.
# Idempotent: skips when the binary is there.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GETH_VERSION="${GETH_VERSION:-v1.17.10}"
BIN="$REPO/.cache/bin/geth"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null || { echo "install-geth: Go is required" >&2; exit 1; }
mkdir -p "$REPO/.cache/bin"
echo "install-geth: building geth $GETH_VERSION (a few minutes the first time)" >&2
GOBIN="$REPO/.cache/bin" GOFLAGS=-mod=mod go install "github.com/ethereum/go-ethereum/cmd/geth@$GETH_VERSION" \
  > "$REPO/.cache/geth-build.log" 2>&1 || { tail -20 "$REPO/.cache/geth-build.log" >&2; exit 1; }
echo "$BIN"
