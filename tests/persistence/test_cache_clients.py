"""Clients of one's own in both worlds (`adapt`): what is not a cache client is refused,
a client whose `set` Python cannot inspect is sent TTLs, and the TTL wrapper can be
copied."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.cache_clients import TtlCacheClient, adapt
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._sync.cache_clients import SyncTtlCacheClient
from aioidempotency._sync.cache_clients import adapt as sync_adapt
from aioidempotency.exceptions import IdempotencyPersistenceConfigError
from tests.persistence.test_cache_store import in_progress, new_key
from tests.servers.redis import ServerPool


class Uninspectable:
    """A callable whose signature Python cannot read, as for a C extension's function."""

    def __init__(self, call: Any) -> None:
        self.call = call

    @property
    def __signature__(self) -> Any:
        raise ValueError("no signature found for builtin")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)


class AsyncClient:
    """A user's own asyncio client whose `set` cannot be inspected; records each SET."""

    def __init__(self, inner: aioredis.Redis) -> None:
        self.inner = inner
        self.sets: list[dict[str, Any]] = []
        self.set = Uninspectable(self._set)

    async def get(self, name: str) -> Any:
        return await self.inner.get(name)

    async def _set(self, name: str, value: str, **options: Any) -> Any:
        self.sets.append(options)
        return await self.inner.set(name, value, **options)

    async def delete(self, *names: str) -> Any:
        return await self.inner.delete(*names)


class SyncClient:
    """The sync twin of `AsyncClient`."""

    def __init__(self, inner: redis.Redis) -> None:
        self.inner = inner
        self.sets: list[dict[str, Any]] = []
        self.set = Uninspectable(self._set)

    def get(self, name: str) -> Any:
        return self.inner.get(name)

    def _set(self, name: str, value: str, **options: Any) -> Any:
        self.sets.append(options)
        return self.inner.set(name, value, **options)

    def delete(self, *names: str) -> Any:
        return self.inner.delete(*names)


async def test_a_set_python_cannot_inspect_is_sent_ttls(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    raw = aioredis.Redis(host=node.host, port=node.port)
    client = AsyncClient(raw)
    assert isinstance(adapt(client), TtlCacheClient)
    layer = CachePersistenceLayer(client, atomic=False)
    key = new_key()
    try:
        record = in_progress(key, "a", ttl=600)
        assert (await layer.claim(record, now=time.time())).claimed
        assert [sorted(options) for options in client.sets] == [["ex", "nx"]]
        assert 0 < client.sets[0]["ex"] <= 600
        assert 0 < await raw.ttl(key) <= 600
    finally:
        await raw.aclose()


def test_a_sync_set_python_cannot_inspect_is_sent_ttls(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    with node.admin() as raw:
        client = SyncClient(raw)
        assert isinstance(sync_adapt(client), SyncTtlCacheClient)
        layer = SyncCachePersistenceLayer(client, atomic=False)
        key = new_key()
        assert layer.claim(in_progress(key, "a", ttl=600), now=time.time()).claimed
        assert [sorted(options) for options in client.sets] == [["ex", "nx"]]
        assert 0 < client.sets[0]["ex"] <= 600
        assert 0 < raw.ttl(key) <= 600


def test_what_is_not_a_cache_client_is_refused_in_both_worlds() -> None:
    for build in (CachePersistenceLayer, SyncCachePersistenceLayer):
        with pytest.raises(IdempotencyPersistenceConfigError) as raised:
            build(object())
        assert str(raised.value) == "object is not a cache client: it needs get, set and delete"


async def test_a_ttl_wrapper_can_be_copied(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    key = new_key()
    with node.admin() as raw:
        raw.set(key, "value")
        synced = copy.copy(SyncTtlCacheClient(SyncClient(raw)))
        assert synced.get(key) == b"value"
    inner = aioredis.Redis(host=node.host, port=node.port)
    try:
        wrapped = TtlCacheClient(AsyncClient(inner))
        copied = copy.copy(wrapped)
        assert copied.inner is wrapped.inner
        assert await copied.get(key) == b"value"
    finally:
        await inner.aclose()
