#!/usr/bin/env bash
# One command from a fresh clone to the demo: set up, then `chainwatch demo`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"
exec "$REPO/.venv/bin/chainwatch" demo "$@"
