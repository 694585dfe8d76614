"""The aiobotocore clients of an async DynamoDB layer: one per event loop, fork-aware.

Hand-written: its sync counterpart, ``aioidempotency._sync.dynamodb_client``, has the
same names and holds boto3 clients instead (one per process).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from aioidempotency._dynamodb_items import DynamoDBSettings, config_options, refused_in_child
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = ["DynamoDBClients"]


@dataclasses.dataclass(eq=False)
class _LoopClient:
    """The client opened in one event loop, and the generator that owns it.

    The generator is an async generator on purpose: the loop registers it, so
    `asyncio.run` (through `loop.shutdown_asyncgens`) closes the client when the loop
    ends, even if nobody calls `aclose()`. `pid` tells a forked child that the entry
    (and its connections) belong to its parent.
    """

    loop: asyncio.AbstractEventLoop
    lifetime: Any  # AsyncGenerator[client, None]
    opening: asyncio.Task[Any]
    pid: int = dataclasses.field(default_factory=os.getpid)

    def usable(self) -> bool:
        if self.pid != os.getpid():
            return False
        if not self.opening.done():
            return True
        if self.opening.cancelled() or self.opening.exception() is not None:
            return False
        return self.lifetime.ag_frame is not None  # False once the generator finished


class DynamoDBClients:
    """The aiobotocore clients of one layer.

    The client given (`settings.async_client`) is used as it is and never closed.
    Otherwise one client is opened lazily per event loop, from `session` (an aioboto3
    or aiobotocore session; a new `AioSession` when none was given) with `config()`.
    A layer given only a boto3 client or session has no async client: `get()` says
    what to pass.
    """

    def __init__(self, settings: DynamoDBSettings) -> None:
        self.settings = settings
        self.session: Any = settings.async_session
        self._clients: dict[asyncio.AbstractEventLoop, _LoopClient] = {}
        self._lock = threading.Lock()

    def config(self, session: Any = None) -> Any:
        """The `AioConfig` of the clients opened here: the bounded timeouts and retries
        under what `boto_config` sets explicitly (see `config_options`)."""
        from aiobotocore.config import AioConfig

        given, defaults = config_options(self.settings, session)
        user = self.settings.boto_config
        if user is None:
            return AioConfig(**defaults)
        if not isinstance(user, AioConfig):  # a botocore Config: keep its options
            user = AioConfig(**given)
        return user.merge(AioConfig(**defaults))

    def refusal(self) -> str | None:
        """Why async code cannot use this layer (it was given only boto3 clients or
        sessions), or None."""
        settings = self.settings
        if settings.async_client is not None or self.session is not None:
            return None
        if settings.sync_client is None and settings.sync_session is None:
            return None
        what = "client" if settings.sync_client is not None else "session"
        return (
            f"the DynamoDB layer of table {settings.table_name!r} was given a boto3 {what}, "
            "which serves sync code only (@idempotent, @idempotent_function). For async "
            "code pass an aiobotocore client as client= or an aioboto3 session as "
            f"session= (next to the boto3 {what}), or give neither client nor session so "
            "that the layer opens a client of each kind itself"
        )

    def _context(self) -> Any:
        session = self.session
        if session is None:
            from aiobotocore.session import AioSession

            session = self.session = AioSession()
        create = getattr(session, "client", None) or session.create_client
        return create(
            "dynamodb",
            region_name=self.settings.region_name,
            endpoint_url=self.settings.endpoint_url,
            config=self.config(session),
        )

    async def _lifetime(self) -> AsyncIterator[Any]:
        async with self._context() as client:
            yield client

    @staticmethod
    async def _first(lifetime: Any) -> Any:
        return await lifetime.__anext__()

    async def get(self) -> Any:
        """The client for the running loop (opened if needed)."""
        settings = self.settings
        if settings.async_client is not None:
            if os.getpid() != settings.pid:
                raise refused_in_child(settings, "client=")
            return settings.async_client
        reason = self.refusal()
        if reason is not None:
            raise IdempotencyPersistenceConfigError(reason)
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._clients.get(loop)
            if entry is None or not entry.usable():
                for old, stale in list(self._clients.items()):
                    if old.is_closed() or stale.pid != os.getpid():
                        del self._clients[old]
                lifetime = self._lifetime()
                entry = _LoopClient(loop, lifetime, loop.create_task(self._first(lifetime)))
                self._clients[loop] = entry
        return await asyncio.shield(entry.opening)

    @staticmethod
    async def _close_entry(entry: _LoopClient) -> None:
        if not entry.opening.done():
            entry.opening.cancel()
        await asyncio.gather(entry.opening, return_exceptions=True)
        await entry.lifetime.aclose()

    async def aclose(self) -> None:
        """Close the clients opened here (a client given stays open).

        A client opened in another, still running loop is closed in that loop; one
        whose loop has ended was closed when the loop shut down.
        """
        with self._lock:
            entries = list(self._clients.values())
            self._clients.clear()
        loop = asyncio.get_running_loop()
        for entry in entries:
            if entry.pid != os.getpid():
                continue  # inherited from the parent process: its connections are not ours
            if entry.loop is loop:
                await self._close_entry(entry)
            elif entry.loop.is_running():
                future = asyncio.run_coroutine_threadsafe(self._close_entry(entry), entry.loop)
                await asyncio.wait_for(asyncio.wrap_future(future), timeout=10)
