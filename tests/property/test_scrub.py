"""Log scrubbing: a secret in a library's config dump or in a URL never survives scrub().

Regression for a leak found by tests/integration/test_secure_kafka.py: kafka-python logs
its whole configuration, SASL password included, at DEBUG.
"""

from __future__ import annotations

import json

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chainwatch.logs import JsonFormatter, scrub

# a password of printable characters; each test assumes it does not occur in the rest of
# its line (hypothesis finds such ones: "client_i" beside "client_id")
SECRETS = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"]),
                  min_size=8, max_size=40)
KEYS = st.sampled_from(["sasl_plain_password", "password", "ssl_password", "api_token",
                        "client_secret", "sasl.jaas.config", "PASSWORD"])


@settings(max_examples=300, deadline=None)
@given(SECRETS, KEYS)
def test_secret_values_in_a_python_config_dump_are_hidden(secret: str, key: str) -> None:
    def line(value: str) -> str:
        dump = repr({"bootstrap_servers": ["127.0.0.1:9093"], key: value, "client_id": "x"})
        return f"Starting KafkaAdminClient with configuration: {dump}"

    assume(secret not in scrub(line("")))
    out = scrub(line(secret))
    assert secret not in out
    assert "client_id" in out  # the rest stays readable


@settings(max_examples=300, deadline=None)
@given(SECRETS, KEYS)
def test_secret_values_in_json_log_lines_are_hidden_and_the_line_stays_json(
    secret: str, key: str
) -> None:
    import logging

    def formatted(value: str) -> str:
        record = logging.makeLogRecord({"msg": "config %s", "args": ({key: value},),
                                        "levelname": "DEBUG", "name": "kafka"})
        return JsonFormatter().format(record)

    rest = formatted("")
    assume(secret not in rest and json.dumps(secret)[1:-1] not in rest)
    line = formatted(secret)
    assert secret not in line and json.dumps(secret)[1:-1] not in line
    json.loads(line)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=8, max_size=30))
def test_key_equals_value_forms_are_hidden(secret: str) -> None:
    assume(secret not in "jaas: PlainLoginModule required username=u password=; next")
    out = scrub(f"jaas: PlainLoginModule required username=u password={secret}; next")
    assert secret not in out
