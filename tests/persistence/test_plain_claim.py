"""The claim as one plain command (``SET key value NX GET EX ttl``), on both worlds'
cache stores and both clients: the server runs no script for a free key or a live
record, a takeover still goes through the claim script, a server that does not know
the command's form (before Redis 7.0) is claimed with the script from then on, and a
claim whose expiry has passed by the engine's clock lives one second."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.redis import RedisPyCacheClient
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._sync.redis import SyncRedisPyCacheClient
from aioidempotency.exceptions import IdempotencyInvalidStatusError
from tests.persistence.test_cache_store import completed, in_progress, new_key, tok
from tests.servers.redis import Server, ServerPool

CLIENTS = [("valkey", "glide"), ("valkey", "redis"), ("redis", "redis")]
DATA = ("cmdstat_set", "cmdstat_get", "cmdstat_evalsha", "cmdstat_eval")


def data_calls(admin: redis.Redis) -> dict[str, int]:
    """The data commands the server ran since the last reset, by name (a script's own
    commands count too: its SET is one more ``cmdstat_set``)."""
    stats: dict[str, Any] = admin.info("commandstats")
    return {name: stats[name]["calls"] for name in DATA if name in stats}


def reset(admin: redis.Redis) -> None:
    admin.config_resetstat()


def url_of(node: Server, client: str) -> str:
    return f"redis://{node.host}:{node.port}?client={client}"


@pytest.mark.parametrize(("kind", "client"), CLIENTS)
async def test_an_async_claim_is_one_plain_command(
    cache_servers: ServerPool, kind: Any, client: str
) -> None:
    node = cache_servers.standalone(kind)
    key = new_key()
    async with CachePersistenceLayer.from_url(url_of(node, client)) as layer:
        await layer.get(new_key())  # connected: the stats below are the claims'
        with node.admin() as admin:
            reset(admin)
            assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
            assert data_calls(admin) == {"cmdstat_set": 1}
            refused = await layer.claim(in_progress(key, "b"), now=time.time())
            assert not refused.claimed
            assert refused.existing is not None
            assert refused.existing.owner == tok("a")
            assert data_calls(admin) == {"cmdstat_set": 2}  # the record came back with it
            assert 590 <= admin.ttl(key) <= 600


@pytest.mark.parametrize(("kind", "client"), CLIENTS)
def test_a_sync_claim_is_one_plain_command(
    cache_servers: ServerPool, kind: Any, client: str
) -> None:
    node = cache_servers.standalone(kind)
    key = new_key()
    with SyncCachePersistenceLayer.from_url(url_of(node, client)) as layer:
        layer.get(new_key())
        with node.admin() as admin:
            reset(admin)
            assert layer.claim(in_progress(key, "a"), now=time.time()).claimed
            assert data_calls(admin) == {"cmdstat_set": 1}
            layer.complete(completed(key, {"paid": 1}), owner=tok("a"))
            reset(admin)
            replay = layer.claim(in_progress(key, "b"), now=time.time())
            assert not replay.claimed
            assert replay.existing is not None
            assert replay.existing.response_data == '{"paid": 1}'
            assert data_calls(admin) == {"cmdstat_set": 1}


@pytest.mark.parametrize(("kind", "client"), CLIENTS)
async def test_an_orphan_is_taken_over_with_the_script(
    cache_servers: ServerPool, kind: Any, client: str
) -> None:
    node = cache_servers.standalone(kind)
    key = new_key()
    async with CachePersistenceLayer.from_url(url_of(node, client)) as layer:
        orphan = in_progress(key, "dead", in_progress_ms=int(time.time() * 1000) - 1)
        assert (await layer.claim(orphan, now=time.time() - 60)).claimed
        with node.admin() as admin:
            reset(admin)
            assert (await layer.claim(in_progress(key, "live"), now=time.time())).claimed
            calls = data_calls(admin)
            # SET NX GET found the orphan; the script replaced it (its SET NX, GET, SET)
            assert calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0) >= 1
            assert calls["cmdstat_set"] == 3, calls
        record = await layer.get(key)
        assert record is not None
        assert record.owner == tok("live")


@pytest.mark.parametrize(("kind", "client"), CLIENTS)
async def test_a_key_of_another_type_is_refused_by_the_plain_claim(
    cache_servers: ServerPool, kind: Any, client: str
) -> None:
    node = cache_servers.standalone(kind)
    key = new_key()
    with node.admin() as admin:
        admin.hset(key, "field", "value")
        admin.expire(key, 600)
    async with CachePersistenceLayer.from_url(url_of(node, client)) as layer:
        with pytest.raises(IdempotencyInvalidStatusError, match="another Redis type"):
            await layer.claim(in_progress(key, "a"), now=time.time())
    with node.admin() as admin:
        assert admin.type(key) == b"hash"  # left as it was


async def test_a_claim_whose_expiry_passed_lives_a_second(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    key = new_key()
    async with CachePersistenceLayer.from_url(url_of(node, "redis")) as layer:
        late = in_progress(key, "a", ttl=-30)  # its expiry is 30 s behind the engine's now
        assert (await layer.claim(late, now=time.time())).claimed
        with node.admin() as admin:
            assert 0 < admin.pttl(key) <= 1000


class OldServerClient(RedisPyCacheClient):
    """redis-py against a server that does not know ``SET ... NX GET`` (Redis < 7.0):
    the command it sends carries NX twice with XX, so the real server answers with the
    same "syntax error" an old one gives."""

    async def set_nx_get(self, name: str, value: str, *, ex: int) -> Any:
        return await self.client.execute_command("SET", name, value, "NX", "XX", "GET")


class SyncOldServerClient(SyncRedisPyCacheClient):
    def set_nx_get(self, name: str, value: str, *, ex: int) -> Any:
        return self.client.execute_command("SET", name, value, "NX", "XX", "GET")


async def test_an_async_layer_falls_back_to_the_script_on_an_older_server(
    cache_servers: ServerPool,
) -> None:
    import redis.asyncio as aioredis

    node = cache_servers.standalone("valkey")
    raw = aioredis.Redis(host=node.host, port=node.port)
    try:
        layer = CachePersistenceLayer(OldServerClient(raw))
        first, second = new_key(), new_key()
        with node.admin() as admin:
            reset(admin)
            assert (await layer.claim(in_progress(first, "a"), now=time.time())).claimed
            calls = data_calls(admin)
            assert calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0) >= 1, calls
            reset(admin)
            assert (await layer.claim(in_progress(second, "a"), now=time.time())).claimed
            # the script alone (its own SET NX): no second try of the refused form
            assert data_calls(admin) == {"cmdstat_set": 1, "cmdstat_evalsha": 1}
    finally:
        await raw.aclose()


def test_a_sync_layer_falls_back_to_the_script_on_an_older_server(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("valkey")
    raw = redis.Redis(host=node.host, port=node.port)
    try:
        layer = SyncCachePersistenceLayer(SyncOldServerClient(raw))
        first, second = new_key(), new_key()
        with node.admin() as admin:
            assert layer.claim(in_progress(first, "a"), now=time.time()).claimed
            reset(admin)
            assert layer.claim(in_progress(second, "a"), now=time.time()).claimed
            assert data_calls(admin) == {"cmdstat_set": 1, "cmdstat_evalsha": 1}
    finally:
        raw.close()
