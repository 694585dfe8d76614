"""The bridge from the sync engine to a store that only has async clients.

A store built on an asyncio client (a ``redis.asyncio`` or aioboto3 client, a custom
async `PersistenceLayer`) serves sync code through `BridgedStore`: each store call
runs on one long-lived event loop in a daemon thread, so the store's clients and
connection pools survive across calls (warm Lambda invocations); the function itself
runs in the caller's thread. Every wait has a timeout, a forked child starts its own
loop, and at interpreter exit the loop closes the stores it served (bounded by
`EXIT_TIMEOUT`). Stores with a sync twin of their own never come here.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from aioidempotency._async.store import PersistenceLayer
from aioidempotency._contract import ClaimResult
from aioidempotency._records import DataRecord
from aioidempotency._sync.store import SyncPersistenceLayer
from aioidempotency.exceptions import IdempotencyPersistenceConnectionError

__all__ = ["EXIT_TIMEOUT", "BackgroundLoop", "BridgedStore", "background_loop"]

T = TypeVar("T")

DEFAULT_STORE_TIMEOUT = 60.0
"""Seconds a bridged store call may take before the caller gets a typed error."""
EXIT_TIMEOUT = 5.0
"""Seconds the exit hook may spend closing stores."""

logger = logging.getLogger("aioidempotency")


class BackgroundLoop:
    """An event loop running forever in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stores: dict[int, PersistenceLayer] = {}

    @property
    def thread(self) -> threading.Thread | None:
        """The thread running the loop (None before first use)."""
        return self._thread

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running background loop, started if needed."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            return loop
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = self._start()
            return self._loop

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=serve, name="aioidempotency-loop", daemon=True)
        thread.start()
        if not ready.wait(timeout=10):  # pragma: no cover - a thread that cannot start
            raise RuntimeError("the aioidempotency background loop did not start")
        self._thread = thread
        return loop

    def remember(self, store: PersistenceLayer) -> None:
        """Note that `store` runs on this loop, to be closed at exit."""
        if id(store) not in self._stores:
            with self._lock:
                self._stores[id(store)] = store

    def close(self, timeout: float = EXIT_TIMEOUT) -> bool:
        """Close the remembered stores' clients, stop the loop and close it; True
        when all of it finished within `timeout`.

        Called at interpreter exit. A later sync call starts a new loop.
        """
        with self._lock:
            loop, thread = self._loop, self._thread
            stores = list(self._stores.values())
            self._stores = {}
        if loop is None or loop.is_closed() or thread is None or not thread.is_alive():
            return True
        deadline = time.monotonic() + timeout
        done = asyncio.run_coroutine_threadsafe(_shut_down(stores, timeout), loop)
        try:
            finished = done.result(timeout=timeout + 0.5)
        except Exception:  # the loop is blocked, or the shutdown itself failed
            logger.warning("closing the idempotency stores at exit failed", exc_info=True)
            done.cancel()
            return False
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        if thread.is_alive():  # pragma: no cover - a callback that blocks the loop
            return False
        with self._lock:
            if self._loop is loop:
                self._loop = None
                self._thread = None
        loop.close()
        return finished

    def _after_fork(self) -> None:
        # The parent's loop thread does not exist in the child: start afresh. The
        # parent's stores are not the child's to close (their clients are the parent's).
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._stores = {}


async def _shut_down(stores: list[PersistenceLayer], timeout: float) -> bool:
    """On the background loop: close the stores, cancel what is left.

    Each step gets what is left of `timeout`; one that runs out is logged and the next
    one still runs. True when every step finished in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    async def step(what: str, awaitables: list[Any]) -> bool:
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*awaitables, return_exceptions=True),
                max(0.0, deadline - loop.time()),
            )
        except asyncio.TimeoutError:
            logger.warning("%s at exit did not finish within %gs", what, timeout)
            return False
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                logger.warning("%s at exit failed: %r", what, outcome)
        return True

    closed = await step("closing the stores", [store.aclose() for store in stores])
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    for task in others:  # lease timers and the like: nothing is left to protect
        task.cancel()
    cancelled = await step("cancelling background tasks", others)
    finalised = await step("closing async generators", [loop.shutdown_asyncgens()])
    return closed and cancelled and finalised


background_loop = BackgroundLoop()
"""The loop every bridged store of this process runs on."""

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=background_loop._after_fork)
atexit.register(background_loop.close)


class BridgedStore(SyncPersistenceLayer):
    """A sync store that runs each call of an async store on `background_loop`."""

    def __init__(self, inner: PersistenceLayer, *, timeout: float = DEFAULT_STORE_TIMEOUT) -> None:
        self.inner = inner
        self.timeout = timeout

    def _run(self, operation: Coroutine[Any, Any, T]) -> T:
        loop = background_loop.loop()
        background_loop.remember(self.inner)
        future = asyncio.run_coroutine_threadsafe(operation, loop)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            error = IdempotencyPersistenceConnectionError(
                f"the idempotency store did not answer within {self.timeout:g} s"
            )
            error.transient = True
            raise error from None
        except BaseException:
            future.cancel()  # an interrupted caller: the store call stops too
            raise

    def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        return self._run(self.inner.claim(record, now=now))

    def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        return self._run(self.inner.get(key, now=now))

    def complete(self, record: DataRecord, *, owner: str) -> None:
        self._run(self.inner.complete(record, owner=owner))

    def release(self, key: str, *, owner: str) -> None:
        self._run(self.inner.release(key, owner=owner))

    def renew(self, record: DataRecord) -> None:
        self._run(self.inner.renew(record))

    def delete(self, key: str) -> bool:
        return self._run(self.inner.delete(key))

    def close(self) -> None:
        self._run(self.inner.aclose())
