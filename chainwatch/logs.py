"""Structured logging: JSON lines when stderr is not a TTY, and secret redaction."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from urllib.parse import urlsplit

_STD_ATTRS = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def redact_url(url: str) -> str:
    """Keep scheme, host and port; drop credentials, path and query (where API keys live)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "<invalid url>"
    host_port = parts.netloc.rsplit("@", 1)[-1]  # keeps [ipv6] brackets and the port
    if not parts.scheme or not parts.hostname:
        return "<invalid url>"
    hidden = "/***" if (parts.path.strip("/") or parts.query or parts.username) else ""
    return f"{parts.scheme}://{host_port}{hidden}"


# A URL ends before whitespace, quotes, brackets, a backslash (a JSON escape: the whole
# line is scrubbed after json.dumps), or trailing punctuation of the sentence.
_URL_RE = re.compile(r"\b(?:https?|wss?)://[^\s'\"<>()\\]*[^\s'\"<>(),.;:\\]", re.IGNORECASE)


# A value named like a secret in a library's config dump, e.g. kafka-python's debug line
# "Starting KafkaAdminClient with configuration: {..., 'sasl_plain_password': '...'}".
# Quoted values keep their quotes (the line may be JSON); unquoted ones only after "=".
_SECRET_KEY = r"[\w.-]*(?:password|passwd|secret|token|jaas)[\w.-]*"
_SECRET_VALUE_RE = re.compile(
    rf"""(?P<key>['"]?{_SECRET_KEY}['"]?\s*[:=]\s*)"""
    r"""(?:(?P<q>['"])(?:\\.|(?!(?P=q)).)*(?P=q)|(?<==)[^\s,;}'"]+)""",
    re.IGNORECASE,
)


def _hide_value(match: re.Match[str]) -> str:
    quote = match.group("q") or ""
    return f"{match.group('key')}{quote}***{quote}"


def scrub(text: str) -> str:
    """Redact every URL inside a free-form message (exception texts from libraries), and
    every value whose key names a password, secret or token."""
    return _SECRET_VALUE_RE.sub(_hide_value, _URL_RE.sub(lambda m: redact_url(m.group(0)), text))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                entry[key] = scrub(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = scrub(f"{type(exc).__name__}: {exc}")
            # where it happened: an internal error counted and logged once needs its stack
            entry["traceback"] = scrub(self.formatException(record.exc_info))
        # scrub the whole line: secrets can hide in non-string extras too
        return scrub(json.dumps(entry, default=str))


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STD_ATTRS and not k.startswith("_")
        )
        line = f"{time.strftime('%H:%M:%S')} {record.levelname.lower():7} {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info and record.exc_info[1] is not None:
            line += f"  error={type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return scrub(line)


def setup_logging(level: str = "INFO", json_logs: bool | None = None) -> None:
    use_json = (not sys.stderr.isatty()) if json_logs is None else json_logs
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("web3", "websockets", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python logs every reconnect attempt at ERROR; the bus adapter reports failures
    # itself, once, as BusError. Its own logs are for debugging.
    logging.getLogger("kafka").setLevel(
        logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL
    )
