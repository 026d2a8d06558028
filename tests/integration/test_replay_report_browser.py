"""The replay report opens in a real browser (headless Chromium, driven over the DevTools
protocol) without console errors or failed loads, shows its four plots, and we keep a
screenshot to look at."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from bench.synthetic import generate
from chainwatch.local.procs import spawn, stop_pid
from chainwatch.schema import Reorg, encode
from chainwatch.settings import load_settings
from replay.app import ReplayOptions, run_replay

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / ".cache" / "screenshots"


class DevTools:
    def __init__(self, url: str) -> None:
        self.ws = connect(url, max_size=64 * 1024 * 1024).__enter__()  # closed with the browser
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=0.2)))
            except TimeoutError:
                continue


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_opens_in_chromium_without_console_errors(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    bot, router = "0x" + "b0" * 20, "0x" + "7a" * 20
    with history.open("wb") as handle:
        for b in generate(300, 20, seed=11):
            if b.number == 250:  # a sandwich: its finding's subject and summary hold hashes
                front, victim, back, *rest = b.transactions
                b = b.model_copy(update={"transactions": (
                    front.model_copy(update={"from_address": bot, "to_address": router}),
                    victim.model_copy(update={"to_address": router}),
                    back.model_copy(update={"from_address": bot, "to_address": router}),
                    *rest)})
            handle.write(encode(b) + b"\n")
            if b.number == 200:
                reorg = Reorg(chain_id=1, node="bench", event_id="r", observed_at=b.observed_at,
                              old_head_number=200, old_head_hash="0xold", new_head_number=200,
                              new_head_hash=b.hash, common_ancestor_number=196, depth=4)
                handle.write(encode(reorg) + b"\n")
    out = tmp_path / "out"
    options = ReplayOptions(out=out, progress=False)
    run_replay(load_settings(warmup_blocks=50), str(history), options, echo=lambda _: None)
    report = out / "report.html"

    profile = Path(tempfile.mkdtemp(prefix="chainwatch-chromium-"))
    assert CHROMIUM is not None
    proc = spawn(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "--window-size=1280,2400", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port, browser_path = port_file.read_text().splitlines()[:2]
        browser = DevTools(f"ws://127.0.0.1:{port}{browser_path}")
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        page = DevTools(f"ws://127.0.0.1:{port}/devtools/page/{target}")
        for domain in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
            page.call(domain)
        page.call("Page.navigate", url=report.as_uri())
        page.drain(2.0)
        state = page.call(
            "Runtime.evaluate",
            expression="JSON.stringify({ready: document.readyState, "
            "images: Array.from(document.images).map(i => [i.complete, i.naturalWidth]), "
            "title: document.title, "
            "sandwiches: Array.from(document.querySelectorAll('td')).filter("
            "td => td.textContent === 'sandwich_rule').length, "
            "overflow: document.documentElement.scrollWidth - "
            "document.documentElement.clientWidth})",
            returnByValue=True,
        )["result"]["value"]
        shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        (SCREENSHOT_DIR / "replay-report.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        stop_pid(proc.pid, timeout=10)
        shutil.rmtree(profile, ignore_errors=True)

    errors = [
        e for e in page.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        or e.get("method") == "Network.loadingFailed"
    ]
    assert errors == []
    info = json.loads(state)
    assert info["ready"] == "complete" and info["title"] == "chainwatch replay report"
    assert info["overflow"] <= 0  # every table fits the page: long hashes wrap
    assert info["sandwiches"] == 1
    assert len(info["images"]) == 4
    assert all(complete and width > 0 for complete, width in info["images"])
