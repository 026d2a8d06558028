"""The Helm chart: lint, valid objects, both modes, safe defaults, secrets, labels, values.

Everything is rendered by the real helm binary (`helm template`); see conftest.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chainwatch.nodes import load_nodes
from chainwatch.settings import Settings, load_settings
from tests.helm.conftest import (
    ALL_IN_ONE,
    CHART,
    CI_VALUES,
    DISTRIBUTED,
    NAMESPACE,
    RELEASE,
    ROOT,
    chart_copy,
    helm,
    objects,
    one,
    render,
    render_error,
    template_text,
)
from tests.helm.crd_schemas import SCHEMAS

CI = {p.stem: p for p in CI_VALUES}
KUBE_VERSION = "1.37.0"


def containers(deploy: dict[str, Any]) -> list[dict[str, Any]]:
    return deploy["spec"]["template"]["spec"]["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    secret = next(d for d in objects(docs, "Secret") if d["metadata"]["name"] == name)
    assert "stringData" not in secret
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


# -- lint and validity -------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=["defaults", *CI])
def test_helm_lint_strict(values: Path | None) -> None:
    args: list[str | Path] = ["lint", "--strict", CHART]
    if values:
        args += ["-f", values]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_ci_values_cover_both_modes_and_every_optional_object() -> None:
    assert set(CI) == {"distributed-values", "all-in-one-values", "everything-on-values"}
    kinds = {d["kind"] for d in render([CI["everything-on-values"]])}
    assert kinds >= {"Deployment", "Service", "ServiceAccount", "ConfigMap",
                     "PersistentVolumeClaim", "PodDisruptionBudget", "NetworkPolicy",
                     "ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("values", CI_VALUES, ids=list(CI))
def test_every_rendered_object_is_valid(values: Path) -> None:
    """Kubernetes kinds against the bundled schemas (strict: no unknown field); the two
    Prometheus Operator kinds against tests/helm/crd_schemas.py; nothing else renders."""
    docs = render([values])
    assert docs
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in SCHEMAS:
            try:
                jsonschema.validate(doc, SCHEMAS[doc["kind"]])
            except jsonschema.ValidationError as exc:
                pytest.fail(f"{name}: {exc.message} at {list(exc.absolute_path)}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")
        assert doc["metadata"]["namespace"] == NAMESPACE, name


# -- wrong values fail at install with a clear message ----------------------------------


def test_defaults_alone_refuse_to_install_and_say_what_is_missing() -> None:
    assert "set `nodes`, the nodes to follow" in render_error({})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "kafka"}, "at '/mode': value must be one of 'distributed', 'all-in-one'"),
        ({"detector": {"replicas": 2}}, "additional properties 'replicas' not allowed"),
        ({"detector": {"replicaCount": 0}}, "at '/detector/replicaCount'"),
        ({"nodes": [{"name": "geth 1", "rpcSecretKey": "K"}]}, "at '/nodes/0/name'"),
        ({"nodes": [{"name": "geth-1", "rpc": "http://geth:8545"}]},
         "additional properties 'rpc' not allowed"),
        ({"rpc": {"urls": {"K": "ftp://geth"}}}, "at '/rpc/urls/K'"),
        ({"kafka": {"securityProtocol": "TLS"}}, "at '/kafka/securityProtocol'"),
        ({"kafka": {"bootstrapServers": "kafka"}}, "at '/kafka/bootstrapServers'"),
        ({"startBlock": -1}, "at '/startBlock'"),
        ({"prometheusRule": {"overrides": {"ChainwatchNodeLagging": {"for": "soon"}}}},
         "at '/prometheusRule/overrides/ChainwatchNodeLagging/for'"),
        ({"serviceMonitor": {"interval": "30"}}, "at '/serviceMonitor/interval'"),
        ({"image": {"digest": "latest"}}, "at '/image/digest'"),
    ],
)
def test_schema_refuses_wrong_values(values: dict[str, Any], message: str) -> None:
    assert message in render_error({**DISTRIBUTED, **values})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka": {"bootstrapServers": ""}}, "distributed mode needs kafka.bootstrapServers"),
        ({"nodes": [{"name": "geth-1", "rpcSecretKey": "MISSING"}]},
         'nodes refer to Secret key "MISSING": add it to rpc.urls'),
        ({"nodes": [{"name": "a", "rpcSecretKey": "GETH1_RPC"},
                    {"name": "a", "rpcSecretKey": "GETH1_RPC"}]}, 'duplicate node name "a"'),
        ({"kafka": {"bootstrapServers": "k:9092", "securityProtocol": "SASL_SSL",
                    "sasl": {"mechanism": "PLAIN", "username": "cw"}}},
         "SASL_SSL needs kafka.sasl.existingSecret (or kafka.sasl.password)"),
        ({"kafka": {"bootstrapServers": "k:9092", "sasl": {"password": "x"}}},
         "kafka.sasl.* is set but kafka.securityProtocol is PLAINTEXT"),
        ({"kafka": {"bootstrapServers": "k:9092", "tls": {"caSecret": "ca"}}},
         "kafka.tls.caSecret is set but kafka.securityProtocol is PLAINTEXT"),
        ({"collector": {"enabled": False}, "detector": {"enabled": False}}, "nothing to run"),
        ({"prometheusRule": {"enabled": True, "disabled": {"ChainwatchTypo": True}}},
         "prometheusRule.disabled.ChainwatchTypo: no rule of that name"),
    ],
)
def test_template_refuses_inconsistent_values(values: dict[str, Any], message: str) -> None:
    assert message in render_error({**DISTRIBUTED, **values})


# -- the two modes -----------------------------------------------------------------------


def test_distributed_mode_runs_a_collector_and_a_detector_consumer_group() -> None:
    docs = render([CI["distributed-values"]])
    deployments = objects(docs, "Deployment")
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments} == {
        "collector", "detector"}

    collector = one(docs, "Deployment", "collector")
    assert collector["spec"]["replicas"] == 1
    assert collector["spec"]["strategy"] == {"type": "Recreate"}
    assert containers(collector)[0]["args"] == ["collect"]

    detector = one(docs, "Deployment", "detector")
    assert detector["spec"]["replicas"] == 3
    assert containers(detector)[0]["args"] == ["detect"]
    env = env_of(containers(detector)[0])
    assert env["CHAINWATCH_GROUP"]["value"] == "chainwatch-detector"
    assert env["CHAINWATCH_KAFKA"]["value"] == "kafka-0.kafka:9093,kafka-1.kafka:9093"
    assert "CHAINWATCH_NODES" not in env  # detectors follow no node
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"]
            for s in objects(docs, "Service")} == {"collector", "detector"}


def test_all_in_one_mode_is_one_pod_on_the_embedded_bus() -> None:
    docs = render([CI["all-in-one-values"]])
    (deploy,) = objects(docs, "Deployment")
    assert deploy["metadata"]["labels"]["app.kubernetes.io/component"] == "all-in-one"
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = containers(deploy)
    assert container["args"] == ["run"]
    env = env_of(container)
    assert not [name for name in env if name.startswith("CHAINWATCH_KAFKA")]
    assert "CHAINWATCH_GROUP" not in env
    assert env["CHAINWATCH_START_BLOCK"]["value"] == "21000000"
    assert len(objects(docs, "Service")) == 1


def test_all_in_one_ignores_kafka_values_and_fixes_replicas() -> None:
    docs = render(values={**ALL_IN_ONE, "kafka": {"bootstrapServers": "kafka:9092"},
                          "detector": {"replicaCount": 5}})
    (deploy,) = objects(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert "CHAINWATCH_KAFKA" not in env_of(containers(deploy)[0])


def test_detectors_alone_need_no_nodes() -> None:
    """Collectors can run next to each node elsewhere; here only the consumer group."""
    docs = render(values={"kafka": {"bootstrapServers": "kafka:9092"},
                          "collector": {"enabled": False}})
    assert [d["metadata"]["labels"]["app.kubernetes.io/component"]
            for d in objects(docs, "Deployment")] == ["detector"]
    assert not objects(docs, "Secret")
    assert not objects(docs, "ConfigMap")


# -- the container's configuration is what chainwatch reads -----------------------------


def _pod_environment(docs: list[dict[str, Any]], deploy: dict[str, Any],
                     existing: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment the container would get: values, and secretKeyRefs resolved from
    the rendered Secrets (or the `existing` ones the values name)."""
    out = {}
    for name, entry in env_of(containers(deploy)[0]).items():
        if "value" in entry:
            out[name] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        secret = existing.get(ref["name"]) or secret_data(docs, ref["name"])
        out[name] = secret[ref["key"]]
    return out


def _mounts(deploy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount path -> the volume behind it."""
    spec = deploy["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: {**volumes[m["name"]], "mount": m}
            for m in containers(deploy)[0]["volumeMounts"]}


@pytest.mark.parametrize("component", ["collector", "detector"])
def test_distributed_env_is_what_chainwatch_settings_read(
    component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every CHAINWATCH_* variable the chart sets is a chainwatch setting (pydantic ignores
    unknown ones, so a typo would be lost silently), and together they give the values."""
    docs = render([CI["distributed-values"]])
    deploy = one(docs, "Deployment", component)
    env = _pod_environment(docs, deploy, {})
    fields = {f"CHAINWATCH_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in env if n.startswith("CHAINWATCH_")} <= fields

    for name in list(os.environ):
        if name.startswith("CHAINWATCH_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.kafka == "kafka-0.kafka:9093,kafka-1.kafka:9093"
    assert settings.topic_prefix == "mainnet"
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka_sasl_username == "chainwatch"
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "ci-sasl-password-9d8e7f"
    assert settings.metrics_port == 9108 == containers(deploy)[0]["ports"][0]["containerPort"]
    assert settings.log_json is True

    mounts = _mounts(deploy)
    assert settings.kafka_ssl_cafile is not None
    ca = Path(settings.kafka_ssl_cafile)
    assert mounts[str(ca.parent)]["secret"]["secretName"] == "kafka-ca"
    assert {"key": "ca.crt", "path": ca.name} in mounts[str(ca.parent)]["secret"]["items"]
    if component == "collector":
        assert mounts[str(settings.state_dir)]["emptyDir"] == {}
        assert mounts[str(settings.nodes)]["configMap"]["name"] == f"{RELEASE}-chainwatch-nodes"
    else:
        assert settings.group == "chainwatch-detector"
        assert settings.nodes is None


def test_nodes_file_holds_placeholders_that_the_secret_fills(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ConfigMap's nodes.yaml has ${KEY} only; with the container's environment
    chainwatch's own loader turns it into the nodes with their real URLs."""
    docs = render([CI["distributed-values"]])
    collector = one(docs, "Deployment", "collector")
    cm = next(d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].endswith("-nodes"))
    text = cm["data"]["nodes.yaml"]
    assert "://" not in text
    path = tmp_path / "nodes.yaml"
    path.write_text(text)
    for name, value in _pod_environment(docs, collector, {}).items():
        monkeypatch.setenv(name, value)
    nodes = {n.name: n for n in load_nodes(path)}
    assert nodes["geth-1"].rpc.get_secret_value() == (
        "https://geth-1.example.net:8545/ci-rpc-key-4f1b2c")
    assert nodes["geth-1"].ws is not None
    assert nodes["geth-1"].ws.get_secret_value() == (
        "wss://geth-1.example.net:8546/ci-rpc-key-4f1b2c")
    assert nodes["geth-1"].expected_block_time == 12
    assert nodes["nethermind-1"].ws is None
    assert nodes["nethermind-1"].mempool is False and nodes["nethermind-1"].peers is False


def test_existing_secret_is_referenced_and_no_secret_is_rendered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    docs = render([CI["all-in-one-values"]])
    assert not objects(docs, "Secret")
    deploy = one(docs, "Deployment", "all-in-one")
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env_of(containers(deploy)[0]).values()
            if "valueFrom" in e}
    assert refs == {"chainwatch-node-urls"}
    existing = {"chainwatch-node-urls": {"GETH1_RPC": "http://10.0.0.5:8545",
                                         "GETH1_WS": "ws://10.0.0.5:8546"}}
    cm = one(docs, "ConfigMap")
    (tmp_path / "nodes.yaml").write_text(cm["data"]["nodes.yaml"])
    for name, value in _pod_environment(docs, deploy, existing).items():
        monkeypatch.setenv(name, value)
    (node,) = load_nodes(tmp_path / "nodes.yaml")
    assert node.ws is not None
    assert node.ws.get_secret_value() == "ws://10.0.0.5:8546"

    docs = render([CI["everything-on-values"]])
    assert not objects(docs, "Secret")
    for deploy in objects(docs, "Deployment"):
        env = env_of(containers(deploy)[0])
        assert env["CHAINWATCH_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "chainwatch-kafka", "key": "sasl-password"}


def test_secrets_are_never_rendered_in_plain_text() -> None:
    """URLs and the SASL password appear only base64-encoded in Secret data: not in the
    ConfigMap, not in arguments, not in env values, not anywhere else."""
    ci = yaml.safe_load(CI["distributed-values"].read_text())
    secrets = [*ci["rpc"]["urls"].values(), ci["kafka"]["sasl"]["password"]]
    text = template_text([CI["distributed-values"]]).stdout
    docs = [d for d in yaml.safe_load_all(text) if d]
    for secret in secrets:
        assert secret not in text
        assert secret.split("://")[-1] not in text  # not even without its scheme
    encoded = {v for d in objects(docs, "Secret") for v in d["data"].values()}
    for secret in secrets:
        assert base64.b64encode(secret.encode()).decode() in encoded
    for deploy in objects(docs, "Deployment"):
        (container,) = containers(deploy)
        assert all("://" not in arg for arg in container.get("args", []))
        assert all("://" not in str(e.get("value", "")) for e in container["env"])


# -- safe defaults -----------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=list(CI))
def test_pods_are_locked_down(values: Path) -> None:
    docs = render([values])
    (sa,) = objects(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for deploy in objects(docs, "Deployment"):
        pod = deploy["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == sa["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 10000
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
            assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
            assert [p["name"] for p in c["ports"]] == ["metrics"]
            # the root filesystem is read-only: /tmp is an emptyDir
            assert _mounts(deploy)["/tmp"]["emptyDir"] == {}


def test_no_resources_by_default_and_given_ones_are_used() -> None:
    for values in (CI["distributed-values"], CI["all-in-one-values"]):
        for deploy in objects(render([values]), "Deployment"):
            assert "resources" not in containers(deploy)[0]
    docs = render([CI["everything-on-values"]])
    ci = yaml.safe_load(CI["everything-on-values"].read_text())
    for component in ("collector", "detector"):
        assert containers(one(docs, "Deployment", component))[0]["resources"] == (
            ci[component]["resources"])


def test_optional_objects_are_off_by_default() -> None:
    for docs in (render(values=DISTRIBUTED), render(values=ALL_IN_ONE)):
        kinds = {d["kind"] for d in docs}
        assert kinds.isdisjoint({"ServiceMonitor", "PrometheusRule", "PodDisruptionBudget",
                                 "NetworkPolicy", "PersistentVolumeClaim"})
        assert [d["metadata"]["name"] for d in objects(docs, "ConfigMap")] == [
            f"{RELEASE}-chainwatch-nodes"]


def test_persistence_keeps_the_collectors_checkpoints_on_a_claim() -> None:
    docs = render([CI["everything-on-values"]])
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    collector = one(docs, "Deployment", "collector")
    assert _mounts(collector)["/var/lib/chainwatch"]["persistentVolumeClaim"] == {
        "claimName": pvc["metadata"]["name"]}
    assert "/var/lib/chainwatch" not in _mounts(one(docs, "Deployment", "detector"))

    docs = render(values={**ALL_IN_ONE, "persistence": {"enabled": True,
                                                         "existingClaim": "my-claim"}})
    assert not objects(docs, "PersistentVolumeClaim")
    deploy = one(docs, "Deployment", "all-in-one")
    assert _mounts(deploy)["/var/lib/chainwatch"]["persistentVolumeClaim"] == {
        "claimName": "my-claim"}


def test_pod_disruption_budget_and_network_policy_when_enabled() -> None:
    docs = render([CI["everything-on-values"]])
    pdb = one(docs, "PodDisruptionBudget")
    detector = one(docs, "Deployment", "detector")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == detector["spec"]["selector"]
    other = render(values={**DISTRIBUTED, "detector": {"podDisruptionBudget": {
        "enabled": True, "minAvailable": "50%"}}})
    spec = one(other, "PodDisruptionBudget")["spec"]
    assert spec["minAvailable"] == "50%" and "maxUnavailable" not in spec

    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]
    egress_ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert egress_ports == [53, 53, 8545, 8546, 9092]
    for deploy in objects(docs, "Deployment"):
        assert _selects(policy["spec"]["podSelector"]["matchLabels"], deploy)

    docs = render(values={**DISTRIBUTED, "networkPolicy": {"enabled": True}})
    assert one(docs, "NetworkPolicy")["spec"]["egress"] == [{}]


# -- labels and selectors ----------------------------------------------------------------

STANDARD = ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
            "app.kubernetes.io/version", "app.kubernetes.io/managed-by")
STABLE = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


def _pod_labels(deploy: dict[str, Any]) -> dict[str, str]:
    return deploy["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], deploy: dict[str, Any]) -> bool:
    labels = _pod_labels(deploy)
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("values", CI_VALUES, ids=list(CI))
def test_labels_and_selectors_are_consistent(values: Path) -> None:
    docs = render([values])
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for key in STANDARD:
            assert key in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks {key}"
        assert labels["app.kubernetes.io/name"] == "chainwatch"
        assert labels["app.kubernetes.io/instance"] == RELEASE
    deployments = objects(docs, "Deployment")
    for deploy in deployments:
        selector = deploy["spec"]["selector"]["matchLabels"]
        # selectors are immutable: only labels that never change on upgrade
        assert set(selector) == STABLE
        assert _selects(selector, deploy)
        assert [d for d in deployments if _selects(selector, d)] == [deploy]
    for service in objects(docs, "Service"):
        selected = [d for d in deployments if _selects(service["spec"]["selector"], d)]
        assert len(selected) == 1
        assert set(service["spec"]["selector"]) == STABLE
        assert service["spec"]["publishNotReadyAddresses"] is True
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] in {p["name"] for p in containers(selected[0])[0]["ports"]}


# -- image -------------------------------------------------------------------------------


def test_image_tag_follows_the_charts_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    docs = render(values=DISTRIBUTED)
    for deploy in objects(docs, "Deployment"):
        assert containers(deploy)[0]["image"] == (
            f"ghcr.io/chainwatch/chainwatch:{chart['appVersion']}")
        assert deploy["metadata"]["labels"]["app.kubernetes.io/version"] == chart["appVersion"]
    docs = render(values={**DISTRIBUTED, "image": {"tag": "0.2.0-rc1"}})
    assert containers(one(docs, "Deployment", "collector"))[0]["image"].endswith(":0.2.0-rc1")
    docs = render([CI["everything-on-values"]])
    assert re.fullmatch(r"ghcr\.io/chainwatch/chainwatch@sha256:[0-9a-f]{64}",
                        containers(one(docs, "Deployment", "detector"))[0]["image"])


def test_dockerfile_builds_a_non_root_image_of_this_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) >= 2, "multi-stage build"
    last_user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
    uid = int(last_user.split(":")[0])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert uid == values["securityContext"]["runAsUser"] == values["podSecurityContext"][
        "runAsUser"]
    assert re.search(r'^ENTRYPOINT \["chainwatch"\]', text, re.M)
    # every package the distribution installs is copied into the build stage
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    for package in (p.rstrip("*") for p in packages):
        assert re.search(rf"^COPY {package} \./{package}$", text, re.M), package
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".cache", ".git"):
        assert path in dockerignore or f"{path}/" in dockerignore


# -- values are documented ---------------------------------------------------------------


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in (
                "podSecurityContext", "securityContext"):
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out


def test_every_value_is_in_the_schema_and_the_readme() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (ROOT / "helm" / "README.md").read_text()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for path in _leaves(values):
        node = schema
        for part in path.split("."):
            node = node["properties"][part]
        assert node.get("description"), f"{path} has no description in values.schema.json"
        assert f"`{path}`" in readme, f"{path} is not in the values table of helm/README.md"


def _notes(tmp_path: Path, values: dict[str, Any]) -> str:
    """NOTES.txt as helm renders it. `helm template` leaves NOTES out and `helm install
    --dry-run` wants a cluster, so a copy of the chart wraps it in a ConfigMap."""
    chart = chart_copy(tmp_path)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "zz-notes-under-test.yaml").write_text(
        '{{- define "notes-under-test" }}' + notes + "{{- end }}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-under-test\n"
        'data:\n  notes: {{ include "notes-under-test" . | toJson }}\n'
    )
    docs = render(values=values, chart=chart)
    cm = next(d for d in docs if d["metadata"]["name"] == "notes-under-test")
    shutil.rmtree(chart)
    return cm["data"]["notes"]


def test_notes_tell_the_truth(tmp_path: Path) -> None:
    text = _notes(tmp_path, DISTRIBUTED)
    assert "mode distributed" in text
    assert f"Deployment {RELEASE}-chainwatch-collector (`chainwatch collect`, 1 replica)" in text
    assert "Kafka kafka:9092 (PLAINTEXT), topics chainwatch.*" in text
    assert "consumer group chainwatch-detector" in text
    assert "Nodes followed: geth-1" in text
    assert "Checkpoints are on an emptyDir: a restarted collector has none, so it starts " \
           "again at\nthe head" in text
    assert "No ServiceMonitor" in text and "No PrometheusRule" in text
    assert "stay idle" not in text

    text = _notes(tmp_path, {**ALL_IN_ONE, "persistence": {"enabled": True}, "startBlock": 7})
    assert "mode all-in-one" in text and "embedded bus; no Kafka" in text
    assert f"PersistentVolumeClaim {RELEASE}-chainwatch-state: a restarted collector resumes" \
        in text
    assert "emptyDir" not in text and "Kafka kafka" not in text

    text = _notes(tmp_path, {**DISTRIBUTED, "detector": {"replicaCount": 8}})
    assert "so 2 of the 8 detectors stay idle" in text

    text = _notes(tmp_path, {**DISTRIBUTED, "serviceMonitor": {"enabled": True},
                             "prometheusRule": {"enabled": True},
                             "dashboards": {"enabled": True}})
    rules = _project_rule_counts()
    if rules["alerts"]:
        assert (f"{rules['alerts']} alerting and {rules['records']} recording rules"
                in text)
    assert "ServiceMonitor cw-chainwatch: scrapes every pod" in text
    dashboards = len(list((CHART / "files" / "dashboards").glob("*.json")))
    if dashboards:
        assert f"{dashboards} Grafana dashboard ConfigMap(s)" in text


def _project_rule_counts() -> dict[str, int]:
    counts = {"alerts": 0, "records": 0}
    for path in (CHART / "files" / "rules").glob("*.yaml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                counts["alerts" if "alert" in rule else "records"] += 1
    return counts
