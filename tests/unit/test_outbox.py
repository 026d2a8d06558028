"""The collector's outbox: bounded memory while the bus is down, every drop counted."""

from __future__ import annotations

import asyncio

from chainwatch.bootstrap import _count_drop
from chainwatch.metrics import Metrics
from chainwatch.schema import AnyRecord, PendingTx, decode
from collector.publishing import OUTBOX_FULL, Outbox
from tests.fakes import FlakyBus


def pending_tx(i: int) -> PendingTx:
    return PendingTx(
        chain_id=1, node="n", event_id=PendingTx.id_for(1, "n", f"0x{i:064x}"), observed_at=1.0,
        hash=f"0x{i:064x}", from_address="0x" + "a" * 40, to_address=None, nonce=i, value=0,
        gas=21000, input_size=0, method_id=None, is_contract_creation=False, first_seen_at=1.0,
    )


def test_a_full_outbox_drops_new_records_counts_each_and_never_blocks() -> None:
    bus = FlakyBus(down=True)
    drops: list[tuple[str, str]] = []
    outbox = Outbox(bus, "t.mempool", max_records=50,
                    on_drop=lambda r, why: drops.append((r.event_id, why)))
    records = [pending_tx(i) for i in range(120)]

    async def scenario() -> None:
        flusher = asyncio.create_task(outbox.flush_forever(lambda _: None, linger=0))
        # the reader is never held up: a waiting put would leave the node's notifications
        # piling up unbounded in front of the outbox
        await asyncio.wait_for(outbox.put(records[:60]), timeout=1)
        await asyncio.sleep(0.2)  # a few failed flushes while the broker is down
        await asyncio.wait_for(outbox.put(records[60:]), timeout=1)
        assert len(outbox) == 50
        bus.down = False
        for _ in range(200):
            if not len(outbox):
                break
            await asyncio.sleep(0.05)
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)

    asyncio.run(scenario())
    delivered = [decode(v).event_id for v in bus.acked]
    assert delivered == [r.event_id for r in records[:50]], "the oldest 50, in order, once"
    assert drops == [(r.event_id, OUTBOX_FULL) for r in records[50:]]
    assert outbox.dropped == 70


def test_drops_are_counted_by_type_and_reason_in_the_collector_metrics() -> None:
    metrics = Metrics()
    metrics.init_collector(1, "n")
    labels = ("1", "n", "pending_tx", OUTBOX_FULL)
    assert metrics.collector_dropped.labels(*labels)._value.get() == 0  # a series from start
    count = _count_drop(metrics)
    record: AnyRecord = pending_tx(1)
    count(record, OUTBOX_FULL)
    count(record, OUTBOX_FULL)
    assert metrics.collector_dropped.labels(*labels)._value.get() == 2
