"""The in-memory stores at their bound and around a claim's owner: eviction order, a
full table of live claims, repeated completions, renewal by the owner only, deletion;
the async store and its sync twin share one table. The contract every store keeps is
tests/persistence/test_contract.py."""

from __future__ import annotations

import pytest

from aioidempotency import (
    IdempotencyClaimLostError,
    IdempotencyPersistenceLayerError,
    InMemoryPersistenceLayer,
    RecordStatus,
    SyncInMemoryPersistenceLayer,
)
from aioidempotency._records import DataRecord

NOW = 1_700_000_000.0


def claim_of(key: str, owner: str, *, expiry: float = NOW + 3600) -> DataRecord:
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(expiry),
        in_progress_expiry_timestamp=int((NOW + 60) * 1000),
        owner=owner,
    )


def completed(record: DataRecord, result: str = '"done"') -> DataRecord:
    return DataRecord(
        idempotency_key=record.idempotency_key,
        status=RecordStatus.COMPLETED,
        expiry_timestamp=record.expiry_timestamp,
        response_data=result,
    )


def test_max_items_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        InMemoryPersistenceLayer(max_items=0)


async def test_a_full_store_drops_expired_records_before_completed_ones() -> None:
    store = InMemoryPersistenceLayer(max_items=3, clock=lambda: NOW)
    expired = claim_of("expired", "a", expiry=NOW - 10)
    assert (await store.claim(expired, now=NOW - 20)).claimed
    done = claim_of("done", "b")
    assert (await store.claim(done, now=NOW)).claimed
    await store.complete(completed(done), owner="b")
    assert (await store.claim(claim_of("live", "c"), now=NOW)).claimed
    assert len(store) == 3

    assert (await store.claim(claim_of("new", "d"), now=NOW)).claimed
    assert len(store) == 3
    assert await store.get("expired", now=NOW - 20) is None, "the expired record went first"
    kept = await store.get("done", now=NOW)
    assert kept is not None
    assert kept.status is RecordStatus.COMPLETED


async def test_a_full_store_drops_the_oldest_completed_record_then_refuses() -> None:
    store = InMemoryPersistenceLayer(max_items=2, clock=lambda: NOW)
    done = claim_of("done", "a")
    await store.claim(done, now=NOW)
    await store.complete(completed(done), owner="a")
    await store.claim(claim_of("live", "b"), now=NOW)

    assert (await store.claim(claim_of("second", "c"), now=NOW)).claimed
    assert await store.get("done", now=NOW) is None, "the completed record made room"
    with pytest.raises(IdempotencyPersistenceLayerError, match="2 calls in progress"):
        await store.claim(claim_of("third", "d"), now=NOW)
    assert {r.idempotency_key for r in store.table._records.values()} == {"live", "second"}


async def test_a_record_read_after_its_expiry_is_gone() -> None:
    store = InMemoryPersistenceLayer(clock=lambda: NOW)
    await store.claim(claim_of("k", "a", expiry=NOW + 5), now=NOW)
    assert await store.get("k") is not None
    assert await store.get("k", now=NOW + 6) is None
    assert len(store) == 0


async def test_a_completion_sent_twice_is_stored_once() -> None:
    store = InMemoryPersistenceLayer(clock=lambda: NOW)
    record = claim_of("k", "owner")
    await store.claim(record, now=NOW)
    await store.complete(completed(record, '"first"'), owner="owner")
    await store.complete(completed(record, '"second"'), owner="owner")
    kept = await store.get("k")
    assert kept is not None
    assert (kept.response_json(), kept.owner) == ("first", "owner")
    with pytest.raises(IdempotencyClaimLostError, match="gone"):
        await store.complete(completed(record), owner="another call")


async def test_renewal_moves_the_lease_and_needs_the_claim() -> None:
    store = InMemoryPersistenceLayer()
    record = claim_of("k", "owner")
    await store.claim(record, now=NOW)
    later = int((NOW + 120) * 1000)
    renewed = DataRecord(
        idempotency_key="k",
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=record.expiry_timestamp,
        in_progress_expiry_timestamp=later,
        owner="owner",
    )
    await store.renew(renewed)
    current = await store.get("k", now=NOW)
    assert current is not None
    assert current.in_progress_expiry_timestamp == later

    with pytest.raises(IdempotencyClaimLostError, match="taken over") as taken:
        await store.renew(claim_of("k", "intruder"))
    assert taken.value.key == "k"
    with pytest.raises(IdempotencyClaimLostError, match="gone"):
        await store.renew(claim_of("never claimed", "owner"))


async def test_delete_says_whether_there_was_a_record() -> None:
    store = InMemoryPersistenceLayer()
    await store.claim(claim_of("k", "owner"), now=NOW)
    assert await store.delete("k") is True
    assert await store.delete("k") is False
    assert len(store) == 0


def test_the_sync_twin_shares_the_table_of_the_async_store() -> None:
    store = InMemoryPersistenceLayer(max_items=5, max_result_bytes=1024)
    twin = SyncInMemoryPersistenceLayer(table=store.table)
    assert (twin.max_items, twin.max_result_bytes) == (5, 1024)
    assert twin, "an empty store is still a store"

    record = claim_of("k", "owner")
    assert twin.claim(record, now=NOW).claimed
    assert len(store) == len(twin) == 1
    assert store.table.get("k", now=NOW) == record

    later = int((NOW + 90) * 1000)
    twin.renew(
        DataRecord(
            idempotency_key="k",
            status=RecordStatus.INPROGRESS,
            expiry_timestamp=record.expiry_timestamp,
            in_progress_expiry_timestamp=later,
            owner="owner",
        )
    )
    renewed = twin.get("k", now=NOW)
    assert renewed is not None
    assert renewed.in_progress_expiry_timestamp == later
    twin.release("k", owner="owner")
    assert twin.get("k", now=NOW) is None

    assert twin.claim(record, now=NOW).claimed
    twin.complete(completed(record), owner="owner")
    assert not twin.claim(claim_of("k", "other"), now=NOW).claimed
    assert twin.delete("k") is True
    assert twin.delete("k") is False
    assert len(twin) == 0
