"""The engine's local cache: completed records kept in the process (an LRU)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from aioidempotency._records import DataRecord, RecordStatus

__all__ = ["LocalCache"]


class LocalCache:
    """Up to `max_items` completed records, least recently used out first; thread-safe.

    Disabled (every lookup misses, nothing is kept) when `enabled` is False.
    """

    def __init__(self, *, enabled: bool, max_items: int, clock: Callable[[], float]) -> None:
        self.enabled = enabled
        self._max_items = max_items
        self._clock = clock
        self._records: collections.OrderedDict[str, DataRecord] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> DataRecord | None:
        """The live completed record under `key`, or None."""
        if not self.enabled:
            return None
        with self._lock:
            record = self._records.get(key)
            if record is None:
                return None
            if record.is_expired(self._clock()):
                del self._records[key]
                return None
            self._records.move_to_end(key)
            return record

    def put(self, record: DataRecord) -> None:
        """Keep `record` if it is completed."""
        if not self.enabled or record.status is not RecordStatus.COMPLETED:
            return
        with self._lock:
            self._records[record.idempotency_key] = record
            self._records.move_to_end(record.idempotency_key)
            while len(self._records) > self._max_items:
                self._records.popitem(last=False)

    def discard(self, key: str) -> None:
        """Forget the record under `key`."""
        if self.enabled:
            with self._lock:
                self._records.pop(key, None)
