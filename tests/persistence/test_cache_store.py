"""The Redis/Valkey store itself: what lands on the server, orphans, the
atomic path's owner checks, unparsable and large records, error mapping, clients
and event loops. The engine behaviours run on these backends through `store`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency._async.cache import (
    CacheAccessDeniedError,
    CacheClient,
    CachePersistenceLayer,
)
from aioidempotency._async.glide import GlideCacheClient
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._urls import store_from_url
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from tests.servers.redis import Kind, Server, ServerPool

CLIENTS = ["redis", "glide"]


def url_of(node: Server, client: str, *, atomic: bool = True, cluster: bool = False) -> str:
    query = f"client={client}&atomic={str(atomic).lower()}&timeout=5"
    return f"redis://{node.host}:{node.port}?{query}" + ("&cluster=true" if cluster else "")


@pytest.fixture
async def layers(cache_servers: ServerPool) -> AsyncIterator[list[CachePersistenceLayer]]:
    """Layers a test opens, closed at its end."""
    opened: list[CachePersistenceLayer] = []
    yield opened
    for layer in opened:
        await layer.aclose()


def open_layer(
    layers: list[CachePersistenceLayer],
    pool: ServerPool,
    kind: Kind,
    client: str,
    *,
    atomic: bool = True,
    cluster: bool = False,
) -> tuple[CachePersistenceLayer, Server]:
    node = pool.cluster(kind)[0] if cluster else pool.standalone(kind)
    layer = CachePersistenceLayer.from_url(url_of(node, client, atomic=atomic, cluster=cluster))
    layers.append(layer)
    return layer, node


def admin_for(pool: ServerPool, kind: Kind, cluster: bool) -> Any:
    if not cluster:
        return pool.standalone(kind).admin()
    node = pool.cluster(kind)[0]
    return redis.RedisCluster(node.host, node.port)


def tok(name: str) -> str:
    """A readable owner token as long as the engine's (32 chars): the owner checks refuse
    short ones."""
    return f"{name:_<32}"


def in_progress(
    key: str, owner: str, *, in_progress_ms: int | None = None, ttl: int = 600
) -> DataRecord:
    """An in-progress record of `owner` (turned into a token with `tok`)."""
    now = time.time()
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(now) + ttl,
        in_progress_expiry_timestamp=(
            int(now * 1000) + 60_000 if in_progress_ms is None else in_progress_ms
        ),
        payload_hash="hash-1",
        owner=tok(owner),
    )


def renewed(record: DataRecord, until_ms: int) -> DataRecord:
    """`record`'s renewed copy, as the lease keeper writes it."""
    return dataclasses.replace(record, in_progress_expiry_timestamp=until_ms)


def completed(key: str, data: Any, *, ttl: int = 600) -> DataRecord:
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.COMPLETED,
        expiry_timestamp=int(time.time()) + ttl,
        response_data=json.dumps(data),
        payload_hash="hash-1",
    )


def new_key() -> str:
    return f"test-cache.store#{uuid.uuid4().hex}"


# -- what lands on the server -------------------------------------------------------------


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
@pytest.mark.parametrize(("kind", "client"), [("redis", "redis"), ("valkey", "glide")])
async def test_claim_is_nx_with_a_ttl_on_the_server(
    cache_servers: ServerPool,
    layers: list[CachePersistenceLayer],
    kind: Kind,
    client: str,
    atomic: bool,
) -> None:
    layer, node = open_layer(layers, cache_servers, kind, client, atomic=atomic)
    key = new_key()
    first = in_progress(key, "owner-a", ttl=120)
    assert (await layer.claim(first, now=time.time())).claimed
    with node.admin() as admin:
        assert 0 < admin.ttl(key) <= 120
        stored = json.loads(admin.get(key))
    assert stored == {
        "status": "INPROGRESS",
        "expiration": first.expiry_timestamp,
        "in_progress_expiration": first.in_progress_expiry_timestamp,
        "validation": "hash-1",
        "owner_token": tok("owner-a"),
    }
    second = await layer.claim(in_progress(key, "owner-b"), now=time.time())
    assert not second.claimed
    assert second.existing is not None
    assert second.existing.owner == tok("owner-a")
    assert second.existing.payload_hash == "hash-1"


async def test_glide_adapter_maps_nx_and_ex_to_glide_options(cache_servers: ServerPool) -> None:
    import glide

    node = cache_servers.standalone("valkey")
    config = glide.GlideClientConfiguration([glide.NodeAddress(node.host, node.port)])
    raw = await glide.GlideClient.create(config)
    try:
        adapter = GlideCacheClient(raw)
        key = new_key()
        assert await adapter.set(key, "first", ex=100, nx=True) is True
        assert await adapter.set(key, "second", ex=100, nx=True) is False
        with node.admin() as admin:
            assert admin.get(key) == b"first"
            assert 0 < admin.ttl(key) <= 100
            assert await adapter.set(key, "third") is True
            assert admin.get(key) == b"third"
            assert admin.ttl(key) == -1
        assert await adapter.get(key) == b"third"
        assert await adapter.delete(key, new_key()) == 1
        assert await adapter.get(key) is None
    finally:
        await raw.close()


async def test_completion_keeps_validation_and_sets_the_ttl(
    cache_servers: ServerPool, layers: list[CachePersistenceLayer]
) -> None:
    layer, node = open_layer(layers, cache_servers, "valkey", "redis")
    key = new_key()
    assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
    await layer.complete(completed(key, {"ok": 1}, ttl=300), owner=tok("a"))
    with node.admin() as admin:
        stored = json.loads(admin.get(key))
        assert 0 < admin.ttl(key) <= 300
    assert stored["status"] == "COMPLETED"
    assert stored["data"] == '{"ok": 1}'
    assert stored["validation"] == "hash-1"
    assert "owner_token" not in stored


# -- orphans and owner checks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "client", "cluster"),
    [("redis", "redis", False), ("valkey", "glide", False), ("valkey", "glide", True)],
)
async def test_atomic_orphan_takeover_refuses_the_late_owner(
    cache_servers: ServerPool,
    layers: list[CachePersistenceLayer],
    kind: Kind,
    client: str,
    cluster: bool,
) -> None:
    layer, _ = open_layer(layers, cache_servers, kind, client, cluster=cluster)
    assert layer.atomic
    key = new_key()
    stale = in_progress(key, "crashed", in_progress_ms=int(time.time() * 1000) - 1000)
    assert (await layer.claim(stale, now=time.time())).claimed
    assert (await layer.claim(in_progress(key, "new-owner"), now=time.time())).claimed

    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.complete(completed(key, "late"), owner=tok("crashed"))
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.renew(renewed(stale, int(time.time() * 1000) + 5000))
    await layer.release(key, owner=tok("crashed"))
    survivor = await layer.get(key)
    assert survivor is not None
    assert survivor.owner == tok("new-owner")

    winner = completed(key, "winner")
    await layer.complete(winner, owner=tok("new-owner"))
    replay = await layer.claim(in_progress(key, "third"), now=time.time())
    assert replay.existing is not None
    assert replay.existing.response_json() == "winner"
    await layer.complete(winner, owner=tok("new-owner"))  # resent: still done
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.complete(completed(key, "again"), owner=tok("new-owner"))


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
async def test_protocol_orphan_takeover_takes_the_reference_lock(
    cache_servers: ServerPool, layers: list[CachePersistenceLayer], cluster: bool
) -> None:
    layer, _ = open_layer(layers, cache_servers, "valkey", "redis", atomic=False, cluster=cluster)
    assert not layer.atomic
    key = new_key()
    past = int(time.time() * 1000) - 1000
    assert await layer.claim(in_progress(key, "crashed", in_progress_ms=past), now=time.time())
    assert (await layer.claim(in_progress(key, "b"), now=time.time())).claimed
    admin = admin_for(cache_servers, "valkey", cluster)
    try:
        assert admin.get(f"{key}:lock") == b"True"
        assert 0 < admin.ttl(f"{key}:lock") <= 10
        assert json.loads(admin.get(key))["owner_token"] == tok("b")
        # b's claim is orphaned in turn: the lock is still held, so c is told to wait.
        admin.set(key, layer.attributes.to_json(in_progress(key, "b", in_progress_ms=past)))
        refused = await layer.claim(in_progress(key, "c"), now=time.time())
        assert not refused.claimed
        assert refused.existing is None
        assert refused.busy
        assert json.loads(admin.get(key))["owner_token"] == tok("b")
    finally:
        admin.close()


async def test_atomic_release_and_renew_only_touch_our_own_claim(
    cache_servers: ServerPool, layers: list[CachePersistenceLayer]
) -> None:
    layer, node = open_layer(layers, cache_servers, "redis", "glide")
    key = new_key()
    claim = DataRecord(key, RecordStatus.INPROGRESS, int(time.time()) + 100, owner=tok("a"))
    assert (await layer.claim(claim, now=time.time())).claimed
    await layer.release(key, owner=tok("someone-else"))
    assert await layer.get(key) is not None

    until = int(time.time() * 1000) + 5000
    await layer.renew(renewed(claim, until))
    with node.admin() as admin:
        stored = json.loads(admin.get(key))
        assert 0 < admin.ttl(key) <= 100  # KEEPTTL
    assert stored["in_progress_expiration"] == until
    assert stored["owner_token"] == tok("a")
    await layer.renew(renewed(claim, until + 1))
    current = await layer.get(key)
    assert current is not None
    assert current.in_progress_expiry_timestamp == until + 1
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.renew(dataclasses.replace(claim, owner=tok("someone-else")))

    await layer.release(key, owner=tok("a"))
    assert await layer.get(key) is None
    with pytest.raises(IdempotencyClaimLostError, match="gone"):
        await layer.renew(renewed(claim, until))


ODD_NAMES = {
    "status_attr": 'st"a%t\\us',
    "expiry_attr": "exp'iry",
    "in_progress_expiry_attr": "in-progress %d é",
    "owner_attr": "owner.[token]",
    "data_attr": "da-ta",
}


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_atomic_scripts_work_with_any_attribute_names(
    cache_servers: ServerPool, layers: list[CachePersistenceLayer], client: str
) -> None:
    node = cache_servers.standalone("valkey")
    layer = CachePersistenceLayer.from_url(url_of(node, client), **ODD_NAMES)
    layers.append(layer)
    key = new_key()
    claim = DataRecord(key, RecordStatus.INPROGRESS, int(time.time()) + 100, owner=tok("a"))
    assert (await layer.claim(claim, now=time.time())).claimed
    refused = await layer.claim(in_progress(key, "b"), now=time.time())
    assert not refused.claimed
    assert refused.existing is not None
    assert refused.existing.owner == tok("a")

    until = int(time.time() * 1000) + 5000
    await layer.renew(renewed(claim, until))  # adds the attribute
    await layer.renew(renewed(claim, until + 1))  # updates it
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.renew(renewed(in_progress(key, "b"), until))
    with node.admin() as admin:
        stored = json.loads(admin.get(key))
    assert stored[ODD_NAMES["in_progress_expiry_attr"]] == until + 1
    assert stored[ODD_NAMES["owner_attr"]] == tok("a")

    big = "x" * 5000
    await layer.complete(completed(key, big), owner=tok("a"))
    replay = await layer.claim(in_progress(key, "b"), now=time.time())
    assert replay.existing is not None
    assert replay.existing.response_json() == big

    orphan = new_key()
    stale = in_progress(orphan, "a", in_progress_ms=int(time.time() * 1000) - 1000)
    assert (await layer.claim(stale, now=time.time())).claimed
    assert (await layer.claim(in_progress(orphan, "b"), now=time.time())).claimed
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.complete(completed(orphan, 1), owner=tok("a"))
    await layer.release(orphan, owner=tok("a"))
    assert await layer.get(orphan) is not None
    await layer.release(orphan, owner=tok("b"))
    assert await layer.get(orphan) is None


# -- unparsable and large records -----------------------------------------------------


UNUSABLE = [
    "not json",
    '{"status": "DONE", "expiration": 1}',
    "",
    '{"status": "COMPLETED", "expiration": "1767225600", "data": "1"}',
    '{"status": "COMPLETED", "expiration": 1767225600, "data": 123}',
    "[1, 2]",
]


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
@pytest.mark.parametrize("garbage", [*UNUSABLE, "hash"])
async def test_an_unusable_record_raises_the_typed_error_and_is_left_unchanged(
    cache_servers: ServerPool,
    layers: list[CachePersistenceLayer],
    atomic: bool,
    garbage: str,
) -> None:
    layer, node = open_layer(layers, cache_servers, "redis", "redis", atomic=atomic)
    key = new_key()
    with node.admin() as admin:
        if garbage == "hash":
            admin.hset(key, "status", "COMPLETED")
        else:
            admin.set(key, garbage, ex=100)
        before = admin.dump(key)
    with pytest.raises(IdempotencyInvalidStatusError):
        await layer.get(key)
    with pytest.raises(IdempotencyInvalidStatusError):
        await layer.claim(in_progress(key, "a"), now=time.time())
    claim = in_progress(key, "a")
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.complete(completed(key, 1), owner=tok("a"))
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.renew(claim)
    await layer.release(key, owner=tok("a"))
    with node.admin() as admin:
        assert admin.dump(key) == before
    assert await layer.delete(key)  # what the operator's CLI does


def _big_result() -> str:
    # A decoy inside the result: text that looks like our attributes must not count.
    decoy = json.dumps({"status": "INPROGRESS", "owner_token": tok("a"), "expiration": 1})
    return json.dumps({"blob": "x" * 1_000_000, "decoy": decoy})


@pytest.mark.parametrize("client", CLIENTS)
async def test_large_results_replay_and_decoys_inside_them_are_ignored(
    cache_servers: ServerPool, layers: list[CachePersistenceLayer], client: str
) -> None:
    layer, _ = open_layer(layers, cache_servers, "valkey", client)
    key = new_key()
    assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
    big = DataRecord(
        key, RecordStatus.COMPLETED, int(time.time()) + 600, response_data=_big_result()
    )
    await layer.complete(big, owner=tok("a"))
    replay = await layer.claim(in_progress(key, "b"), now=time.time())
    assert not replay.claimed
    assert replay.existing is not None
    assert replay.existing.status is RecordStatus.COMPLETED
    assert replay.existing.response_data == big.response_data
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        await layer.renew(in_progress(key, "a"))
    await layer.release(key, owner=tok("a"))
    assert await layer.get(key) is not None


@pytest.mark.parametrize("layout", ["reference", "data-in-the-middle"])
async def test_large_records_in_other_layouts_are_read_on_the_server(
    cache_servers: ServerPool, layers: list[CachePersistenceLayer], layout: str
) -> None:
    layer, node = open_layer(layers, cache_servers, "redis", "redis")
    key = new_key()
    expiry = int(time.time()) + 600
    if layout == "reference":  # as Powertools writes it: data first
        value = {"data": _big_result(), "status": "COMPLETED", "expiration": expiry}
    else:  # attributes neither in the first nor in the last KiB
        value = {"pad": "p" * 3000, "status": "COMPLETED", "data": _big_result()}
        value |= {"expiration": expiry, "tail": "t" * 3000}
    with node.admin() as admin:
        admin.set(key, json.dumps(value), ex=600)
    replay = await layer.claim(in_progress(key, "b"), now=time.time())
    assert not replay.claimed
    assert replay.existing is not None
    assert replay.existing.response_data == value["data"]


# -- errors ------------------------------------------------------------------------------


def _dead_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
@pytest.mark.parametrize("client", CLIENTS)
async def test_a_server_that_is_down_is_a_connection_error(client: str, atomic: bool) -> None:
    port = _dead_port()
    url = f"redis://127.0.0.1:{port}?client={client}&atomic={str(atomic).lower()}&timeout=1"
    async with CachePersistenceLayer.from_url(url) as layer:
        with pytest.raises(IdempotencyPersistenceConnectionError) as caught:
            await asyncio.wait_for(layer.claim(in_progress(new_key(), "a"), now=time.time()), 30)
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
@pytest.mark.parametrize(("kind", "client"), [("redis", "redis"), ("valkey", "glide")])
async def test_an_acl_refusal_is_access_denied_not_transient(
    cache_servers: ServerPool, kind: Kind, client: str, atomic: bool
) -> None:
    node = cache_servers.standalone(kind)
    user = f"reader{uuid.uuid4().hex[:8]}"
    with node.admin() as admin:
        admin.execute_command(
            "ACL", "SETUSER", user, "on", ">secret", "~*", "+@connection", "+get", "+info"
        )
    try:
        query = f"client={client}&atomic={str(atomic).lower()}&timeout=5"
        url = f"redis://{user}:secret@{node.host}:{node.port}?{query}"
        async with CachePersistenceLayer.from_url(url) as layer:
            with pytest.raises(IdempotencyPersistenceLayerError) as caught:
                await layer.claim(in_progress(new_key(), "a"), now=time.time())
            assert await layer.get(new_key()) is None  # what the user may do still works
        assert isinstance(caught.value, CacheAccessDeniedError)
        assert not caught.value.transient
        assert "NOPERM" in str(caught.value.__cause__).upper() or "permission" in str(
            caught.value.__cause__
        )
    finally:
        with node.admin() as admin:
            admin.execute_command("ACL", "DELUSER", user)


# -- clients and loops -----------------------------------------------------------------


async def test_a_glide_client_used_from_another_loop_is_refused(
    cache_servers: ServerPool,
) -> None:
    import glide

    node = cache_servers.standalone("valkey")
    config = glide.GlideClientConfiguration([glide.NodeAddress(node.host, node.port)])
    raw = await glide.GlideClient.create(config)
    layer = CachePersistenceLayer(raw)
    try:

        def claim_in_a_new_loop() -> BaseException | None:
            try:
                asyncio.run(layer.claim(in_progress(new_key(), "a"), now=time.time()))
            except BaseException as exc:
                return exc
            return None

        error = await asyncio.wait_for(asyncio.to_thread(claim_in_a_new_loop), 30)
        assert isinstance(error, IdempotencyPersistenceConfigError)
        assert "another event loop" in str(error)
        assert (await layer.claim(in_progress(new_key(), "a"), now=time.time())).claimed
    finally:
        await raw.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_layer_from_a_url_opens_a_client_in_each_loop(
    cache_servers: ServerPool, layers: list[CachePersistenceLayer], client: str
) -> None:
    layer, _ = open_layer(layers, cache_servers, "valkey", client)
    key = new_key()
    assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed

    def use_in_a_fresh_loop(owner: str) -> bool:
        async def go() -> bool:
            result = await layer.claim(in_progress(new_key(), owner), now=time.time())
            seen = await layer.get(key)
            await layer.aclose()
            return result.claimed and seen is not None and seen.owner == tok("a")

        return asyncio.run(go())

    for owner in ("b", "c"):  # asyncio.run per call, as in a Lambda handler
        assert await asyncio.wait_for(asyncio.to_thread(use_in_a_fresh_loop, owner), 30)
    await layer.complete(completed(key, 1), owner=tok("a"))


class UserCache:
    """A user's own cache client: only async get/set/delete (no scripts)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self.calls: list[str] = []

    async def get(self, name: str) -> bytes | str | None:
        self.calls.append("get")
        return await self._client.get(name)

    async def set(self, name: str, value: str, *, ex: int | None = None, nx: bool = False) -> Any:
        self.calls.append("set")
        return await self._client.set(name, value, ex=ex, nx=nx)

    async def delete(self, *names: str) -> int:
        self.calls.append("delete")
        count: int = await self._client.delete(*names)
        return count


async def test_a_user_object_satisfying_cache_client_gets_the_protocol_path(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")
    client = aioredis.Redis(host=node.host, port=node.port)
    try:
        user_cache = UserCache(client)
        assert isinstance(user_cache, CacheClient)
        layer = CachePersistenceLayer(user_cache)
        assert not layer.atomic
        assert not layer.atomic
        key = new_key()
        assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
        await layer.complete(completed(key, [1, 2]), owner=tok("a"))
        replay = await layer.claim(in_progress(key, "b"), now=time.time())
        assert replay.existing is not None
        assert replay.existing.response_json() == [1, 2]
        # claim: SET NX; complete: GET (still ours?), SET; replay: SET NX, GET.
        assert user_cache.calls == ["set", "get", "set", "set", "get"]
        with pytest.raises(IdempotencyPersistenceConfigError, match="cannot run scripts"):
            CachePersistenceLayer(user_cache, atomic=True)
    finally:
        await client.aclose()


async def test_clients_that_cannot_serve_are_refused() -> None:
    # A sync client serves @idempotent (tests/sync/persistence/test_cache_store.py); async use is
    # refused, saying why.
    with pytest.raises(IdempotencyPersistenceConfigError, match="block the event loop"):
        await CachePersistenceLayer(redis.Redis()).get("k")
    with pytest.raises(IdempotencyPersistenceConfigError, match="not a cache client"):
        CachePersistenceLayer(object())
    with pytest.raises(IdempotencyPersistenceConfigError, match="exactly one"):
        CachePersistenceLayer()
    with pytest.raises(IdempotencyPersistenceConfigError, match="unknown client"):
        CachePersistenceLayer.from_url("redis://localhost?client=memcached")
    with pytest.raises(IdempotencyPersistenceConfigError, match="not a Redis/Valkey URL"):
        CachePersistenceLayer.from_url("memcached://localhost")


def test_urls_choose_the_path() -> None:
    store = store_from_url("valkeys://u:p@cache.example:6380/2?client=glide&atomic=false")
    assert isinstance(store, CachePersistenceLayer)
    assert not store.atomic
    assert CachePersistenceLayer.from_url("redis://localhost?cluster=true").atomic


async def test_cluster_records_spread_over_the_nodes(
    cache_servers: ServerPool, layers: list[CachePersistenceLayer]
) -> None:
    layer, _ = open_layer(layers, cache_servers, "redis", "redis", cluster=True)
    keys = [new_key() for _ in range(30)]
    for key in keys:
        assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
        await layer.complete(completed(key, key), owner=tok("a"))
    for node in cache_servers.cluster("redis"):
        with node.admin() as admin:
            assert admin.dbsize() > 0
    for key in keys:
        record = await layer.get(key)
        assert record is not None
        assert record.response_json() == key


# -- cancellation ------------------------------------------------------------------------


class SwallowingCache:
    """A protocol client whose GET swallows a cancellation, as redis-py can on 3.11."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.swallow = True

    async def get(self, name: str) -> bytes | str | None:
        if self.swallow:
            self.waiting.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.swallow = False  # the command "finished" as it was cancelled
        return None

    async def set(self, name: str, value: str, *, ex: int | None = None, nx: bool = False) -> Any:
        return True

    async def delete(self, *names: str) -> int:
        return 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is 3.11+")
@pytest.mark.parametrize("factory", [False, True], ids=["client", "factory"])
async def test_a_cancellation_the_client_swallows_is_raised_again(factory: bool) -> None:
    cache = SwallowingCache()

    async def open_client() -> SwallowingCache:
        return cache

    layer = (
        CachePersistenceLayer(client_factory=open_client, atomic=False, max_concurrency=1)
        if factory
        else CachePersistenceLayer(cache)
    )
    task = asyncio.create_task(layer.get("k"))
    await asyncio.wait_for(cache.waiting.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not cache.swallow  # the client did swallow it
    # The call's slot was given back: with max_concurrency=1 the next call still runs.
    assert await asyncio.wait_for(layer.get("k"), 10) is None


class FailingWhenCancelledCache(SwallowingCache):
    """A protocol client whose GET, cancelled, fails with a connection error instead:
    the cancellation is lost inside the client, and a failure comes out."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def get(self, name: str) -> bytes | str | None:
        self.calls += 1
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ConnectionError("Connection closed by server.") from None
        return None


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is 3.11+")
async def test_a_failure_of_a_cancelled_call_is_a_cancellation_not_retried() -> None:
    cache = FailingWhenCancelledCache()
    layer = CachePersistenceLayer(cache, retry_attempts=3)
    task = asyncio.create_task(layer.get("k"))
    await asyncio.wait_for(cache.waiting.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)  # a retry would hang in a second GET
    assert cache.calls == 1  # a connection error is transient, but the caller asked to stop


# -- ownership ---------------------------------------------------------------------------


async def _open_raw(client: str, node: Server) -> Any:
    if client == "glide":
        import glide

        config = glide.GlideClientConfiguration([glide.NodeAddress(node.host, node.port)])
        return await glide.GlideClient.create(config)
    return aioredis.Redis(host=node.host, port=node.port)


def _watch_close(raw: Any, client: str) -> list[bool]:
    """Record on `raw` itself when it is closed (`aclose` for redis-py, `close` for glide)."""
    closed: list[bool] = []
    name = "close" if client == "glide" else "aclose"
    original = getattr(raw, name)

    async def close() -> None:
        closed.append(True)
        await original()

    setattr(raw, name, close)
    return closed


@pytest.mark.parametrize("client", CLIENTS)
async def test_aclose_closes_raw_clients_from_a_factory_not_those_passed_in(
    cache_servers: ServerPool, client: str
) -> None:
    node = cache_servers.standalone("valkey")
    opened: list[Any] = []

    async def factory() -> Any:
        opened.append(await _open_raw(client, node))
        return opened[-1]

    layer = CachePersistenceLayer(client_factory=factory)
    assert (await layer.claim(in_progress(new_key(), "a"), now=time.time())).claimed
    closed = _watch_close(opened[0], client)
    await layer.aclose()
    assert closed == [True]

    given = await _open_raw(client, node)
    try:
        kept = _watch_close(given, client)
        layer = CachePersistenceLayer(given)
        assert (await layer.claim(in_progress(new_key(), "a"), now=time.time())).claimed
        await layer.aclose()
        assert kept == []
        assert await given.get(new_key()) is None  # still usable
    finally:
        await (given.close() if client == "glide" else given.aclose())


class ClosableCache(SwallowingCache):
    """A protocol client (no scripts) that records being closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


async def test_a_factory_client_that_cannot_run_scripts_is_refused_and_closed() -> None:
    cache = ClosableCache()

    async def factory() -> ClosableCache:
        return cache

    layer = CachePersistenceLayer(client_factory=factory, atomic=True)
    with pytest.raises(IdempotencyPersistenceConfigError, match=r"^ClosableCache cannot run"):
        await layer.get("k")  # the message names the user's class, not our adapter
    assert cache.closed


async def test_a_factory_client_without_aclose_is_refused_and_left_as_it_is() -> None:
    cache = SwallowingCache()  # a protocol client of one's own, with nothing to close
    cache.swallow = False

    async def factory() -> SwallowingCache:
        return cache

    layer = CachePersistenceLayer(client_factory=factory, atomic=True)
    with pytest.raises(IdempotencyPersistenceConfigError, match=r"^SwallowingCache cannot run"):
        await layer.get("k")
    await layer.aclose()
    assert await cache.get("k") is None  # still usable: nothing was closed


@pytest.mark.parametrize(
    ("client", "user_client"),
    [("redis", False), ("redis", True), ("glide", False)],
    ids=["redis-py-from-url", "redis-py-user-client", "glide-from-url"],
)
async def test_concurrent_first_claims_on_a_fresh_cluster_client_run_once_each(
    cache_servers: ServerPool,
    layers: list[CachePersistenceLayer],
    client: str,
    user_client: bool,
) -> None:
    """A new cluster client discovers its nodes on first use; concurrent first commands
    must not race in it (redis-py 8.1 then retries a claim that already ran, and the
    claim refuses itself as in progress)."""
    from aioidempotency import IdempotencyConfig, IdempotencyEngine

    node = cache_servers.cluster("redis")[0]
    if user_client:
        raw = aioredis.RedisCluster(node.host, node.port)
        layer = CachePersistenceLayer(raw)
    else:
        layer, _ = open_layer(layers, cache_servers, "redis", client, cluster=True)
    engine = IdempotencyEngine(layer, IdempotencyConfig(), key_prefix=new_key())
    runs: list[int] = []

    async def charge(n: int) -> int:
        runs.append(n)
        await asyncio.sleep(0)
        return n

    try:
        results = await asyncio.gather(
            *(engine.run({"n": n}, charge, n) for n in range(20)),
            return_exceptions=True,
        )
    finally:
        if user_client:
            await layer.aclose()
            await raw.aclose()
    assert results == list(range(20))
    assert sorted(runs) == list(range(20))
