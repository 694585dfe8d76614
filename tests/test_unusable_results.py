"""A completed record whose stored result is not JSON: both engines refuse to replay
it with an error naming the key and the command that frees it, leave the record as it
is, and never run the function again for it."""

from __future__ import annotations

import dataclasses

import pytest

from aioidempotency import (
    IdempotencyEngine,
    IdempotencyInvalidRecordError,
    InMemoryPersistenceLayer,
    RecordStatus,
    SyncIdempotencyEngine,
)
from tests.helpers import put_record

PAYLOAD = {"order": 17}


def spoil_the_only_record(store: InMemoryPersistenceLayer) -> str:
    (record,) = store.table._records.values()
    assert record.status is RecordStatus.COMPLETED
    put_record(store, dataclasses.replace(record, response_data='{"paid": 1'))
    return record.idempotency_key


def assert_names_the_record(error: IdempotencyInvalidRecordError, key: str) -> None:
    assert error.key == key
    assert "its data is not JSON" in str(error)
    assert f"delete --store URL '{key}'" in str(error)
    assert isinstance(error.__cause__, ValueError)


async def test_the_async_engine_refuses_a_result_that_is_not_json() -> None:
    store = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(store, key_prefix="orders")
    runs: list[int] = []

    async def pay(order: int) -> dict[str, int]:
        runs.append(order)
        return {"paid": order}

    assert await engine.run(PAYLOAD, pay, 17) == {"paid": 17}
    key = spoil_the_only_record(store)
    with pytest.raises(IdempotencyInvalidRecordError) as caught:
        await engine.run(PAYLOAD, pay, 17)
    assert_names_the_record(caught.value, key)
    assert runs == [17]
    kept = store.table.get(key)
    assert kept is not None
    assert kept.response_data == '{"paid": 1', "the record is left as it is"


def test_the_sync_engine_refuses_a_result_that_is_not_json() -> None:
    store = InMemoryPersistenceLayer()
    engine = SyncIdempotencyEngine(store, key_prefix="orders")
    runs: list[int] = []

    def pay(order: int) -> dict[str, int]:
        runs.append(order)
        return {"paid": order}

    assert engine.run(PAYLOAD, pay, 17) == {"paid": 17}
    key = spoil_the_only_record(store)
    with pytest.raises(IdempotencyInvalidRecordError) as caught:
        engine.run(PAYLOAD, pay, 17)
    assert_names_the_record(caught.value, key)
    assert runs == [17]
