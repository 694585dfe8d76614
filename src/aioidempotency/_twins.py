"""Which store an engine talks to: a store object serves both kinds of engine.

A user builds one store (an `InMemoryPersistenceLayer`, a store from a URL or a table
name) and hands it to async and sync decorators alike. The async engine takes it as
it is, unless the store refuses async code (`PersistenceLayer._async_refusal`: it
holds only sync clients); the sync engine takes its sync twin, which the store names
(`PersistenceLayer._sync_twin`: the same records through a sync client, or the
in-memory store's table shared), or, for a store that names none (it only has async
clients), a `BridgedStore` that runs it on a background loop.
"""

from __future__ import annotations

from typing import Any

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
        reason = store._async_refusal()
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
        twin = store._sync_twin()
        if twin is None:
            from aioidempotency._sync.bridge import BridgedStore

            twin = BridgedStore(store)
        store.__dict__[_TWIN] = twin
    return twin
