"""The sync twins of the store wrappers of tests/helpers.py, for the generated sync tests.

Same names as there: the async tests import them as ``.helpers``, and their sync twins,
generated into this directory, get these.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Callable

from aioidempotency._records import DataRecord
from aioidempotency.persistence import (
    ClaimResult,
    SyncInMemoryPersistenceLayer,
    SyncPersistenceLayer,
)
from tests.helpers import FakeLambdaContext

__all__ = ["FakeLambdaContext", "StoreCall", "VanishingStore", "WrapperStore"]


@dataclasses.dataclass(frozen=True)
class StoreCall:
    """One call to a store: which method, for which key, from which thread."""

    method: str
    key: str
    thread_ident: int


class WrapperStore(SyncPersistenceLayer):
    """Delegates every call to `inner` (an in-memory store by default) and records it.

    `calls` keeps each call in order; `counts` counts them per method; `fail` maps a
    method name to a callable returning an exception to raise instead (or None);
    `returns` counts the renewals that returned from `inner` (they wrote their record).
    """

    def __init__(self, inner: SyncPersistenceLayer | None = None) -> None:
        self.inner = inner if inner is not None else SyncInMemoryPersistenceLayer()
        self.calls: list[StoreCall] = []
        self.counts: Counter[str] = Counter()
        self.returns: Counter[str] = Counter()
        self.fail: dict[str, Callable[[], BaseException | None]] = {}
        self._changed = threading.Condition()

    @property
    def total(self) -> int:
        """How many calls the store received, all methods together."""
        with self._changed:
            return sum(self.counts.values())

    def wait_calls(self, method: str, count: int, timeout: float = 10.0) -> None:
        """Return once `method` has been called `count` times; TimeoutError after `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.counts[method] >= count, timeout):
                raise TimeoutError(f"{method} was called {self.counts[method]} of {count} times")

    def wait_returned(self, method: str, count: int, timeout: float = 10.0) -> None:
        """Return once `count` calls of `method` have returned from `inner`;
        TimeoutError after `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.returns[method] >= count, timeout):
                raise TimeoutError(f"{method} returned {self.returns[method]} of {count} times")

    def _returned(self, method: str) -> None:
        with self._changed:
            self.returns[method] += 1
            self._changed.notify_all()

    def _record(self, method: str, key: str) -> None:
        with self._changed:
            self.calls.append(StoreCall(method, key, threading.get_ident()))
            self.counts[method] += 1
            self._changed.notify_all()
        make = self.fail.get(method)
        error = make() if make is not None else None
        if error is not None:
            raise error

    def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self._record("claim", record.idempotency_key)
        return self.inner.claim(record, now=now)

    def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        self._record("get", key)
        return self.inner.get(key, now=now)

    def complete(self, record: DataRecord, *, owner: str) -> None:
        self._record("complete", record.idempotency_key)
        self.inner.complete(record, owner=owner)

    def release(self, key: str, *, owner: str) -> None:
        self._record("release", key)
        self.inner.release(key, owner=owner)

    def renew(self, record: DataRecord) -> None:
        self._record("renew", record.idempotency_key)
        self.inner.renew(record)
        self._returned("renew")

    def delete(self, key: str) -> bool:
        self._record("delete", key)
        return self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()


class VanishingStore(WrapperStore):
    """Refuses every claim with no record to show (the record vanished between the
    claim and the read), to drive the engine's retry path."""

    def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self._record("claim", record.idempotency_key)
        return ClaimResult(claimed=False)
