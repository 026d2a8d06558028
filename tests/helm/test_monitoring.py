"""The chart's monitoring objects: ServiceMonitor, PrometheusRule, Grafana dashboards.

The PrometheusRule is rendered from the rule files in the chart's files/rules/ (generated
from alerts/ by `python -m alerts.render`), never from a hand-kept copy; the dashboards
from files/dashboards/*.json. The override logic is tested on a small rules file of its
own, written into a private copy of the chart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.conftest import (
    CHART,
    CI_VALUES,
    DISTRIBUTED,
    NAMESPACE,
    ROOT,
    chart_copy,
    objects,
    one,
    render,
    render_error,
)

EVERYTHING_ON = next(p for p in CI_VALUES if p.stem == "everything-on-values")
ON = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
      "dashboards": {"enabled": True}}
PROMTOOL = shutil.which("promtool")


def project_groups(rules_dir: Path = CHART / "files" / "rules") -> list[dict[str, Any]]:
    groups = []
    for path in sorted(rules_dir.glob("*.yaml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


# -- off by default, on when asked -------------------------------------------------------


def test_monitoring_objects_are_absent_when_disabled() -> None:
    docs = render(values=DISTRIBUTED)
    assert not objects(docs, "ServiceMonitor")
    assert not objects(docs, "PrometheusRule")
    assert not [d for d in objects(docs, "ConfigMap") if "grafana_dashboard" in
                d["metadata"]["labels"]]


def test_service_monitor_scrapes_every_metrics_service_under_the_rules_job_names() -> None:
    docs = render([EVERYTHING_ON])
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s"
    services = objects(docs, "Service")
    assert len(services) == 2
    selector = sm["spec"]["selector"]["matchLabels"]
    job_selectors = set()
    for group in project_groups():
        for rule in group["rules"]:
            job_selectors |= set(re.findall(r'job=~"([^"]+)"', rule["expr"]))
    for service in services:
        labels = service["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items())
        assert {p["name"] for p in service["spec"]["ports"]} == {"metrics"}
        job = labels[sm["spec"]["jobLabel"]]
        assert job == f"chainwatch-{labels['app.kubernetes.io/component']}"
        for regex in job_selectors:  # Prometheus anchors label regexes
            assert re.fullmatch(regex, job), f"the rules' job=~{regex!r} misses job {job}"


def test_prometheus_rule_equals_the_projects_rules() -> None:
    groups = project_groups()
    assert groups, "the chart holds the project's rules (python -m alerts.render)"
    # the chart's copy is the one alerts/ renders, not a hand-kept one
    for path in (CHART / "files" / "rules").glob("*.yaml"):
        source = ROOT / "alerts" / path.name
        assert yaml.safe_load(path.read_text()) == yaml.safe_load(source.read_text())
    rule = one(render(values={**DISTRIBUTED, "prometheusRule": {"enabled": True}}),
               "PrometheusRule")
    assert rule["spec"]["groups"] == groups
    assert rule["metadata"]["namespace"] == NAMESPACE


def test_dashboards_are_config_maps_for_the_grafana_sidecar() -> None:
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    docs = render([EVERYTHING_ON])
    maps = [d for d in objects(docs, "ConfigMap") if "grafana_dashboard" in
            d["metadata"]["labels"]]
    assert len(maps) == len(files)
    by_file = {key: cm for cm in maps for key in cm["data"]}
    for path in files:
        cm = by_file[path.name]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "chainwatch"}
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
        if (ROOT / "dashboards" / path.name).exists():  # the chart's copy is the project's
            assert path.read_text() == (ROOT / "dashboards" / path.name).read_text()


# -- rendering from whatever the chart holds: a test rules file and a test dashboard -----

TEST_RULES: dict[str, Any] = {  # a Prometheus rule file, as YAML loads it
    "groups": [
        {"name": "test.rules", "rules": [
            {"record": "test:up:sum", "expr": "sum(up)"},
        ]},
        {"name": "test.alerts", "interval": "1m", "rules": [
            {"alert": "TestDown", "expr": 'up{job=~"chainwatch.*"} == 0', "for": "5m",
             "labels": {"severity": "critical"},
             "annotations": {"summary": "Down.",
                             "description": "{{ $labels.instance }} is down.",
                             "runbook_url": "https://example.com/runbook.md#testdown"}},
            {"alert": "TestSlow", "expr": "rate(x[5m]) > 1", "for": "10m",
             "labels": {"severity": "warning"},
             "annotations": {"summary": "Slow."}},
            {"alert": "TestSlow", "expr": "rate(x[5m]) > 10", "for": "10m",
             "labels": {"severity": "critical"},
             "annotations": {"summary": "Very slow."}},
        ]},
        {"name": "test.only-one", "rules": [
            {"alert": "TestLonely", "expr": "vector(1)", "labels": {"severity": "info"}},
        ]},
    ]
}


@pytest.fixture
def test_chart(tmp_path: Path) -> Path:
    """A copy of the chart whose only rule file is TEST_RULES and that has no dashboards."""
    chart = chart_copy(tmp_path)
    rules = chart / "files" / "rules"
    shutil.rmtree(rules, ignore_errors=True)
    rules.mkdir(parents=True)
    (rules / "test.rules.yaml").write_text("# a test rule file\n" + yaml.safe_dump(TEST_RULES))
    shutil.rmtree(chart / "files" / "dashboards", ignore_errors=True)
    return chart


def _rules(chart: Path, **prometheus_rule: Any) -> list[dict[str, Any]]:
    docs = render(values={**DISTRIBUTED, "prometheusRule": {"enabled": True, **prometheus_rule}},
                  chart=chart)
    return one(docs, "PrometheusRule")["spec"]["groups"]


def test_rule_files_are_rendered_as_they_are(test_chart: Path) -> None:
    assert _rules(test_chart) == TEST_RULES["groups"]


def test_rule_overrides_disable_and_runbook_prefix(test_chart: Path, tmp_path: Path) -> None:
    groups = _rules(
        test_chart,
        disabled={"TestLonely": True, "test:up:sum": False},
        overrides={"TestSlow": {"for": "30m", "severity": "page"},
                   "TestDown": {"for": "1m"}},
        runbookUrlPrefix="https://runbooks.example.org/cw",
        additionalRuleLabels={"team": "node-ops", "severity": "ignored"},
    )
    # a group whose every rule is disabled is dropped; `false` keeps a rule
    assert [g["name"] for g in groups] == ["test.rules", "test.alerts"]
    assert groups[0] == TEST_RULES["groups"][0]  # recording rules are left alone
    assert groups[1]["interval"] == "1m"
    down, slow, very_slow = groups[1]["rules"]
    assert down["for"] == "1m"
    assert down["labels"] == {"severity": "critical", "team": "node-ops"}
    # the prefix replaces what is before '#', the anchor stays
    assert down["annotations"]["runbook_url"] == "https://runbooks.example.org/cw#testdown"
    assert down["annotations"]["description"] == "{{ $labels.instance }} is down."
    assert down["expr"] == TEST_RULES["groups"][1]["rules"][0]["expr"]
    # an override applies to every rule of that name
    for rule in (slow, very_slow):
        assert rule["for"] == "30m"
        assert rule["labels"] == {"severity": "page", "team": "node-ops"}
        # no runbook_url before: it gets the prefix and the alert's name as anchor
        assert rule["annotations"]["runbook_url"] == "https://runbooks.example.org/cw#testslow"
    assert [slow["expr"], very_slow["expr"]] == ["rate(x[5m]) > 1", "rate(x[5m]) > 10"]
    assert slow["annotations"]["summary"] == "Slow."

    if PROMTOOL:  # the result is still a valid Prometheus rule file
        path = tmp_path / "rendered.rules.yaml"
        path.write_text(yaml.safe_dump({"groups": groups}))
        result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_disabling_every_rule_renders_no_prometheus_rule(test_chart: Path) -> None:
    disabled = {name: True for name in ("test:up:sum", "TestDown", "TestSlow", "TestLonely")}
    docs = render(values={**DISTRIBUTED, "prometheusRule": {"enabled": True,
                                                            "disabled": disabled}},
                  chart=test_chart)
    assert not objects(docs, "PrometheusRule")


def test_overriding_an_unknown_alert_fails_clearly(test_chart: Path) -> None:
    error = render_error({**DISTRIBUTED, "prometheusRule": {
        "enabled": True, "overrides": {"TestDwn": {"for": "1m"}}}}, chart=test_chart)
    assert "prometheusRule.overrides.TestDwn: no alert of that name" in error
    assert "TestDown" in error  # the known names are listed
    error = render_error({**DISTRIBUTED, "prometheusRule": {
        "enabled": True, "overrides": {"test:up:sum": {"for": "1m"}}}}, chart=test_chart)
    assert "prometheusRule.overrides.test:up:sum: no alert of that name" in error


def test_a_chart_without_rule_files_or_dashboards_renders_none(test_chart: Path) -> None:
    shutil.rmtree(test_chart / "files")
    docs = render(values={**DISTRIBUTED, **ON}, chart=test_chart)
    assert not objects(docs, "PrometheusRule")
    assert [d["metadata"]["name"] for d in objects(docs, "ConfigMap")] == ["cw-chainwatch-nodes"]
    assert one(docs, "ServiceMonitor")


def test_an_invalid_rule_file_fails_clearly(test_chart: Path) -> None:
    (test_chart / "files" / "rules" / "broken.yaml").write_text("groups: [\n")
    error = render_error({**DISTRIBUTED, "prometheusRule": {"enabled": True}}, chart=test_chart)
    assert "files/rules/broken.yaml is not a valid rule file" in error


def test_one_config_map_per_dashboard_file(test_chart: Path) -> None:
    dashboards = test_chart / "files" / "dashboards"
    dashboards.mkdir()
    board = {"title": "Test board", "uid": "cw-test", "panels": [
        {"type": "stat", "targets": [{"expr": 'sum(up{job=~"chainwatch.*"})'}]}]}
    (dashboards / "chainwatch-test_board.json").write_text(json.dumps(board, indent=2))
    values = {**DISTRIBUTED, "dashboards": {
        "enabled": True, "namespace": "grafana", "label": "grafana_dashboard",
        "labelValue": "yes", "additionalLabels": {"team": "node-ops"}}}
    (cm,) = [d for d in objects(render(values=values, chart=test_chart), "ConfigMap")
             if "grafana_dashboard" in d["metadata"]["labels"]]
    assert cm["metadata"]["name"] == "cw-chainwatch-dashboard-test-board"
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "yes"
    assert cm["metadata"]["labels"]["team"] == "node-ops"
    # the JSON goes through untouched: Grafana's own {{ }} and ${} are not templated
    assert json.loads(cm["data"]["chainwatch-test_board.json"]) == board
