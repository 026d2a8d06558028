"""`--from` / `--to` values: a block number, a time, or a Kafka offset. Pure code.

One syntax, no guessing: a plain integer is a block number (`19000000`); a time is
ISO-8601 with a time of day and a zone (`2026-11-23T10:00:00Z`, `...+01:00`) or unix
seconds after an `@` (`@1700000000`, `@1700000000.5`); `offset:N` is a Kafka offset.
A bare date or a zone-less time is refused rather than read in some local zone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from chainwatch.exceptions import ConfigError

Kind = Literal["block", "time", "offset"]

_INT = re.compile(r"^[0-9]+$")
_UNIX = re.compile(r"^@([0-9]+(?:\.[0-9]+)?)$")
_OFFSET = re.compile(r"^offset:([0-9]+)$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}")
FORMS = "a block number (19000000), a time (2026-11-23T10:00:00Z or @1700000000) or offset:N"


@dataclass(frozen=True)
class Position:
    kind: Kind
    value: float  # block number / offset as an exact integer, or unix seconds
    text: str  # as given, for messages

    @property
    def number(self) -> int:
        return int(self.value)


def parse_position(text: str, flag: str) -> Position:
    """`--from` / `--to` as given; ConfigError (one line) when it is none of the forms."""
    raw = text.strip()
    if _INT.match(raw):
        return Position("block", int(raw), raw)
    if match := _OFFSET.match(raw):
        return Position("offset", int(match[1]), raw)
    if match := _UNIX.match(raw):
        return Position("time", float(match[1]), raw)
    if _DATE.match(raw):
        if len(raw) == 10:
            raise ConfigError(f"{flag} {text!r}: give a time of day too, e.g. {raw}T00:00:00Z")
        try:
            when = datetime.fromisoformat(raw)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: not an ISO-8601 time") from None
        if when.tzinfo is None:
            raise ConfigError(f"{flag} {text!r}: add a zone (Z or +HH:MM) so the time is "
                              "not read in some local zone")
        return Position("time", when.timestamp(), raw)
    raise ConfigError(f"{flag} {text!r}: expected {FORMS}")


def check_range(start: Position | None, stop: Position | None) -> None:
    """--from after --to is an error when both are of the same kind."""
    if start is not None and stop is not None and start.kind == stop.kind and (
        start.value > stop.value
    ):
        raise ConfigError(f"--from {start.text} is after --to {stop.text}")


def parse_range(first: str | None, last: str | None) -> tuple[Position | None, Position | None]:
    """Both flags, checked against each other."""
    start = parse_position(first, "--from") if first is not None else None
    stop = parse_position(last, "--to") if last is not None else None
    check_range(start, stop)
    return start, stop
