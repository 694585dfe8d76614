"""Clients a store opens for itself: one per event loop, and again in a forked child.

A store built from settings (a URL, a factory, a table name) opens its client lazily
inside the loop that uses it: `OpenedClients` keeps one per loop, optionally bounds
the calls in flight on each, and closes each one on `aclose()` or, if the store asks
for it, when its loop shuts down (`asyncio.run` closes it before closing the loop). A client
the user passed in is held by `PassedClient`, which refuses it in a forked child (its
sockets are the parent's). Both offer the same methods, so a store uses either without
caring which. Nothing here knows what the client is: the cache and DynamoDB stores use
them alike. The sync twin, ``aioidempotency._sync.clients``, keeps one client per
process under the same names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from aioidempotency._forks import fork_generation
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = ["Opened", "OpenedClients", "PassedClient"]

C = TypeVar("C")


@dataclasses.dataclass
class Opened(Generic[C]):
    """A client ready for use, and what bounds the calls in flight on it."""

    client: C
    limit: contextlib.AbstractAsyncContextManager[Any]


class PassedClient(Generic[C]):
    """A client the user passed in: used as it is, never closed, refused in a forked
    child with `refusal` (an `IdempotencyPersistenceConfigError`).

    `pid` is the process the client was created in, when the holder is built in
    another one (a forked child building a store from its parent's settings): the
    client is refused from the start.
    """

    def __init__(self, client: C, *, refusal: str, pid: int | None = None) -> None:
        self._opened: Opened[C] = Opened(client, contextlib.nullcontext())
        self._refusal = refusal
        self._pid = os.getpid() if pid is None else pid
        self._generation = fork_generation() if self._pid == os.getpid() else -1

    @property
    def client(self) -> C:
        """The client passed in."""
        return self._opened.client

    def ready(self) -> Opened[C] | None:
        """The client; raises in a forked child."""
        if self._generation != fork_generation():
            raise IdempotencyPersistenceConfigError(
                f"this client was created in process {self._pid}, before os.fork(): "
                + self._refusal
            )
        return self._opened

    async def open(self) -> Opened[C]:
        """The same as `ready` (nothing to open)."""
        opened = self.ready()
        assert opened is not None
        return opened

    def current(self) -> C | None:
        """The client."""
        return self._opened.client

    async def aclose(self) -> None:
        """Nothing: a client passed in stays open."""


@dataclasses.dataclass(eq=False)
class _LoopEntry(Generic[C]):
    """One loop's client: `opened` while it is open, and the generator that owns it."""

    lock: asyncio.Lock
    limit: contextlib.AbstractAsyncContextManager[Any]
    opened: Opened[C] | None = None
    lifetime: AsyncGenerator[C, None] | None = None


class OpenedClients(Generic[C]):
    """One client per event loop, opened on demand by `open_client` and closed with
    `close_client`; at most `max_concurrency` calls in flight on each (None: no bound).

    A client is closed by `aclose()`. With `close_at_loop_shutdown`, it is also closed
    when its loop shuts down: it lives in an async generator first run in that loop,
    which the loop registers, so `asyncio.run` (through `loop.shutdown_asyncgens`)
    closes it even if nobody calls `aclose()` (a store built once and used with
    `asyncio.run` per call, as in a Lambda handler, leaves no client open behind each
    call), and the entries of closed loops are forgotten. A loop closed without that
    (`loop.close()` alone) leaves its client to the garbage collector. The cache store
    does not ask for it: with it, `nox -s tests` aborted in tests/faults (SIGABRT in
    valkey-glide's native code) once glide clients were closed or collected as their
    loops ended.

    In a forked child the parent's clients are forgotten, not closed (their sockets are
    the parent's; they stay referenced so that no finalizer closes them), and new ones
    are opened.
    """

    def __init__(
        self,
        open_client: Callable[[], Awaitable[C]],
        close_client: Callable[[C], Awaitable[None]],
        *,
        max_concurrency: int | None = None,
        close_at_loop_shutdown: bool = False,
    ) -> None:
        self._open_client = open_client
        self._close_client = close_client
        self.max_concurrency = max_concurrency
        self.close_at_loop_shutdown = close_at_loop_shutdown
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopEntry[C]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._generation = fork_generation()
        self._forsaken: list[Any] = []

    def _after_fork(self) -> None:
        self._forsaken.extend(self._loops.items())
        self._loops = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # the parent's may have been held at fork
        self._generation = fork_generation()

    def ready(self) -> Opened[C] | None:
        """The running loop's client if it is open already (no await), else None."""
        if self._generation != fork_generation():
            self._after_fork()
        entry = self._loops.get(asyncio.get_running_loop())
        return None if entry is None else entry.opened

    async def open(self) -> Opened[C]:
        """The running loop's client, opened if needed (once, whoever asks first)."""
        if self._generation != fork_generation():
            self._after_fork()
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._loops.get(loop)
            if entry is None:
                if self.close_at_loop_shutdown:
                    # An entry may hold its loop (a lock or a client does once used),
                    # which keeps the weak key alive: forget those of closed loops.
                    for closed in [old for old in self._loops if old.is_closed()]:
                        del self._loops[closed]
                limit: contextlib.AbstractAsyncContextManager[Any] = (
                    contextlib.nullcontext()
                    if self.max_concurrency is None
                    else asyncio.Semaphore(self.max_concurrency)
                )
                entry = self._loops[loop] = _LoopEntry(asyncio.Lock(), limit)
        if entry.opened is None:
            async with entry.lock:
                if entry.opened is None and not self.close_at_loop_shutdown:
                    entry.opened = Opened(await self._open_client(), entry.limit)
                elif entry.opened is None:
                    lifetime = self._lifetime(entry)
                    client = await lifetime.__anext__()  # the loop registers `lifetime`
                    entry.lifetime = lifetime
                    entry.opened = Opened(client, entry.limit)
        return entry.opened

    async def _lifetime(self, entry: _LoopEntry[C]) -> AsyncGenerator[C, None]:
        """Open a client, hand it out, and close it when closed itself (by `aclose()`
        or by the loop's shutdown); `entry` then has no client, and the next call in a
        loop still running opens a new one."""
        client = await self._open_client()
        try:
            yield client
        finally:
            entry.opened = None
            with contextlib.suppress(Exception):
                await self._close_client(client)

    def current(self) -> C | None:
        """The running loop's client, if one is open."""
        try:
            entry = self._loops.get(asyncio.get_running_loop())
        except RuntimeError:
            return None
        return None if entry is None or entry.opened is None else entry.opened.client

    async def aclose(self) -> None:
        """Close the clients opened so far: the running loop's here, those of other
        running loops in their own loop. Those of closed loops are dropped (with
        `close_at_loop_shutdown`, they were closed as their loop shut down, and one of
        a loop that is not running is closed by that loop when it runs again). In a
        forked child, the parent's clients are left alone."""
        if self._generation != fork_generation():
            self._after_fork()
        with self._lock:
            entries = list(self._loops.items())
            self._loops.clear()
        current = asyncio.get_running_loop()
        for loop, entry in entries:
            opened, lifetime, entry.lifetime = entry.opened, entry.lifetime, None
            if opened is None:
                continue
            closing = self._close_client(opened.client) if lifetime is None else _closed(lifetime)
            if loop is current:
                with contextlib.suppress(Exception):
                    await closing
            elif loop.is_running() and not loop.is_closed():
                future = asyncio.run_coroutine_threadsafe(_awaited(closing), loop)
                with contextlib.suppress(Exception, concurrent.futures.TimeoutError):
                    await asyncio.wait_for(asyncio.wrap_future(future), timeout=5)
            else:
                # dropped; with a lifetime, the loop's finalizer hook schedules its
                # closing in that loop (a closed loop closed it as it shut down)
                _discard(closing)


async def _closed(lifetime: AsyncGenerator[Any, None]) -> None:
    await lifetime.aclose()


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable


def _discard(awaitable: Awaitable[None]) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never awaited: no warning
    if close is not None:
        close()
