"""The detector's helper threads (the tx model's scoring, the fee windows, the forest
walk's split), started on first use and ended with the replay that used them.

A Ctrl-C that lands while `ThreadPoolExecutor.submit` starts a thread (its
`Thread.start()` waits for the thread to run) leaves a thread that concurrent.futures'
exit hook never heard of: it waits for work forever, and the interpreter's exit waits
for it (a replay stopped so hung instead of exiting). `shut_down_pools` wakes every
helper thread, registered or not, and ends it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def pool(name: str, workers: int = 1) -> ThreadPoolExecutor:
    """The helper pool `name` (its threads' name prefix), made on first use."""
    with _lock:
        found = _pools.get(name)
        if found is None:
            found = _pools[name] = ThreadPoolExecutor(max_workers=workers,
                                                      thread_name_prefix=name)
        return found


def shut_down_pools() -> None:
    """End every helper thread once its current work is done; the next use starts new
    ones. Shutting a pool down queues a wake-up that each of its threads, on seeing the
    pool shut, passes on before it ends: also a thread the pool did not get to record."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for executor in pools:
        executor.shutdown(wait=False)
