"""`replay --from/--to`: one unambiguous syntax for block numbers, times and Kafka offsets,
and a one-line error for anything else."""

from __future__ import annotations

import pytest

from chainwatch.exceptions import ConfigError
from replay.positions import Position, parse_position, parse_range


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("19000000", "block", 19_000_000),
        ("0", "block", 0),
        (" 42 ", "block", 42),
        ("@1700000000", "time", 1_700_000_000.0),
        ("@1700000000.25", "time", 1_700_000_000.25),
        ("2023-11-14T22:13:20Z", "time", 1_700_000_000.0),
        ("2023-11-14T23:13:20+01:00", "time", 1_700_000_000.0),
        ("2023-11-14 22:13:20.5+00:00", "time", 1_700_000_000.5),
        ("offset:0", "offset", 0),
        ("offset:123456", "offset", 123_456),
    ],
)
def test_forms(text: str, kind: str, value: float) -> None:
    position = parse_position(text, "--from")
    assert (position.kind, position.value) == (kind, value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-11-23T10:00:00", "add a zone"),  # no zone: never guessed
        ("2026-11-23", "give a time of day too"),  # midnight or end of day? refused
        ("2026-13-01T00:00:00Z", "not an ISO-8601 time"),
        ("-5", "expected a block number"),
        ("0x10", "expected a block number"),
        ("offset:-1", "expected a block number"),
        ("@", "expected a block number"),
        ("yesterday", "expected a block number"),
        ("", "expected a block number"),
    ],
)
def test_bad_values_are_one_line_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_position(text, "--to")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"--to {text!r}")


def test_range_checks_order_within_a_kind_only() -> None:
    with pytest.raises(ConfigError, match="--from 9 is after --to 3"):
        parse_range("9", "3")
    with pytest.raises(ConfigError, match="is after"):
        parse_range("2023-11-14T22:13:21Z", "@1700000000")
    start, stop = parse_range("offset:500", "19000000")  # different kinds: both kept
    assert start == Position("offset", 500, "offset:500")
    assert stop is not None and stop.kind == "block"
    assert parse_range(None, None) == (None, None)
