"""The metrics port: /metrics, /healthz, /readyz and /api/v1/chain on one small server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chainwatch.exceptions import ConfigError


class Health:
    """Liveness = the loops still beat; readiness = connected and past start-up."""

    def __init__(self, clock: Callable[[], float], stale_after: float = 120.0) -> None:
        self.clock = clock
        self.stale_after = stale_after
        self._beats: dict[str, float] = {}
        self._ready: dict[str, bool] = {}
        self._lock = threading.Lock()

    def beat(self, loop: str) -> None:
        with self._lock:
            self._beats[loop] = self.clock()

    def set_ready(self, loop: str, ready: bool) -> None:
        with self._lock:
            self._ready[loop] = ready

    def live(self) -> tuple[bool, str]:
        now = self.clock()
        with self._lock:
            stale = [k for k, t in self._beats.items() if now - t > self.stale_after]
        return (not stale, "stale: " + ",".join(stale) if stale else "ok")

    def ready(self) -> tuple[bool, str]:
        with self._lock:
            waiting = [k for k, r in self._ready.items() if not r]
            empty = not self._ready
        if empty:
            return False, "starting"
        return (not waiting, "waiting: " + ",".join(waiting) if waiting else "ok")


def serve(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: Health,
    chain_view: Callable[[], object] | None = None,
) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; returns the server (call shutdown() to stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, why = health.live() if path == "/healthz" else health.ready()
                self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
            elif path == "/api/v1/chain" and chain_view is not None:
                body = json.dumps(chain_view()).encode()
                self._send(200, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes every few seconds would drown the logs

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:  # a port in use, a host not on this machine: the user's to fix
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
