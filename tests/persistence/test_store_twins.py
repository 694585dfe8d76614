"""Which store each kind of engine gets: a wrong kind of store is refused by name, a
sync store serves sync engines as it is, and an async store of one's own (no sync
client) is driven from sync code through the background loop, made once per store."""

from __future__ import annotations

import pytest

from aioidempotency import (
    IdempotencyEngine,
    InMemoryPersistenceLayer,
    SyncIdempotencyEngine,
    SyncInMemoryPersistenceLayer,
    idempotent_function,
)
from aioidempotency._sync.bridge import BridgedStore
from tests.helpers import WrapperStore


def test_a_sync_store_is_refused_by_the_async_engine() -> None:
    with pytest.raises(TypeError, match="SyncInMemoryPersistenceLayer is a sync store"):
        IdempotencyEngine(SyncInMemoryPersistenceLayer())  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", [IdempotencyEngine, SyncIdempotencyEngine])
def test_what_is_not_a_store_is_refused(engine: type[object]) -> None:
    with pytest.raises(TypeError, match="persistence_store must be a PersistenceLayer"):
        engine({"records": {}})  # type: ignore[call-arg]


def test_a_sync_store_serves_a_sync_engine_as_it_is() -> None:
    store = SyncInMemoryPersistenceLayer()
    assert SyncIdempotencyEngine(store).persistence_store is store


def test_an_in_memory_store_shares_its_table_with_its_sync_twin() -> None:
    store = InMemoryPersistenceLayer()
    twin = SyncIdempotencyEngine(store).persistence_store
    assert isinstance(twin, SyncInMemoryPersistenceLayer)
    assert twin.table is store.table
    assert SyncIdempotencyEngine(store).persistence_store is twin, "one twin per store"


def test_sync_code_drives_an_async_store_of_ones_own_through_the_bridge() -> None:
    store = WrapperStore()
    runs: list[int] = []

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, int]) -> int:
        runs.append(order["id"])
        return order["id"] * 10

    twin = place.engine.persistence_store
    assert isinstance(twin, BridgedStore)
    assert place(order={"id": 4}) == 40
    assert place(order={"id": 4}) == 40
    assert runs == [4]
    assert store.counts["claim"] == 2
    assert store.counts["complete"] == 1
    assert isinstance(store.inner, InMemoryPersistenceLayer)
    assert len(store.inner) == 1, "the record is in the async store"
    assert SyncIdempotencyEngine(store).persistence_store is twin, "one bridge per store"
