"""In-process wrappers around a real store: counting calls and injecting faults."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from aioidempotency.persistence.base import ClaimResult, PersistenceLayer
from aioidempotency.records import DataRecord


class CountingStore(PersistenceLayer):
    """Delegates to `inner` and counts the calls per method.

    `fail` maps a method name to a callable returning an exception to raise instead of
    delegating (or None to delegate), for fault injection.
    """

    def __init__(self, inner: PersistenceLayer) -> None:
        self.inner = inner
        self.owner_checked = inner.owner_checked
        self.calls: collections.Counter[str] = collections.Counter()
        self.fail: dict[str, Callable[[], BaseException | None]] = {}
        self._changed: asyncio.Event | None = None

    def _enter(self, name: str) -> None:
        self.calls[name] += 1
        if self._changed is not None:
            self._changed.set()
        make = self.fail.get(name)
        if make is not None:
            error = make()
            if error is not None:
                raise error

    async def wait_calls(self, name: str, count: int, timeout: float = 10.0) -> None:
        """Return once `name` has been called `count` times; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.calls[name] < count:
            self._changed = asyncio.Event()
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self._enter("claim")
        return await self.inner.claim(record, now=now)

    async def get(self, key: str) -> DataRecord | None:
        self._enter("get")
        return await self.inner.get(key)

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        self._enter("complete")
        await self.inner.complete(record, owner=owner)

    async def release(self, key: str, *, owner: str) -> None:
        self._enter("release")
        await self.inner.release(key, owner=owner)

    async def renew(self, key: str, *, owner: str, in_progress_expiry_ms: int) -> None:
        self._enter("renew")
        await self.inner.renew(key, owner=owner, in_progress_expiry_ms=in_progress_expiry_ms)

    async def delete(self, key: str) -> bool:
        self._enter("delete")
        return await self.inner.delete(key)


class VanishingStore(CountingStore):
    """A store whose claims are always refused with no record to show (the record
    vanished between the claim and the read), to drive the engine's retry path."""

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self._enter("claim")
        return ClaimResult(claimed=False)
