"""Real Kafka and anvil for tests and bench harnesses: one place that starts and stops them.

chainwatch.local starts the servers (the jars and binary the install scripts fetched) on
127.0.0.1 on free ports. These wrappers stop them by PID in a finally, so nothing is left
running when a test fails or a start times out half-way, and remove the broker's data dir.
The fixture factories make a pytest fixture of either for any scope and options: a test
module that kills or freezes its broker asks for its own instead of copying the fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from chainwatch.local.anvil import Anvil
from chainwatch.local.kafka import KafkaBroker


@contextmanager
def running_kafka(**options: Any) -> Iterator[KafkaBroker]:
    """A started ``KafkaBroker(**options)``; closed (stopped, data removed) on exit."""
    broker = KafkaBroker(**options)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@contextmanager
def running_anvil(**start_options: Any) -> Iterator[Anvil]:
    """An anvil started with ``Anvil.start(**start_options)``; stopped on exit."""
    node = Anvil()
    try:
        node.start(**start_options)
        yield node
    finally:
        node.stop()


def kafka_fixture(scope: Any = "session", doc: str | None = None, **options: Any) -> Any:
    """A pytest fixture: one broker per `scope`, ``KafkaBroker(**options)``."""

    def fixture() -> Iterator[KafkaBroker]:
        with running_kafka(**options) as broker:
            yield broker

    fixture.__doc__ = doc or f"A real Kafka broker per {scope} ({options})."
    return pytest.fixture(scope=scope)(fixture)


def anvil_fixture(scope: Any = "function", doc: str | None = None, **start_options: Any) -> Any:
    """A pytest fixture: one anvil per `scope`, started with ``start(**start_options)``."""

    def fixture() -> Iterator[Anvil]:
        with running_anvil(**start_options) as node:
            yield node

    fixture.__doc__ = doc or f"A real anvil per {scope} ({start_options})."
    return pytest.fixture(scope=scope)(fixture)
