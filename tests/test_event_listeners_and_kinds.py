"""Listeners that cannot be called, an engine nobody watches, and the store kind the
events of a cache store on a client of one's own name."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._contract import ClaimResult
from aioidempotency._records import DataRecord
from aioidempotency.events import EventKind, IdempotencyEvent, listen
from aioidempotency.exceptions import (
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from tests.servers.redis import ServerPool


def test_a_listener_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="an event listener must be callable, not <class 'int'>"):
        listen(42)  # type: ignore[arg-type]


class Unreachable(InMemoryPersistenceLayer):
    """A store of one's own whose server is gone: every claim fails to connect."""

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        raise IdempotencyPersistenceConnectionError("connection refused")


async def test_a_store_error_nobody_watches_or_logs_is_not_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The application logs errors only and listens to nothing: the engine's WARNING
    # about the store is dropped before an event is built.
    caplog.set_level(logging.ERROR, logger="aioidempotency")
    engine = IdempotencyEngine(Unreachable(), IdempotencyConfig(event_key_jmespath="id"))

    async def charge() -> str:
        return "paid"

    with pytest.raises(IdempotencyPersistenceLayerError, match="connection refused"):
        await engine.run({"id": "p-1"}, charge)
    assert caplog.records == []
    assert engine._reporter._store_kind is None  # never worked out: no event was built
    caplog.set_level(logging.WARNING, logger="aioidempotency")
    with pytest.raises(IdempotencyPersistenceLayerError, match="connection refused"):
        await engine.run({"id": "p-1"}, charge)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # now it is
    assert engine._reporter._store_kind == "memory"


class CountingClient:
    """A cache client of one's own: redis-py's, counting the writes it forwards."""

    def __init__(self, inner: aioredis.Redis) -> None:
        self.inner = inner
        self.writes = 0

    async def get(self, name: str, /) -> bytes | str | None:
        value: bytes | str | None = await self.inner.get(name)
        return value

    async def set(self, name: str, value: str, /, **options: Any) -> Any:
        self.writes += 1
        return await self.inner.set(name, value, **options)

    async def delete(self, *names: str) -> Any:
        return await self.inner.delete(*names)


async def test_a_cache_client_of_ones_own_is_a_cache_store(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("redis")
    inner = aioredis.Redis(host=node.host, port=node.port)
    client = CountingClient(inner)
    events: list[IdempotencyEvent] = []
    try:
        store = CachePersistenceLayer(client=client)
        engine = IdempotencyEngine(
            store, IdempotencyConfig(event_key_jmespath="id", on_event=events.append)
        )

        async def charge() -> str:
            return "paid"

        key = f"p-{uuid.uuid4().hex}"
        assert await engine.run({"id": key}, charge) == "paid"
    finally:
        await inner.aclose()
    assert [(e.kind, e.store) for e in events] == [
        (EventKind.CLAIMED, "cache"),
        (EventKind.COMPLETED, "cache"),
    ]
    assert client.writes == 2  # the claim and the completion went through it


async def test_the_store_kind_is_named_once_the_factory_client_is_open(
    cache_servers: ServerPool,
) -> None:
    # A layer on a client factory knows its client only once it opened it: an event
    # before that (a call without a key) must not fix the kind as "cache" for good.
    node = cache_servers.standalone("redis")
    clients: list[aioredis.Redis] = []

    def open_client() -> aioredis.Redis:
        clients.append(aioredis.Redis(host=node.host, port=node.port))
        return clients[-1]

    events: list[IdempotencyEvent] = []
    store = CachePersistenceLayer(client_factory=open_client)
    engine = IdempotencyEngine(
        store, IdempotencyConfig(event_key_jmespath="id", on_event=events.append)
    )

    async def charge() -> str:
        return "paid"

    try:
        with pytest.warns(UserWarning, match="No idempotency key value found"):
            assert await engine.run({"other": 1}, charge) == "paid"
        assert await engine.run({"id": f"p-{uuid.uuid4().hex}"}, charge) == "paid"
    finally:
        await store.aclose()
        for client in clients:
            await client.aclose()
    assert [(e.kind, e.store) for e in events] == [
        (EventKind.NO_KEY, "cache"),
        (EventKind.CLAIMED, "redis"),
        (EventKind.COMPLETED, "redis"),
    ]
