"""Security scan of what the chart renders, and of the Dockerfile, with checkov.

Zero failed checks. The checks skipped are listed below with their reasons (the same list
is in docs/helm.md): one is inherent to how chainwatch reads secrets, the others are
defaults an operator must choose (resources, digest, pull policy, NetworkPolicy); the
everything-on values make those choices, and there only the inherent skip remains.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helm.conftest import CI_VALUES, ROOT, checkov_bin, template_text

# Skipped for every rendered values file.
INHERENT = {
    # chainwatch reads the RPC URLs (`${VAR}` in the nodes file) and the SASL password
    # (CHAINWATCH_KAFKA_SASL_PASSWORD) from its environment only; the chart fills them
    # with secretKeyRef, never with plain values.
    "CKV_K8S_35": "Prefer using secrets as files over secrets as environment variables",
}
# Skipped where the values leave the choice to the operator (the chart's defaults).
DEFAULTS = {
    # no default requests/limits (prometheus-community and bitnami convention): the right
    # size depends on the number of nodes followed; `*.resources` sets them.
    "CKV_K8S_10": "CPU requests should be set",
    "CKV_K8S_11": "CPU limits should be set",
    "CKV_K8S_12": "Memory requests should be set",
    "CKV_K8S_13": "Memory limits should be set",
    # the default image is the chart's appVersion tag; `image.digest` pins a digest.
    "CKV_K8S_43": "Image should use digest",
    # IfNotPresent is the convention for a fixed, versioned tag; `image.pullPolicy`.
    "CKV_K8S_15": "Image Pull Policy should be Always",
    # the NetworkPolicy is optional (`networkPolicy.enabled`): the nodes' and Kafka's
    # addresses are site-specific, so it is off by default.
    "CKV2_K8S_6": "Minimize the admission of pods which lack an associated NetworkPolicy",
}
SKIPS = {
    "distributed-values": {**INHERENT, **DEFAULTS},
    "all-in-one-values": {**INHERENT, **DEFAULTS},
    "everything-on-values": INHERENT,
}


def checkov(target: list[str], framework: str, skips: dict[str, str]) -> dict:
    args = [checkov_bin(), *target, "--framework", framework, "--quiet", "--compact",
            "--skip-download", "-o", "json"]
    if skips:
        args += ["--skip-check", ",".join(sorted(skips))]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON report (exit {result.returncode}):\n"
                    f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return report


def failures(report: dict) -> list[str]:
    return [f"{c['check_id']} {c['check_name']}: {c['resource']}"
            for c in report["results"]["failed_checks"]]


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_rendered_chart_passes_checkov(values: Path, tmp_path: Path) -> None:
    assert set(SKIPS) == {p.stem for p in CI_VALUES}
    manifest = tmp_path / values.stem / "manifest.yaml"
    manifest.parent.mkdir()
    manifest.write_text(template_text([values]).stdout)
    report = checkov(["-d", str(manifest.parent)], "kubernetes", SKIPS[values.stem])
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 50  # it did scan the workloads
    assert failures(report) == []


def test_skipped_checks_are_still_needed(tmp_path: Path) -> None:
    """A skip that no longer hides a failure is dropped from the list (and the docs)."""
    values = next(p for p in CI_VALUES if p.stem == "distributed-values")
    (tmp_path / "manifest.yaml").write_text(template_text([values]).stdout)
    report = checkov(["-d", str(tmp_path)], "kubernetes", {})
    failed = {c["check_id"] for c in report["results"]["failed_checks"]}
    assert failed == set(SKIPS["distributed-values"])


def test_skips_are_documented() -> None:
    doc = (ROOT / "docs" / "helm.md").read_text()
    for check in {**INHERENT, **DEFAULTS}:
        assert check in doc, f"{check} is skipped but not explained in docs/helm.md"


def test_dockerfile_passes_checkov() -> None:
    report = checkov(["-f", str(ROOT / "Dockerfile")], "dockerfile", {})
    assert report["summary"]["passed"] > 10
    assert failures(report) == []
