"""Log scrubbing: a secret in a library's config dump or in a URL never survives scrub().

Regression for a leak found by tests/integration/test_secure_kafka.py: kafka-python logs
its whole configuration, SASL password included, at DEBUG.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from chainwatch.logs import JsonFormatter, scrub

# a password of printable characters, long enough not to occur in the rest by chance
SECRETS = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"]),
                  min_size=8, max_size=40)
KEYS = st.sampled_from(["sasl_plain_password", "password", "ssl_password", "api_token",
                        "client_secret", "sasl.jaas.config", "PASSWORD"])


@settings(max_examples=300, deadline=None)
@given(SECRETS, KEYS)
def test_secret_values_in_a_python_config_dump_are_hidden(secret: str, key: str) -> None:
    dump = repr({"bootstrap_servers": ["127.0.0.1:9093"], key: secret, "client_id": "x"})
    out = scrub(f"Starting KafkaAdminClient with configuration: {dump}")
    assert secret not in out
    assert "client_id" in out  # the rest stays readable


@settings(max_examples=300, deadline=None)
@given(SECRETS, KEYS)
def test_secret_values_in_json_log_lines_are_hidden_and_the_line_stays_json(
    secret: str, key: str
) -> None:
    import logging

    record = logging.makeLogRecord({"msg": "config %s", "args": ({key: secret},),
                                    "levelname": "DEBUG", "name": "kafka"})
    line = JsonFormatter().format(record)
    assert secret not in line and json.dumps(secret)[1:-1] not in line
    json.loads(line)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=8, max_size=30))
def test_key_equals_value_forms_are_hidden(secret: str) -> None:
    out = scrub(f"jaas: PlainLoginModule required username=u password={secret}; next")
    assert secret not in out
