"""Read the next records while the detector works on the current ones.

Reading an archive (parquet decoding, JSON headers) took ~13 % of a replay on the main
thread, while the detector's main thread sat idle waiting for its scoring thread for
longer than that. A reader thread fills a small bounded queue ahead of the consumer, in
order, so the replay and its findings are the same; only the waiting overlaps.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable
from typing import TypeVar

T = TypeVar("T")

CHUNK = 64  # items handed over at a time: one queue operation per chunk, not per record
DEPTH = 8  # chunks read ahead at most: memory stays bounded (~500 records)

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(
    items: Iterable[T], *, chunk: int = CHUNK, depth: int = DEPTH
) -> Generator[T, None, None]:
    """`items` in order, produced by a reader thread up to chunk x depth items ahead.

    An exception in the reader is raised here, where the item it failed on would have
    come. Closing the iterator early (a break, an error downstream) stops the reader.
    """
    handed: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handed.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        part: list[T] = []
        try:
            for item in items:
                part.append(item)
                if len(part) >= chunk:
                    if not put(part):
                        return
                    part = []
        except BaseException as exc:  # handed to the consumer, raised there
            if not part or put(part):
                put(_Failed(exc))
            return
        if not part or put(part):
            put(_DONE)

    reader = threading.Thread(target=read, name="replay-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            got = handed.get()
            if got is _DONE:
                return
            if isinstance(got, _Failed):
                raise got.error
            yield from got  # type: ignore[misc]
    finally:
        stop.set()
        reader.join(timeout=5)
