"""Secrets stay out of logs and settings output; settings come from flags, env, defaults."""

import json
import logging
import os

import pytest
from pydantic import SecretStr

from chainwatch.exceptions import ConfigError
from chainwatch.logs import JsonFormatter, redact_url, scrub
from chainwatch.settings import load_settings

# --- redact_url ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted", "secret"),
    [
        ("https://mainnet.infura.io/v3/abc123", "https://mainnet.infura.io/***", "abc123"),
        ("https://user:pw@host:8545", "https://host:8545/***", "pw"),
        ("wss://eth.alchemy.com/v2/KEYKEY", "wss://eth.alchemy.com/***", "KEYKEY"),
        ("http://10.0.0.5:8545/?apikey=QUERYKEY", "http://10.0.0.5:8545/***", "QUERYKEY"),
        ("https://admin@node.example:443", "https://node.example:443/***", "admin"),
    ],
)
def test_redact_url_hides_path_query_and_userinfo(url, redacted, secret):
    out = redact_url(url)
    assert out == redacted
    assert secret not in out


def test_redact_url_keeps_a_plain_endpoint_as_is():
    assert redact_url("http://127.0.0.1:8545") == "http://127.0.0.1:8545"
    assert redact_url("https://rpc.example.org/") == "https://rpc.example.org"


@pytest.mark.parametrize("url", ["not a url", "https://host:99999/SECRET", "/just/a/path/SECRET"])
def test_redact_url_of_garbage_gives_a_placeholder_without_the_input(url):
    out = redact_url(url)
    assert out == "<invalid url>"
    assert "SECRET" not in out


# --- scrub --------------------------------------------------------------------------------


def test_scrub_redacts_every_url_in_free_text():
    text = (
        "cannot reach https://mainnet.infura.io/v3/abc123: refused; "
        "fallback wss://u:pw@ws.example:8546/path also down"
    )
    out = scrub(text)
    assert "abc123" not in out and "pw" not in out and "/path" not in out
    assert "https://mainnet.infura.io/***" in out
    assert "wss://ws.example:8546/***" in out
    assert out.startswith("cannot reach ") and "also down" in out


def test_scrub_handles_quoted_urls():
    out = scrub("url='https://h.example/v3/KEY' and \"http://h2.example/KEY2\"")
    assert "KEY" not in out
    assert "'https://h.example/***'" in out


def test_scrub_leaves_text_without_urls_alone():
    assert scrub("block 17173049 at depth 3") == "block 17173049 at depth 3"


def test_scrub_redacts_urls_with_an_upper_case_scheme():
    assert "abc123" not in scrub("cannot reach HTTPS://mainnet.infura.io/v3/abc123")


# --- JsonFormatter ------------------------------------------------------------------------


def _record(msg: str, *args: object, exc: BaseException | None = None, **extra: object):
    record = logging.LogRecord("chainwatch.test", logging.WARNING, __file__, 1, msg, args,
                               (type(exc), exc, None) if exc else None)
    record.__dict__.update(extra)
    return record


def test_json_formatter_writes_one_json_line():
    line = JsonFormatter().format(_record("finding\non two lines", node="a", depth=3))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "chainwatch.test"
    assert entry["msg"] == "finding\non two lines"
    assert entry["node"] == "a" and entry["depth"] == 3
    assert entry["ts"].endswith("Z")


def test_json_formatter_scrubs_message_extras_and_exceptions():
    line = JsonFormatter().format(
        _record(
            "cannot reach %s",
            "https://mainnet.infura.io/v3/ARGKEY",
            rpc="https://mainnet.infura.io/v3/EXTRAKEY",
            error="ConnectError: https://user:PASSWORD@host:8545 refused",
            exc=ConnectionError("GET https://host/v3/EXCKEY failed"),
        )
    )
    for secret in ("ARGKEY", "EXTRAKEY", "PASSWORD", "EXCKEY"):
        assert secret not in line
    entry = json.loads(line)
    assert entry["msg"] == "cannot reach https://mainnet.infura.io/***"
    assert entry["rpc"] == "https://mainnet.infura.io/***"
    assert entry["error"].startswith("ConnectionError: GET https://host/***")


def test_json_formatter_keeps_the_traceback_scrubbed():
    def failing_step() -> None:
        raise ValueError("bad answer from https://host/v3/TRACEKEY")

    try:
        failing_step()
    except ValueError as exc:
        record = _record("internal error", exc=exc)
        record.exc_info = (type(exc), exc, exc.__traceback__)
    entry = json.loads(JsonFormatter().format(record))
    assert "failing_step" in entry["traceback"]  # where it happened, not only what
    assert "ValueError" in entry["traceback"] and "TRACEKEY" not in entry["traceback"]


def test_json_formatter_scrubs_non_string_extras():
    line = JsonFormatter().format(
        _record("rpc failed", error=OSError("https://host/v3/OBJKEY"),
                urls=["https://host/v3/LISTKEY"])
    )
    assert "OBJKEY" not in line and "LISTKEY" not in line


# --- settings -----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("CHAINWATCH_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_secret_urls_never_appear_in_repr_or_str(clean_env):
    s = load_settings(
        rpc="https://mainnet.infura.io/v3/RPCKEY",
        ws="wss://mainnet.infura.io/ws/v3/WSKEY",
        kafka_sasl_password="SASLPASS",
    )
    for text in (repr(s), str(s), repr(s.model_dump())):
        for secret in ("RPCKEY", "WSKEY", "SASLPASS"):
            assert secret not in text
    assert isinstance(s.rpc, SecretStr)
    assert s.rpc.get_secret_value() == "https://mainnet.infura.io/v3/RPCKEY"


def test_settings_read_chainwatch_env_vars(clean_env, tmp_path):
    clean_env.setenv("CHAINWATCH_RPC", "https://rpc.example/v3/ENVKEY")
    clean_env.setenv("CHAINWATCH_NODE", "geth-2")
    clean_env.setenv("CHAINWATCH_POLL_INTERVAL", "0.5")
    clean_env.setenv("CHAINWATCH_STATE_DIR", str(tmp_path))
    clean_env.setenv("CHAINWATCH_LOG_JSON", "true")
    s = load_settings()
    assert s.rpc is not None and s.rpc.get_secret_value() == "https://rpc.example/v3/ENVKEY"
    assert (s.node, s.poll_interval, s.state_dir, s.log_json) == ("geth-2", 0.5, tmp_path, True)


def test_flags_override_env_and_none_flags_do_not(clean_env):
    clean_env.setenv("CHAINWATCH_NODE", "from-env")
    clean_env.setenv("CHAINWATCH_METRICS_PORT", "9200")
    s = load_settings(node="from-flag", metrics_port=None)
    assert s.node == "from-flag"
    assert s.metrics_port == 9200


def test_defaults_without_flags_or_env(clean_env):
    s = load_settings()
    assert s.rpc is None and s.kafka is None
    assert (s.node, s.metrics_port, s.warmup_blocks) == ("node", 9108, 200)


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        ({"poll_interval": -1.0}, "--poll-interval"),
        ({"node": "bad name"}, "--node"),
        ({"metrics_port": 70000}, "--metrics-port"),
        ({"log_level": "LOUD"}, "--log-level"),
        ({"warmup_blocks": 3}, "--warmup-blocks"),
        ({"contamination": 0.7}, "--contamination"),
        ({"topic_prefix": "a/b"}, "--topic-prefix"),
    ],
)
def test_invalid_flag_values_raise_a_one_line_config_error_naming_the_flag(
    clean_env, flags, flag
):
    with pytest.raises(ConfigError) as info:
        load_settings(**flags)
    message = str(info.value)
    assert flag in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("env", "flag"),
    [
        ("CHAINWATCH_METRICS_PORT", "--metrics-port"),
        ("CHAINWATCH_LOG_JSON", "--log-json"),
        ("CHAINWATCH_START_BLOCK", "--start-block"),
    ],
)
def test_invalid_env_values_raise_a_one_line_config_error(clean_env, env, flag):
    clean_env.setenv(env, "not-a-value")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert flag in message and env in message
    assert "\n" not in message


def test_config_error_does_not_echo_secret_values(clean_env):
    clean_env.setenv("CHAINWATCH_RPC", "https://rpc.example/v3/ENVKEY")
    with pytest.raises(ConfigError) as info:
        load_settings(poll_interval=0)
    assert "ENVKEY" not in str(info.value)

