"""The redis-py asyncio adapter (`RedisPyCacheClient`) on real servers: `wait_replicas`
on a standalone primary and on a cluster's nodes, the script cache being empty, error
replies and cancellations on a cluster node's connection, a node that is gone, pools
that wait for a connection, the cluster's first use, INFO of a cluster client and which
clients the layer closes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.redis import RedisPyCacheClient
from aioidempotency._lua import LuaScript
from aioidempotency.exceptions import IdempotencyPersistenceConnectionError
from tests.persistence.cache_setups import primary_with_replica
from tests.persistence.test_cache_store import completed, in_progress, new_key, tok
from tests.servers.redis import Server, ServerPool, keys_on_every_node

BOUND = 30.0


@pytest.fixture(scope="module")
def replicated(cache_servers: ServerPool) -> tuple[Server, Server]:
    return primary_with_replica(cache_servers)


def echo_script() -> LuaScript:
    """A script no server has cached yet: its first EVALSHA is refused (NOSCRIPT)."""
    return LuaScript(f"-- {uuid.uuid4().hex}\nreturn ARGV[1]")


def named_connections(node: Server, name: str) -> int:
    with node.admin() as admin:
        return sum(1 for client in admin.client_list() if client.get("name") == name)


def holder_of(raw: aioredis.RedisCluster, key: str) -> Any:
    """The node of `raw` that holds `key` (once `raw` knows its nodes)."""
    node = raw.get_node_from_key(key)
    assert node is not None
    return node


def key_where(check: Callable[[str], bool]) -> str:
    """A new key for which `check` holds (among at most 1000 tries)."""
    for key in (new_key() for _ in range(1000)):
        if check(key):
            return key
    raise AssertionError("no such key among 1000")


async def wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll `check` (a quick call to a server) until it holds, for at most BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- wait_replicas -----------------------------------------------------------------------------


async def test_wait_replicas_waits_for_the_replica_even_with_an_empty_script_cache(
    replicated: tuple[Server, Server],
) -> None:
    primary, replica = replicated
    raw = aioredis.Redis(host=primary.host, port=primary.port)
    store = CachePersistenceLayer(raw, wait_replicas=1, wait_timeout=5)
    short = CachePersistenceLayer(raw, wait_replicas=2, wait_timeout=0.05, retry_attempts=1)
    try:
        with primary.admin() as admin:
            admin.script_flush()  # as after a restart: EVALSHA is refused, EVAL runs them
        key = new_key()
        assert (await store.claim(in_progress(key, "a"), now=time.time())).claimed
        with replica.admin() as on_replica:
            assert on_replica.get(key) is not None  # WAIT returned: the replica has it
            await store.complete(completed(key, 7), owner=tok("a"))
            assert json.loads(on_replica.get(key))["status"] == "COMPLETED"
        # More replicas than there are: the claim is released and refused (transient).
        other = new_key()
        with pytest.raises(IdempotencyPersistenceConnectionError) as caught:
            await short.claim(in_progress(other, "a"), now=time.time())
        assert caught.value.transient
        assert "reached 1 of 2 replicas" in str(caught.value.__cause__)
        assert await store.get(other) is None
    finally:
        await raw.aclose()


async def test_a_completion_short_of_replicas_is_transient_and_stays_stored(
    replicated: tuple[Server, Server],
) -> None:
    primary, _ = replicated
    raw = aioredis.Redis(host=primary.host, port=primary.port)
    store = CachePersistenceLayer(raw, wait_replicas=1, wait_timeout=5)
    short = CachePersistenceLayer(raw, wait_replicas=2, wait_timeout=0.05, retry_attempts=1)
    key = new_key()
    done = completed(key, 7)
    try:
        assert (await store.claim(in_progress(key, "a"), now=time.time())).claimed
        with pytest.raises(IdempotencyPersistenceConnectionError) as caught:
            await short.complete(done, owner=tok("a"))
        assert caught.value.transient  # the engine keeps storing it in the background
        assert "the result of" in str(caught.value.__cause__)
        assert "reached 1 of 2 replicas" in str(caught.value.__cause__)
        stored = await store.get(key)
        assert stored is not None
        assert stored.response_json() == 7  # written all the same
        await store.complete(done, owner=tok("a"))  # the same completion resent: done
    finally:
        await raw.aclose()


async def test_wait_replicas_on_a_cluster_waits_on_the_node_holding_each_key(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.cluster("redis")[0]
    raw = aioredis.RedisCluster(node.host, node.port)  # new: learns the nodes on first use
    store = CachePersistenceLayer(raw, wait_replicas=1, wait_timeout=0.05, retry_attempts=1)
    try:
        keys = keys_on_every_node(new_key)
        for key in keys:
            # The cluster has no replicas: every node answers WAIT with 0.
            with pytest.raises(IdempotencyPersistenceConnectionError, match="unreachable"):
                await store.claim(in_progress(key, "a"), now=time.time())
            assert await store.get(key) is None  # released
        assert len({holder_of(raw, key).name for key in keys}) == 3
        plain = CachePersistenceLayer(raw)
        assert (await plain.claim(in_progress(keys[0], "a"), now=time.time())).claimed
    finally:
        await raw.aclose()


async def test_replies_on_a_cluster_node_stay_in_step_after_an_error_reply(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.cluster("redis")[0]
    raw = aioredis.RedisCluster(node.host, node.port)
    adapter = RedisPyCacheClient(raw)
    echo = echo_script()
    failing = LuaScript(f"-- {uuid.uuid4().hex}\nreturn redis.error_reply('refused by the script')")
    try:
        keys = keys_on_every_node(new_key)
        for n, key in enumerate(keys):
            reply = await adapter.run_script_durably(echo, key, [n], replicas=0, timeout_ms=1)
            assert reply == (str(n).encode(), 0)
            with pytest.raises(redis.exceptions.ResponseError, match="refused by the script"):
                await adapter.run_script_durably(failing, key, [], replicas=0, timeout_ms=1)
            # The error was read with the WAIT after it: the next replies are this call's.
            reply = await adapter.run_script_durably(echo, key, ["next"], replicas=0, timeout_ms=1)
            assert reply == (b"next", 0)
        assert len({holder_of(raw, key).name for key in keys}) == 3
    finally:
        await raw.aclose()


async def test_a_durable_call_cancelled_on_a_cluster_node_leaves_no_reply_behind(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.cluster("redis")[0]
    raw = aioredis.RedisCluster(node.host, node.port)
    adapter = RedisPyCacheClient(raw)
    echo = echo_script()
    key = new_key()
    try:
        assert await adapter.run_script_durably(echo, key, ["a"], replicas=0, timeout_ms=1) == (
            b"a",
            0,
        )
        holder = holder_of(raw, key)
        admin = redis.Redis(holder.host, holder.port, socket_timeout=5)

        def waiting() -> bool:  # a connection blocked ("b") in WAIT
            return any(
                client["cmd"] == "wait" and "b" in client["flags"] for client in admin.client_list()
            )

        # No replica will ever acknowledge: WAIT blocks for 60 s unless cancelled.
        call = asyncio.create_task(
            adapter.run_script_durably(echo, key, ["late"], replicas=1, timeout_ms=60_000)
        )
        await wait_until(waiting, "the WAIT to block")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # Its connection was dropped, so the next call cannot read the late WAIT reply.
        await wait_until(lambda: not waiting(), "the blocked WAIT's connection to close")
        assert await adapter.run_script_durably(echo, key, ["b"], replicas=0, timeout_ms=1) == (
            b"b",
            0,
        )
        admin.close()
    finally:
        await raw.aclose()


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[list[Server]]:
    """A cluster of this module's own, whose nodes a test may stop."""
    pool = ServerPool()
    try:
        yield pool.cluster("redis")
    finally:
        pool.close()


async def test_a_node_gone_under_a_durable_call_is_a_transient_error(
    own_cluster: list[Server],
) -> None:
    seed = own_cluster[0]
    raw = aioredis.RedisCluster(seed.host, seed.port, socket_connect_timeout=2)
    store = CachePersistenceLayer(raw, wait_replicas=1, wait_timeout=0.05, retry_attempts=1)
    try:
        await raw.initialize()
        key = key_where(lambda k: holder_of(raw, k).port != seed.port)
        gone = next(s for s in own_cluster if s.port == holder_of(raw, key).port)
        gone.process.kill()
        gone.process.wait(BOUND)
        with pytest.raises(IdempotencyPersistenceConnectionError, match="unreachable") as caught:
            await asyncio.wait_for(store.claim(in_progress(key, "a"), now=time.time()), BOUND)
        assert caught.value.transient
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        # The nodes still running still serve their keys.
        alive = key_where(lambda k: holder_of(raw, k).port == seed.port)
        plain = CachePersistenceLayer(raw)
        assert (await plain.claim(in_progress(alive, "a"), now=time.time())).claimed
    finally:
        await raw.aclose()


# -- pools and the cluster's first use -----------------------------------------------------------


async def test_a_blocking_pool_gets_no_bound_of_ours_and_its_calls_wait_for_a_connection(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("valkey")
    name = f"blocking-{uuid.uuid4().hex[:8]}"
    pool = aioredis.BlockingConnectionPool(
        host=node.host, port=node.port, max_connections=2, timeout=BOUND, client_name=name
    )
    raw = aioredis.Redis(connection_pool=pool)
    assert RedisPyCacheClient(raw).max_in_flight is None  # the pool waits by itself
    layer = CachePersistenceLayer(raw)
    try:
        keys = [new_key() for _ in range(30)]
        results = await asyncio.gather(
            *(layer.claim(in_progress(key, "a"), now=time.time()) for key in keys)
        )
        assert all(result.claimed for result in results)
        assert named_connections(node, name) <= 2
        assert [(await layer.get(key)) is not None for key in keys] == [True] * 30
    finally:
        await raw.aclose()


async def test_concurrent_first_commands_learn_the_cluster_once(cache_servers: ServerPool) -> None:
    node = cache_servers.cluster("redis")[0]
    raw = aioredis.RedisCluster(node.host, node.port)
    adapter = RedisPyCacheClient(raw)
    learned = 0
    initialize = raw.initialize

    async def counted() -> Any:
        nonlocal learned
        learned += 1
        return await initialize()

    raw.initialize = counted  # type: ignore[assignment,method-assign]
    try:
        keys = [new_key() for _ in range(8)]
        assert await asyncio.gather(*(adapter.get(key) for key in keys)) == [None] * 8
        assert learned == 1
    finally:
        await raw.aclose()


async def test_check_of_a_cluster_client_reads_info_from_one_of_its_nodes(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.cluster("redis")[0]
    raw = aioredis.RedisCluster(node.host, node.port)  # new: INFO learns the nodes first
    layer = CachePersistenceLayer(raw)
    try:
        first = await asyncio.wait_for(layer.check(), BOUND)
        assert (await layer.claim(in_progress(new_key(), "a"), now=time.time())).claimed
        again = await asyncio.wait_for(layer.check(), BOUND)  # on a client in use
    finally:
        await raw.aclose()
    for report in (first, again):
        assert report.ok, str(report)
        server = dict(report.facts)["server"]
        assert server.startswith("Redis ")
        assert server.endswith("(cluster)")


# -- which clients the layer closes -----------------------------------------------------------


@pytest.mark.parametrize("owned", [False, True], ids=["not-owned", "owned"])
async def test_an_adapter_from_a_factory_is_closed_by_the_layer_only_when_it_owns_its_client(
    cache_servers: ServerPool, owned: bool
) -> None:
    node = cache_servers.standalone("valkey")
    name = f"adapter-{uuid.uuid4().hex[:8]}"
    raw = aioredis.Redis(host=node.host, port=node.port, client_name=name)

    async def factory() -> RedisPyCacheClient:
        return RedisPyCacheClient(raw, owned=owned)

    layer = CachePersistenceLayer(client_factory=factory)
    key = new_key()
    try:
        assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
        assert named_connections(node, name) == 1
        await layer.aclose()
        if owned:
            await wait_until(lambda: named_connections(node, name) == 0, "the client to close")
        else:
            assert named_connections(node, name) == 1
            assert await raw.get(key) is not None  # the user's client still works
    finally:
        await raw.aclose()
