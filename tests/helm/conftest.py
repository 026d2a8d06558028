"""Render the Helm chart with the real helm 3 binary and hand the objects to the tests.

helm comes from `scripts/install-helm.sh` (.cache/bin/helm), `CHAINWATCH_HELM_BIN`, or PATH;
checkov from .cache/checkov-venv, `CHAINWATCH_CHECKOV_BIN`, or PATH. A missing helm fails
the tests (run `scripts/setup.sh --test`): a chart suite that silently skips proves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "chainwatch"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "cw"
NAMESPACE = "chainwatch"


def _tool(env: str, cached: Path, name: str) -> str:
    if os.environ.get(env):
        return os.environ[env]
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} not found: run scripts/install-helm.sh (or set {env})")


def helm_bin() -> str:
    return _tool("CHAINWATCH_HELM_BIN", ROOT / ".cache" / "bin" / "helm", "helm")


def checkov_bin() -> str:
    return _tool("CHAINWATCH_CHECKOV_BIN", ROOT / ".cache" / "checkov-venv" / "bin" / "checkov",
                 "checkov")


def helm(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_bin(), *map(str, args)], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def _json(value: Any) -> str:
    return json.dumps(value)


def template_text(
    values_files: Iterable[Path] = (),
    values: dict[str, Any] | None = None,
    chart: Path = CHART,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`helm template` with values files and `--set-json key=value` pairs."""
    args: list[str | Path] = ["template", RELEASE, chart, "--namespace", NAMESPACE]
    for f in values_files:
        args += ["-f", f]
    for key, value in (values or {}).items():
        args += ["--set-json", f"{key}={_json(value)}"]
    return helm(*args, check=check)


def render(
    values_files: Iterable[Path] = (),
    values: dict[str, Any] | None = None,
    chart: Path = CHART,
) -> list[dict[str, Any]]:
    """The rendered objects (empty documents dropped)."""
    text = template_text(values_files, values, chart).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_error(values: dict[str, Any], values_files: Iterable[Path] = (),
                 chart: Path = CHART) -> str:
    """helm's error for values that must be refused."""
    result = template_text(values_files, values, chart, check=False)
    assert result.returncode != 0, f"helm accepted {values}"
    return result.stderr


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [d for d in objects(docs, kind) if component is None
             or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def chart_copy(tmp_path: Path) -> Path:
    """A private copy of the chart, to add or remove files under files/ in a test."""
    dst = tmp_path / "chainwatch"
    shutil.copytree(CHART, dst)
    return dst


# Minimal values that render in each mode (RPC URLs given inline).
DISTRIBUTED = {
    "nodes": [{"name": "geth-1", "rpcSecretKey": "GETH1_RPC"}],
    "rpc": {"urls": {"GETH1_RPC": "http://geth-1:8545"}},
    "kafka": {"bootstrapServers": "kafka:9092"},
}
ALL_IN_ONE = {
    "mode": "all-in-one",
    "nodes": [{"name": "geth-1", "rpcSecretKey": "GETH1_RPC"}],
    "rpc": {"urls": {"GETH1_RPC": "http://geth-1:8545"}},
}
