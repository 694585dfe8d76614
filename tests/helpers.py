"""Shared test helpers: store wrappers that record every call (and inject faults), and a
fake Lambda context."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable

from aioidempotency._records import DataRecord
from aioidempotency.persistence import ClaimResult, InMemoryPersistenceLayer, PersistenceLayer

__all__ = ["FakeLambdaContext", "StoreCall", "VanishingStore", "WrapperStore"]


@dataclasses.dataclass(frozen=True)
class StoreCall:
    """One call to a store: which method, for which key, on which loop and thread."""

    method: str
    key: str
    loop: asyncio.AbstractEventLoop
    thread_ident: int
    native_thread_id: int


def put_record(store: InMemoryPersistenceLayer, record: DataRecord) -> None:
    """Write `record` into an in-memory store as it is, as another writer could."""
    table = store.table
    with table._lock:
        table._put(record, time.time())


class WrapperStore(PersistenceLayer):
    """Delegates every call to `inner` (an in-memory store by default) and records it.

    `calls` keeps each call in order (with the running loop, so tests can prove which
    loop and thread drove the store; it holds a reference to each loop, so a loop's
    `id()` cannot be reused while the store lives); `counts` counts them per method;
    `returns` counts the renewals that returned from `inner` (they wrote their record).
    """

    def __init__(self, inner: PersistenceLayer | None = None) -> None:
        self.inner = inner if inner is not None else InMemoryPersistenceLayer()
        self.calls: list[StoreCall] = []
        self.counts: Counter[str] = Counter()
        self.returns: Counter[str] = Counter()
        self._lock = threading.Lock()
        # method name -> callable returning an exception to raise instead (or None)
        self.fail: dict[str, Callable[[], BaseException | None]] = {}
        self._changed: asyncio.Event | None = None

    @property
    def total(self) -> int:
        """How many calls the store received, all methods together."""
        return sum(self.counts.values())

    async def wait_calls(self, method: str, count: int, timeout: float = 10.0) -> None:
        """Return once `method` has been called `count` times; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.counts[method] < count:
            self._changed = asyncio.Event()
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))

    async def wait_returned(self, method: str, count: int, timeout: float = 10.0) -> None:
        """Return once `count` calls of `method` have returned from `inner`;
        TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.returns[method] < count:
            self._changed = asyncio.Event()
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))

    def _returned(self, method: str) -> None:
        with self._lock:
            self.returns[method] += 1
        if self._changed is not None:
            self._changed.set()

    def _record(self, method: str, key: str) -> None:
        call = StoreCall(
            method=method,
            key=key,
            loop=asyncio.get_running_loop(),
            thread_ident=threading.get_ident(),
            native_thread_id=threading.get_native_id(),
        )
        with self._lock:
            self.calls.append(call)
            self.counts[method] += 1
        if self._changed is not None:
            self._changed.set()
        make = self.fail.get(method)
        error = make() if make is not None else None
        if error is not None:
            raise error

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self._record("claim", record.idempotency_key)
        return await self.inner.claim(record, now=now)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        self._record("get", key)
        return await self.inner.get(key, now=now)

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        self._record("complete", record.idempotency_key)
        await self.inner.complete(record, owner=owner)

    async def release(self, key: str, *, owner: str) -> None:
        self._record("release", key)
        await self.inner.release(key, owner=owner)

    async def renew(self, record: DataRecord) -> None:
        self._record("renew", record.idempotency_key)
        await self.inner.renew(record)
        self._returned("renew")

    async def delete(self, key: str) -> bool:
        self._record("delete", key)
        return await self.inner.delete(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


class VanishingStore(WrapperStore):
    """Refuses every claim with no record to show (the record vanished between the
    claim and the read), to drive the engine's retry path."""

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self._record("claim", record.idempotency_key)
        return ClaimResult(claimed=False)


class FakeLambdaContext:
    """The part of a Lambda context the library reads."""

    function_name = "test-func"
    aws_request_id = "00000000-0000-0000-0000-000000000000"

    def __init__(self, remaining_ms: int = 30_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms
