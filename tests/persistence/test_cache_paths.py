"""Races between the two round trips of a claim, and `wait_replicas` on a client that
cannot wait, on the asyncio cache store. A record that vanishes (expires, or is deleted
by someone else) between the claim's first command and its read is claimed again: the
call runs, it does not fail. The sync store's are in
tests/sync/persistence/test_cache_paths.py."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._lua import LuaScript
from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
)
from tests.persistence.test_cache_store import in_progress, new_key
from tests.servers.redis import ServerPool


class VanishingClient:
    """A user's own client (get/set/delete/run_script on redis-py) that deletes the keys
    in `vanish` right before reading them, as if they expired in between."""

    def __init__(self, inner: aioredis.Redis) -> None:
        self.inner = inner
        self.vanish: set[str] = set()
        self.vanished: list[str] = []

    async def get(self, name: str) -> Any:
        if name in self.vanish:
            self.vanish.discard(name)
            self.vanished.append(name)
            await self.inner.delete(name)
        return await self.inner.get(name)

    async def set(
        self,
        name: str,
        value: str,
        *,
        ex: int | None = None,
        exat: int | None = None,
        nx: bool = False,
    ) -> Any:
        return await self.inner.set(name, value, ex=ex, exat=exat, nx=nx)

    async def delete(self, *names: str) -> Any:
        return await self.inner.delete(*names)

    async def run_script(self, script: LuaScript, key: str, args: Any) -> Any:
        return await self.inner.eval(script.code, 1, key, *args)


@pytest.mark.parametrize(
    ("atomic", "size"),
    # The atomic path reads a record itself only when it is too large for the script
    # to return (over 64 KiB); the protocol path reads any record its SET NX found.
    [(True, 100_000), (False, 10)],
    ids=["atomic-large-record", "protocol"],
)
async def test_a_record_gone_between_the_claim_and_its_read_is_claimed_again(
    cache_servers: ServerPool, atomic: bool, size: int
) -> None:
    node = cache_servers.standalone("valkey")
    raw = aioredis.Redis(host=node.host, port=node.port)
    client = VanishingClient(raw)
    layer = CachePersistenceLayer(client, atomic=atomic)
    engine = IdempotencyEngine(layer, IdempotencyConfig(), key_prefix=new_key())
    runs: list[int] = []

    async def report(n: int) -> str:
        runs.append(n)
        return f"{n}:" + "x" * size

    try:
        assert await engine.run({"order": 1}, report, 1) == "1:" + "x" * size
        key = engine.idempotency_key({"order": 1})
        client.vanish.add(key)
        assert await engine.run({"order": 1}, report, 2) == "2:" + "x" * size
        assert client.vanished == [key]
        assert runs == [1, 2]
        stored = json.loads(await raw.get(key) or "null")
        assert stored["status"] == "COMPLETED"
        assert json.loads(stored["data"]).startswith("2:")
    finally:
        await raw.aclose()


async def test_wait_replicas_needs_a_client_that_can_wait(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    raw = aioredis.Redis(host=node.host, port=node.port)
    layer = CachePersistenceLayer(VanishingClient(raw), wait_replicas=1)
    key = new_key()
    try:
        assert layer.atomic
        with pytest.raises(IdempotencyPersistenceConfigError) as raised:
            await layer.claim(in_progress(key, "a"), now=time.time())
        assert str(raised.value) == (
            "VanishingClient cannot wait for replicas; wait_replicas needs a redis-py or "
            "valkey-glide client"
        )
        assert await raw.get(key) is None  # refused before anything was written
    finally:
        await raw.aclose()


async def test_a_durable_claim_of_a_key_of_another_type_is_refused(
    cache_servers: ServerPool,
) -> None:
    """With `wait_replicas` the claim is the script (no plain SET NX GET first): the
    script names the type it found, and writes nothing."""
    node = cache_servers.standalone("redis")
    raw = aioredis.Redis(host=node.host, port=node.port)
    key = new_key()
    try:
        await raw.hset(key, "status", "COMPLETED")
        await raw.expire(key, 600)
        async with CachePersistenceLayer(
            host=node.host, port=node.port, ssl=False, wait_replicas=1, wait_timeout=0.2
        ) as layer:
            with pytest.raises(IdempotencyInvalidStatusError) as raised:
                await layer.claim(in_progress(key, "a"), now=time.time())
        assert str(raised.value).startswith(f"record {key!r} holds a Redis hash, not a record")
        assert await raw.type(key) == b"hash"  # left as it was
    finally:
        await raw.aclose()
