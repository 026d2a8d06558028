"""read_ahead: the same items in the same order, errors where they happened, a bounded
lead, and a reader that stops when the consumer does."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator

import pytest

from replay.readahead import read_ahead


def test_items_come_in_order_across_chunks() -> None:
    assert list(read_ahead(iter(range(1000)), chunk=7, depth=3)) == list(range(1000))
    assert list(read_ahead(iter([]), chunk=7, depth=3)) == []


def test_an_error_in_the_reader_is_raised_after_the_items_before_it() -> None:
    def items() -> Iterator[int]:
        yield from range(10)
        raise ValueError("row 10 is bad")

    got: list[int] = []
    with pytest.raises(ValueError, match="row 10 is bad"):
        for item in read_ahead(items(), chunk=4, depth=2):
            got.append(item)
    assert got == list(range(10))


def test_the_reader_stays_at_most_chunk_times_depth_ahead() -> None:
    produced: list[int] = []

    def items() -> Iterator[int]:
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = read_ahead(items(), chunk=10, depth=3)
    assert isinstance(stream, Generator)  # closable, as a consumer that stops early closes it
    assert next(stream) == 0
    time.sleep(0.3)  # let the reader run as far as it may
    # one chunk taken, three queued, one being filled while the queue is full
    assert len(produced) <= 10 * 5 + 1
    stream.close()


def test_closing_early_stops_the_reader_thread() -> None:
    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    stream = read_ahead(endless(), chunk=5, depth=2)
    assert isinstance(stream, Generator)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
