"""The records of the in-memory stores: a bounded dict behind a lock.

`InMemoryPersistenceLayer` and its sync twin are thin fronts over one `MemoryTable`;
a store used by both an async and a sync engine shares its table between them.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from aioidempotency._contract import ClaimResult, check_result_size
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import IdempotencyClaimLostError, IdempotencyPersistenceLayerError

__all__ = ["MemoryTable"]


class MemoryTable:
    """Records in a dict guarded by a lock; safe from several threads and loops.

    `max_items` bounds the number of records: when full, expired records go first,
    then the least recently written completed ones; in-progress claims are never
    evicted (a full table of live claims refuses new ones with an error).
    `max_result_bytes` optionally caps the size of a stored result.
    """

    def __init__(
        self,
        *,
        max_items: int = 100_000,
        max_result_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self.max_result_bytes = max_result_bytes
        self._clock = clock
        self._records: collections.OrderedDict[str, DataRecord] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def _live(self, key: str, now: float) -> DataRecord | None:
        record = self._records.get(key)
        if record is not None and record.is_expired(now):
            del self._records[key]
            return None
        return record

    def _make_room(self, now: float) -> None:
        if len(self._records) < self.max_items:
            return
        for key in [k for k, r in self._records.items() if r.is_expired(now)]:
            del self._records[key]
        if len(self._records) < self.max_items:
            return
        for key, record in self._records.items():
            if record.status is RecordStatus.COMPLETED:
                del self._records[key]
                return
        raise IdempotencyPersistenceLayerError(
            f"in-memory store is full: {self.max_items} calls in progress"
        )

    def _put(self, record: DataRecord, now: float) -> None:
        self._records.pop(record.idempotency_key, None)
        self._make_room(now)
        self._records[record.idempotency_key] = record

    def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        with self._lock:
            existing = self._live(record.idempotency_key, now)
            if existing is not None and not existing.is_claimable(now):
                self._records.move_to_end(record.idempotency_key)
                return ClaimResult(claimed=False, existing=existing)
            self._put(record, now)
            return ClaimResult(claimed=True)

    def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        with self._lock:
            return self._live(key, self._clock() if now is None else now)

    def _owned(self, key: str, owner: str) -> DataRecord:
        current = self._records.get(key)
        if current is None or current.status is not RecordStatus.INPROGRESS:
            raise IdempotencyClaimLostError(f"the claim on {key!r} is gone", key=key)
        if current.owner != owner:
            raise IdempotencyClaimLostError(f"the claim on {key!r} was taken over", key=key)
        return current

    def complete(self, record: DataRecord, *, owner: str) -> None:
        check_result_size(record, self.max_result_bytes)
        with self._lock:
            current = self._records.get(record.idempotency_key)
            if (
                current is not None
                and current.status is RecordStatus.COMPLETED
                and current.owner == owner
            ):
                return  # a completion sent twice: the first one stored it
            self._owned(record.idempotency_key, owner)
            # The completed record keeps its owner, so a repeat is recognised.
            self._put(dataclasses.replace(record, owner=owner), self._clock())

    def release(self, key: str, *, owner: str) -> None:
        with self._lock:
            current = self._records.get(key)
            if (
                current is not None
                and current.owner == owner
                and current.status is RecordStatus.INPROGRESS
            ):
                del self._records[key]

    def renew(self, record: DataRecord) -> None:
        key = record.idempotency_key
        with self._lock:
            current = self._owned(key, record.owner or "")
            self._records[key] = dataclasses.replace(
                current, in_progress_expiry_timestamp=record.in_progress_expiry_timestamp
            )

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._records.pop(key, None) is not None
