#!/usr/bin/env bash
# One command from a fresh clone to the whole test suite: set up (Python deps, anvil, Kafka
# jars), lint and type-check, then every test, unit and integration (real Kafka and anvil
# on 127.0.0.1).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/mypy  # the packages listed in pyproject.toml's [tool.mypy]
exec .venv/bin/pytest "$@"
