"""`process_batch(engine=...)`: batches handled by one engine share its local cache, so
a message delivered again in a later batch is answered without a store round trip."""

from __future__ import annotations

from aioidempotency import IdempotencyConfig, IdempotencyEngine, InMemoryPersistenceLayer
from aioidempotency.batch import SQSRecord, default_key_jmespath, process_batch
from aioidempotency.events import EventKind, IdempotencyEvent
from tests.batch_events import batch, failed_ids, sqs_record


async def test_batches_of_one_engine_share_its_local_cache() -> None:
    events: list[IdempotencyEvent] = []
    engine = IdempotencyEngine(
        InMemoryPersistenceLayer(),
        IdempotencyConfig(
            event_key_jmespath=default_key_jmespath("sqs"),
            use_local_cache=True,
            on_event=events.append,
        ),
        key_prefix="orders",
    )
    handled: list[str] = []

    async def handle(record: SQSRecord) -> str:
        handled.append(record.body)
        return "done"

    first = sqs_record("order-1", message_id="m-1")
    response = await process_batch(
        batch([first, sqs_record("order-2", message_id="m-2")]),
        handle,
        persistence_store=engine.persistence_store,
        engine=engine,
    )
    assert failed_ids(response) == []
    again = await process_batch(
        batch([first]), handle, persistence_store=engine.persistence_store, engine=engine
    )
    assert failed_ids(again) == []
    assert handled == ["order-1", "order-2"]
    assert [e.kind for e in events][-1] is EventKind.CACHE_HIT  # the engine's own cache
    assert all(e.prefix == "orders" for e in events)
