"""The redis-py sync adapter (`SyncRedisPyCacheClient`) on real servers: a connection
the server asks to move, replies on a cluster node's pipeline after an error reply, a
node that is gone, INFO of a cluster client and which clients the layer closes.
`wait_replicas` itself is in tests/sync/persistence/test_cache_store.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis

from aioidempotency._lua import LuaScript
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._sync.redis import SyncRedisPyCacheClient
from aioidempotency.exceptions import IdempotencyPersistenceConnectionError
from tests.persistence.cache_setups import primary_with_replica
from tests.persistence.test_cache_store import completed, in_progress, new_key, tok
from tests.servers.redis import Server, ServerPool, keys_on_every_node

BOUND = 30.0


def echo_script() -> LuaScript:
    """A script no server has cached yet: its first EVALSHA is refused (NOSCRIPT)."""
    return LuaScript(f"-- {uuid.uuid4().hex}\nreturn ARGV[1]")


def named_connections(node: Server, name: str) -> int:
    with node.admin() as admin:
        return sum(1 for client in admin.client_list() if client.get("name") == name)


def wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll `check` (a quick call to a server) until it holds, for at most BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # polling interval, not a synchronisation stand-in


def holder_of(raw: redis.RedisCluster, key: str) -> Any:
    """The node of `raw` that holds `key`."""
    return cast(Any, raw).get_node_from_key(key)


def key_where(check: Callable[[str], bool]) -> str:
    """A new key for which `check` holds (among at most 1000 tries)."""
    for key in (new_key() for _ in range(1000)):
        if check(key):
            return key
    raise AssertionError("no such key among 1000")


@pytest.fixture(scope="module")
def replicated(cache_servers: ServerPool) -> tuple[Server, Server]:
    return primary_with_replica(cache_servers)


def test_a_completion_short_of_replicas_is_transient_and_stays_stored(
    replicated: tuple[Server, Server],
) -> None:
    primary, _ = replicated
    with primary.admin() as raw:
        store = SyncCachePersistenceLayer(raw, wait_replicas=1, wait_timeout=5)
        short = SyncCachePersistenceLayer(raw, wait_replicas=2, wait_timeout=0.05, retry_attempts=1)
        key = new_key()
        done = completed(key, 7)
        assert store.claim(in_progress(key, "a"), now=time.time()).claimed
        with pytest.raises(IdempotencyPersistenceConnectionError) as caught:
            short.complete(done, owner=tok("a"))
        assert caught.value.transient  # the engine keeps storing it in the background
        assert "the result of" in str(caught.value.__cause__)
        assert "reached 1 of 2 replicas" in str(caught.value.__cause__)
        stored = store.get(key)
        assert stored is not None
        assert stored.response_json() == 7  # written all the same
        store.complete(done, owner=tok("a"))  # the same completion resent: done


def test_a_connection_the_server_asks_to_move_is_closed_not_reused(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("valkey")
    name = f"moving-{uuid.uuid4().hex[:8]}"
    pool = redis.ConnectionPool(host=node.host, port=node.port, max_connections=1, client_name=name)
    raw = redis.Redis(connection_pool=pool)
    adapter = SyncRedisPyCacheClient(raw)
    echo = echo_script()
    key = new_key()

    def connection_ids() -> set[str]:
        with node.admin() as admin:
            return {c["id"] for c in admin.client_list() if c.get("name") == name}

    try:
        assert adapter.run_script(echo, key, ["a"]) == b"a"  # EVAL after NOSCRIPT
        first = connection_ids()
        assert len(first) == 1
        connection: Any = pool.get_connection()  # the pool's one connection
        pool.release(connection)
        read = connection.read_response

        def read_then_marked(*args: Any, **kwargs: Any) -> Any:
            # redis-py marks a connection when the server announces maintenance
            # (a MOVING push); a server started here cannot announce it on demand.
            reply = read(*args, **kwargs)
            connection.mark_for_reconnect()
            return reply

        connection.read_response = read_then_marked
        assert adapter.run_script(echo, key, ["b"]) == b"b"
        assert not connection.is_connected  # closed before it went back to the pool
        wait_until(lambda: not connection_ids(), "the server to see the connection closed")
        del connection.read_response
        assert adapter.run_script(echo, key, ["c"]) == b"c"  # on a new connection
        second = connection_ids()
        assert len(second) == 1
        assert second != first
    finally:
        raw.close()


def test_replies_on_a_cluster_node_stay_in_step_after_an_error_reply(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.cluster("redis")[0]
    raw = redis.RedisCluster(node.host, node.port)
    adapter = SyncRedisPyCacheClient(raw)
    echo = echo_script()
    failing = LuaScript(f"-- {uuid.uuid4().hex}\nreturn redis.error_reply('refused by the script')")
    try:
        keys = keys_on_every_node(new_key)
        for n, key in enumerate(keys):
            reply = adapter.run_script_durably(echo, key, [n], replicas=0, timeout_ms=1)
            assert reply == (str(n).encode(), 0)
            with pytest.raises(redis.exceptions.ResponseError, match="refused by the script"):
                adapter.run_script_durably(failing, key, [], replicas=0, timeout_ms=1)
            reply = adapter.run_script_durably(echo, key, ["next"], replicas=0, timeout_ms=1)
            assert reply == (b"next", 0)
        assert len({holder_of(raw, key).name for key in keys}) == 3
    finally:
        raw.close()


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[list[Server]]:
    """A cluster of this module's own, whose nodes a test may stop."""
    pool = ServerPool()
    try:
        yield pool.cluster("redis")
    finally:
        pool.close()


def test_a_node_gone_under_a_durable_call_is_a_transient_error(
    own_cluster: list[Server],
) -> None:
    seed = own_cluster[0]
    raw = redis.RedisCluster(seed.host, seed.port, socket_connect_timeout=2)
    store = SyncCachePersistenceLayer(raw, wait_replicas=1, wait_timeout=0.05, retry_attempts=1)
    try:
        key = key_where(lambda k: holder_of(raw, k).port != seed.port)
        gone = next(s for s in own_cluster if s.port == holder_of(raw, key).port)
        gone.process.kill()
        gone.process.wait(BOUND)
        with pytest.raises(IdempotencyPersistenceConnectionError, match="unreachable") as caught:
            store.claim(in_progress(key, "a"), now=time.time())
        assert caught.value.transient
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        # The nodes still running still serve their keys.
        alive = key_where(lambda k: holder_of(raw, k).port == seed.port)
        plain = SyncCachePersistenceLayer(raw)
        assert plain.claim(in_progress(alive, "a"), now=time.time()).claimed
    finally:
        raw.close()


def test_check_of_a_cluster_client_reads_info_from_one_of_its_nodes(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.cluster("redis")[0]
    raw = redis.RedisCluster(node.host, node.port)
    layer = SyncCachePersistenceLayer(raw)
    try:
        report = layer.check()
    finally:
        raw.close()
    assert report.ok, str(report)
    server = dict(report.facts)["server"]
    assert server.startswith("Redis ")
    assert server.endswith("(cluster)")


@pytest.mark.parametrize("owned", [False, True], ids=["not-owned", "owned"])
def test_an_adapter_from_a_factory_is_closed_by_the_layer_only_when_it_owns_its_client(
    cache_servers: ServerPool, owned: bool
) -> None:
    node = cache_servers.standalone("valkey")
    name = f"adapter-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis(host=node.host, port=node.port, client_name=name)
    layer = SyncCachePersistenceLayer(
        client_factory=lambda: SyncRedisPyCacheClient(raw, owned=owned)
    )
    key = new_key()
    try:
        assert layer.claim(in_progress(key, "a"), now=time.time()).claimed
        assert named_connections(node, name) == 1
        layer.close()
        if owned:
            wait_until(lambda: named_connections(node, name) == 0, "the client to close")
        else:
            assert named_connections(node, name) == 1
            assert raw.get(key) is not None  # the user's client still works
    finally:
        raw.close()
