"""Clients a sync store opens for itself: one per process, opened again in a forked child.

The twin of ``aioidempotency._async.clients`` (same names and methods): where the async
holder keeps one client per event loop, `OpenedClients` here keeps one per process,
shared by every thread (the clients of redis-py, glide_sync and boto3 are
thread-safe), and optionally bounds the calls in flight on it. `PassedClient` holds a
client the user passed in and refuses it in a forked child. Nothing here knows what
the client is: the cache and DynamoDB stores use them alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from aioidempotency._forks import fork_generation
from aioidempotency._sync.concurrency import Slots
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = ["Opened", "OpenedClients", "PassedClient"]

C = TypeVar("C")


@dataclasses.dataclass
class Opened(Generic[C]):
    """A client ready for use, and what bounds the calls in flight on it."""

    client: C
    limit: contextlib.AbstractContextManager[Any]


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

    def open(self) -> Opened[C]:
        """The same as `ready` (nothing to open)."""
        opened = self.ready()
        assert opened is not None
        return opened

    def current(self) -> C | None:
        """The client."""
        return self._opened.client

    def close(self) -> None:
        """Nothing: a client passed in stays open."""


class OpenedClients(Generic[C]):
    """One client per process, opened on demand by `open_client` (once, whichever
    thread asks first) and closed by `close()` with `close_client`; at most
    `max_concurrency` calls in flight on it (None: no bound), counted by a `Slots` of
    this process's client (a forked child counts afresh with its new client).

    In a forked child the parent's client is forgotten, not closed (its sockets are the
    parent's; it stays referenced so that no finalizer closes it), and a new one is
    opened.
    """

    def __init__(
        self,
        open_client: Callable[[], C],
        close_client: Callable[[C], None],
        *,
        max_concurrency: int | None = None,
    ) -> None:
        self._open_client = open_client
        self._close_client = close_client
        self.max_concurrency = max_concurrency
        self._opened: Opened[C] | None = None
        self._lock = threading.Lock()
        self._generation = fork_generation()
        self._forsaken: list[Any] = []

    def _after_fork(self) -> None:
        self._forsaken.append(self._opened)
        self._opened = None
        self._lock = threading.Lock()  # the parent's may have been held at fork
        self._generation = fork_generation()

    def ready(self) -> Opened[C] | None:
        """This process's client if it is open already, else None."""
        if self._generation != fork_generation():
            self._after_fork()
        return self._opened

    def open(self) -> Opened[C]:
        """This process's client, opened if needed."""
        if self._generation != fork_generation():
            self._after_fork()
        with self._lock:
            if self._opened is None:
                limit: contextlib.AbstractContextManager[Any] = (
                    contextlib.nullcontext()
                    if self.max_concurrency is None
                    else Slots(self.max_concurrency)
                )
                self._opened = Opened(self._open_client(), limit)
            return self._opened

    def current(self) -> C | None:
        """This process's client, if one is open."""
        opened = self._opened
        return None if opened is None else opened.client

    def close(self) -> None:
        """Close the client opened so far (in a forked child, the parent's is left
        alone); a later call opens a new one."""
        if self._generation != fork_generation():
            self._after_fork()
        with self._lock:
            opened, self._opened = self._opened, None
        if opened is not None:
            with contextlib.suppress(Exception):
                self._close_client(opened.client)
