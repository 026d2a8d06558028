"""Real Prometheus and Alertmanager (Debian packages) on loopback, for tests.

Binaries are run by hand, never as services. Alertmanager is started with an empty
`--cluster.listen-address` (else it binds 0.0.0.0:9094).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import yaml

from chainwatch.local.procs import (
    LOCALHOST,
    ServerStartError,
    free_port,
    spawn,
    start_on_free_ports,
    stop_pid,
    wait_for_port,
)


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        f"{names[0]} not found: apt-get install prometheus prometheus-alertmanager"
    )


class _Server:
    name = "server"

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"chainwatch-{self.name}-"))
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def _start(self, args: Callable[[], list[str]], ready_path: str) -> None:
        """Start the server (`args` for its current port) and wait until it is ready; on
        another port if its port was taken since `free_port` found it free."""
        try:
            start_on_free_ports(lambda: self._start_once(args(), ready_path), self._log,
                                self._new_port)
        except ServerStartError:
            self.close()
            raise

    @property
    def _log(self) -> Path:
        return self.workdir / "server.log"

    def _new_port(self) -> None:
        self.port = free_port()

    def _start_once(self, args: list[str], ready_path: str) -> None:
        log = self._log.open("ab")
        self._proc = spawn(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(LOCALHOST, self.port, 30, proc=self._proc)
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(self.url + ready_path, timeout=2) as resp:
                        if resp.status == 200:
                            return
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready")
                time.sleep(0.2)
        except (TimeoutError, ServerStartError) as exc:
            stop_pid(self._proc.pid, timeout=10)
            self._proc = None
            raise ServerStartError(f"{self.name} did not start: {exc}\n{self.tail()}") from None

    def tail(self, lines: int = 30) -> str:
        text = self._log.read_text(errors="replace") if self._log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str, **params: str) -> Any:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=10) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        if self._proc is not None:
            stop_pid(self._proc.pid, timeout=10)
            self._proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AlertmanagerServer(_Server):
    name = "alertmanager"

    def start(self, group_wait: str = "1s") -> AlertmanagerServer:
        config = {
            "route": {"receiver": "null", "group_wait": group_wait, "group_interval": "1s",
                      "repeat_interval": "1h"},
            "receivers": [{"name": "null"}],
        }
        path = self.workdir / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config))
        self._start(
            lambda: [
                _binary("prometheus-alertmanager", "alertmanager"),
                f"--config.file={path}",
                f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address={LOCALHOST}:{self.port}",
                "--cluster.listen-address=",
            ],
            "/-/ready",
        )
        return self

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """Active alerts whose labels match `filters` exactly."""
        return [a for a in self.get("/api/v2/alerts")
                if all(a["labels"].get(k) == v for k, v in filters.items())]


class PrometheusServer(_Server):
    name = "prometheus"

    def start(
        self,
        targets: list[str],
        rule_text: str,
        alertmanager: AlertmanagerServer | None = None,
        job: str = "chainwatch",
        interval: str = "1s",
    ) -> PrometheusServer:
        (self.workdir / "rules.yaml").write_text(rule_text)
        config: dict[str, Any] = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(self.workdir / "rules.yaml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        if alertmanager is not None:
            config["alerting"] = {"alertmanagers": [
                {"static_configs": [{"targets": [f"{LOCALHOST}:{alertmanager.port}"]}]}]}
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self._start(
            lambda: [
                _binary("prometheus"),
                f"--config.file={path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={LOCALHOST}:{self.port}",
            ],
            "/-/ready",
        )
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        if answer.get("status") != "success":
            raise RuntimeError(f"query failed: {answer}")
        return list(answer["data"]["result"])
