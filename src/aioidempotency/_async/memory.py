"""`InMemoryPersistenceLayer`: a complete store inside the process.

For tests, development and single-process services. It is the reference
implementation of the persistence contract: atomic claims, owner tokens, expiry
honoured, bounded size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aioidempotency._async.store import ClaimResult, PersistenceLayer
from aioidempotency._memory_table import MemoryTable
from aioidempotency._records import DataRecord

# begin async-only
if TYPE_CHECKING:
    from aioidempotency._sync.store import SyncPersistenceLayer
# end async-only

__all__ = ["InMemoryPersistenceLayer"]


class InMemoryPersistenceLayer(PersistenceLayer):
    """Keeps records in a `MemoryTable`; safe from several threads and loops.

    `max_items` bounds the number of records: when full, expired records go first,
    then the least recently written completed ones; in-progress claims are never
    evicted (a full store of live claims refuses new ones with an error).
    `max_result_bytes` optionally caps the size of a stored result. ``table`` shares
    the records of another in-memory store (its sync twin does).
    """

    def __init__(
        self,
        *,
        max_items: int = 100_000,
        max_result_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        table: MemoryTable | None = None,
    ) -> None:
        if table is None:
            table = MemoryTable(max_items=max_items, max_result_bytes=max_result_bytes, clock=clock)
        self.table = table
        self.max_items = self.table.max_items
        self.max_result_bytes = self.table.max_result_bytes

    def __len__(self) -> int:
        return len(self.table)

    def __bool__(self) -> bool:
        # A store is a store even when empty: `store or default` must not swap it.
        return True

    # begin async-only
    def _sync_twin(self) -> SyncPersistenceLayer:
        """The sync twin: a `SyncInMemoryPersistenceLayer` sharing this store's table."""
        from aioidempotency._sync.memory import SyncInMemoryPersistenceLayer

        return SyncInMemoryPersistenceLayer(table=self.table)

    # end async-only

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        return self.table.claim(record, now=now)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        return self.table.get(key, now=now)

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        self.table.complete(record, owner=owner)

    async def release(self, key: str, *, owner: str) -> None:
        self.table.release(key, owner=owner)

    async def renew(self, record: DataRecord) -> None:
        self.table.renew(record)

    async def delete(self, key: str) -> bool:
        return self.table.delete(key)
