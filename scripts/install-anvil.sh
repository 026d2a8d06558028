#!/usr/bin/env bash
# Install Foundry's anvil dev node from npm into the repo's ignored .cache/npm.
# npm ships the prebuilt binary inside a registry package, so this works where direct
# downloads of release binaries do not. Idempotent: skips when the binary already runs.
set -euo pipefail

ANVIL_VERSION="${ANVIL_VERSION:-1.7.1}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$REPO/.cache/npm"
BIN="$PREFIX/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    echo "anvil already installed: $("$BIN" --version | head -n1)" >&2
    echo "$BIN"
    exit 0
fi

command -v npm >/dev/null || { echo "npm not found: install nodejs/npm first" >&2; exit 1; }
mkdir -p "$PREFIX"
# --no-save keeps npm from writing a package.json/lock we do not want to maintain.
npm install --silent --no-audit --no-fund --no-save --prefix "$PREFIX" \
    "@foundry-rs/anvil@$ANVIL_VERSION" >&2

if [[ ! -f "$BIN" ]]; then
    echo "anvil binary not found at $BIN after npm install" >&2
    exit 1
fi
# npm does not always keep the exec bit on files that are not declared as "bin".
chmod +x "$BIN"
"$BIN" --version >&2
echo "$BIN"
