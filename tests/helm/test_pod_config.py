"""The chart's pods, as configured, run chainwatch: real anvil, real Kafka, real processes.

No cluster here, so each container is played the way the kubelet would set it up from
the rendered objects: its args, its env (secretKeyRefs resolved from the rendered or the
"existing" Secret), its volumes (the nodes ConfigMap written to a file at the mounted
path, emptyDirs as temp dirs). Only the metrics port is moved to a free one, since two
"pods" share this host's network. If the chart's env names, paths or mounts did not match
what chainwatch reads, these processes would not follow the node.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chainwatch.local.anvil import Anvil
from chainwatch.local.kafka import KafkaBroker
from chainwatch.local.procs import free_port, spawn, stop_pid
from tests.helm.conftest import objects, one, render
from tests.helm.test_chart import secret_data
from tests.integration.conftest import metric, wait_until
from tests.servers import anvil_fixture, kafka_fixture

pytestmark = pytest.mark.integration

NODE = {"name": "anvil-1", "rpcSecretKey": "ANVIL1_RPC", "wsSecretKey": "ANVIL1_WS",
        "expectedBlockTime": 1}
LABELS = {"chain_id": "31337", "node": "anvil-1"}


kafka = kafka_fixture(scope="module", num_partitions=1)
anvil = anvil_fixture(no_mining=True)


class Pod:
    """One chart container played as a local process."""

    def __init__(self, docs: list[dict[str, Any]], component: str, root: Path,
                 existing: dict[str, dict[str, str]] | None = None) -> None:
        deploy = one(docs, "Deployment", component)
        spec = deploy["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        self.args = container["args"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        paths: dict[str, Path] = {}  # mount path in the pod -> local path
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            local = root / component / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                cm = next(d for d in objects(docs, "ConfigMap")
                          if d["metadata"]["name"] == volume["configMap"]["name"])
                for key, text in cm["data"].items():
                    (local / key).write_text(text)
                if "subPath" in mount:
                    local = local / mount["subPath"]
            else:
                assert "emptyDir" in volume, f"unexpected volume {volume}"
            paths[mount["mountPath"]] = local
        self.env: dict[str, str] = {}
        for entry in container["env"]:
            if "value" in entry:
                value = entry["value"]
                for mount_path, local in paths.items():
                    if value == mount_path or value.startswith(mount_path + "/"):
                        value = str(local) + value[len(mount_path):]
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                secret = (existing or {}).get(ref["name"]) or secret_data(docs, ref["name"])
                value = secret[ref["key"]]
            self.env[entry["name"]] = value
        assert self.env["CHAINWATCH_METRICS_PORT"] == str(container["ports"][0]["containerPort"])
        self.port = free_port()
        self.env["CHAINWATCH_METRICS_PORT"] = str(self.port)
        self.log = root / f"{component}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Pod:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CHAINWATCH_")}
        with self.log.open("ab") as out:
            self.proc = spawn([sys.executable, "-m", "chainwatch.cli", *self.args],
                              env={**base, **self.env}, stdout=out, stderr=subprocess.STDOUT)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    try:
        yield started
    finally:
        for pod in started:
            pod.stop()


def wait(pods: list[Pod], check: Any, timeout: float, what: str) -> None:
    """wait_until, with the pods' output in the failure."""
    try:
        wait_until(check, timeout, what)
    except AssertionError as exc:
        logs = "".join(f"\n--- {p.log.name} ---\n{p.output()[-3000:]}" for p in pods)
        raise AssertionError(f"{exc}{logs}") from None


def test_all_in_one_pod_follows_the_node(anvil: Anvil, pods: list[Pod], tmp_path: Path) -> None:
    docs = render(values={"mode": "all-in-one", "nodes": [NODE], "startBlock": 0,
                          "rpc": {"existingSecret": "node-urls"}})
    urls = {"node-urls": {"ANVIL1_RPC": anvil.http_url, "ANVIL1_WS": anvil.ws_url}}
    pod = Pod(docs, "all-in-one", tmp_path, existing=urls)
    assert pod.args == ["run"]
    pods.append(pod.start())
    anvil.rpc("anvil_mine", ["0x5"])
    wait(pods, lambda: metric(pod.port, "chainwatch_head_block_number", LABELS) == 5, 60,
         "the all-in-one pod to see block 5")
    wait(pods, pod.ready, 30, "/readyz to answer 200")
    # the checkpoint went to the state dir volume
    assert list((tmp_path / "all-in-one" / "state").iterdir())


def test_distributed_pods_follow_the_node_through_kafka(
    anvil: Anvil, kafka: KafkaBroker, pods: list[Pod], tmp_path: Path
) -> None:
    prefix = f"helm{uuid.uuid4().hex[:8]}"
    docs = render(values={
        "nodes": [NODE], "startBlock": 0,
        "rpc": {"urls": {"ANVIL1_RPC": anvil.http_url, "ANVIL1_WS": anvil.ws_url}},
        "kafka": {"bootstrapServers": kafka.bootstrap, "topicPrefix": prefix, "partitions": 1},
        "detector": {"consumerGroup": f"{prefix}-detector"},
    })
    collector = Pod(docs, "collector", tmp_path)
    detector = Pod(docs, "detector", tmp_path)
    assert (collector.args, detector.args) == (["collect"], ["detect"])
    pods += [collector.start(), detector.start()]
    anvil.rpc("anvil_mine", ["0x4"])
    wait(pods, lambda: metric(collector.port, "chainwatch_collector_checkpoint_block_number",
                              LABELS) == 4, 60, "the collector to checkpoint block 4")
    wait(pods, lambda: metric(detector.port, "chainwatch_head_block_number", LABELS) == 4, 60,
         "the detector to see block 4 from Kafka")
    wait(pods, lambda: collector.ready() and detector.ready(), 30, "both pods ready")
