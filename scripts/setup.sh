#!/usr/bin/env bash
# Set up everything chainwatch needs on a fresh clone; safe to run again (it skips what is there).
#   scripts/setup.sh          Python venv + package + anvil (enough for the demo)
#   scripts/setup.sh --test   ... plus Kafka jars, geth, Prometheus/Alertmanager (for the tests)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.chainwatch-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python dependencies (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi

scripts/install-anvil.sh >/dev/null
if [ "${1:-}" = "--test" ]; then
  command -v java >/dev/null || { echo "setup: Java 17+ is required for the Kafka broker" >&2; exit 1; }
  scripts/install-kafka.sh >/dev/null
  scripts/install-geth.sh >/dev/null
  scripts/install-helm.sh >/dev/null
  if ! command -v promtool >/dev/null || ! command -v prometheus-alertmanager >/dev/null \
    || ! command -v chromium >/dev/null; then
    echo "setup: installing Prometheus, Alertmanager and Chromium (Debian packages)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus prometheus-alertmanager chromium >/dev/null
    # the packages may start system services; tests run their own servers on free ports
    pkill -x prometheus 2>/dev/null || true
    pkill -f prometheus-alertmanager 2>/dev/null || true
    pkill -f prometheus-node-exporter 2>/dev/null || true
  fi
fi
