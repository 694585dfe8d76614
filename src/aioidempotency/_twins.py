"""Which store an engine talks to: a store object serves both kinds of engine.

A user builds one store (an `InMemoryPersistenceLayer`, a store from a URL or a table
name) and hands it to async and sync decorators alike. The async engine takes it as
it is; the sync engine takes its sync twin: the same records through a sync client
(the in-memory store shares its table), or, for a store that only has async
clients, a `BridgedStore` that runs it on a background loop.
"""

from __future__ import annotations

from typing import Any, cast

from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._sync.store import SyncPersistenceLayer

__all__ = ["StoreForAsync", "StoreForSync", "as_async_store", "as_sync_store"]

StoreForAsync = PersistenceLayer
"""What async engines and decorators accept."""
StoreForSync = PersistenceLayer | SyncPersistenceLayer
"""What sync engines and decorators accept: any store (see `as_sync_store`)."""

_TWIN = "_aioidempotency_sync_twin"


def as_async_store(store: Any) -> PersistenceLayer:
    """`store` for the async engine (a `TypeError` naming what to pass otherwise)."""
    if isinstance(store, PersistenceLayer):
        refusal = getattr(store, "_async_refusal", None)  # a layer holding a sync client
        reason = None if refusal is None else refusal()
        if reason is not None:
            raise TypeError(reason)
        return store
    if isinstance(store, SyncPersistenceLayer):
        raise TypeError(
            f"{type(store).__name__} is a sync store: use it with @idempotent or "
            "@idempotent_function, or pass an async store (a PersistenceLayer, such as "
            "CachePersistenceLayer or DynamoDBPersistenceLayer) to async code"
        )
    raise TypeError(f"persistence_store must be a PersistenceLayer, not {type(store)!r}")


def as_sync_store(store: Any) -> SyncPersistenceLayer:
    """`store` for the sync engine: itself, or its sync twin (made once per store)."""
    if isinstance(store, SyncPersistenceLayer):
        return store
    if not isinstance(store, PersistenceLayer):
        raise TypeError(
            f"persistence_store must be a PersistenceLayer or SyncPersistenceLayer, "
            f"not {type(store)!r}"
        )
    twin = store.__dict__.get(_TWIN)
    if twin is None:
        twin = _make_twin(store)
        store.__dict__[_TWIN] = twin
    return twin


def _make_twin(store: PersistenceLayer) -> SyncPersistenceLayer:
    if isinstance(store, InMemoryPersistenceLayer):
        from aioidempotency._sync.memory import SyncInMemoryPersistenceLayer

        return SyncInMemoryPersistenceLayer(table=store.table)
    twin_of = getattr(store, "_sync_twin", None)  # a store that knows its own twin
    if twin_of is not None:
        return cast(SyncPersistenceLayer, twin_of())
    from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer

    if isinstance(store, DynamoDBPersistenceLayer):
        from aioidempotency._sync.dynamodb_client import sync_twin

        return sync_twin(store)
    from aioidempotency._sync.bridge import BridgedStore

    return BridgedStore(store)
