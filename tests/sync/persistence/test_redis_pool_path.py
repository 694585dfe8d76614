"""The sync redis-py adapter's commands sent on a pooled connection directly
(`SyncRedisPyCacheClient._on_pool`, `PoolConnections`): connections kept between
commands (none from a ``BlockingConnectionPool``, none across a fork), and under
faults: a connection whose reply may still be on its way is never used again, a lost
reply is recognised as the caller's own on the resend, a flushed script cache falls
back to EVAL, a frozen server gives a typed error, and clients that are not a plain
standalone pool keep the client's own ``execute_command``.

Faults come from `tests.faults.proxy.FaultProxy` in front of a real Redis server.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from aioidempotency import (
    CachePersistenceLayer,
    IdempotencyConfig,
    IdempotencyPersistenceConnectionError,
    SyncCachePersistenceLayer,
    idempotent_function,
)
from aioidempotency._records import RecordStatus
from aioidempotency._sync.redis import SyncRedisPyCacheClient
from aioidempotency._twins import as_sync_store
from tests.faults.proxy import FaultProxy
from tests.persistence.test_cache_store import completed, in_progress, tok
from tests.servers.redis import Server, ServerPool

#: The client's socket timeout behind the proxy (seconds): short, so faults show fast.
TIMEOUT = 0.3


@pytest.fixture
def server(cache_servers: ServerPool) -> Server:
    return cache_servers.standalone("redis")


@pytest.fixture
def proxy(server: Server) -> Iterator[FaultProxy]:
    with FaultProxy(server.host, server.port) as running:
        yield running


@pytest.fixture
def layer(proxy: FaultProxy) -> Iterator[SyncCachePersistenceLayer]:
    """A sync store on a redis-py client through the proxy, with short timeouts and
    the default retries (3 attempts)."""
    client = redis.Redis(
        proxy.host, proxy.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
    )
    store = as_sync_store(CachePersistenceLayer(client))
    assert isinstance(store, SyncCachePersistenceLayer)
    try:
        yield store
    finally:
        client.close()


def key() -> str:
    return f"test-pool-path#{uuid.uuid4().hex}"


def adapter_of(layer: SyncCachePersistenceLayer) -> SyncRedisPyCacheClient:
    layer.get(key())  # opens the layer's client
    assert layer._clients is not None
    opened = layer._clients.ready()
    assert opened is not None
    assert isinstance(opened.client, SyncRedisPyCacheClient)
    return opened.client


def test_a_plain_standalone_client_runs_scripts_on_its_pool(
    layer: SyncCachePersistenceLayer,
) -> None:
    adapter = adapter_of(layer)
    assert adapter._connections is not None
    assert adapter._connections.pool is adapter.client.connection_pool
    k = key()
    assert layer.claim(in_progress(k, tok("a")), now=0).claimed
    record = layer.get(k)
    assert record is not None
    assert record.owner == tok("a")


def test_clients_without_a_shared_pool_keep_their_own_path(
    server: Server, cache_servers: ServerPool
) -> None:
    single = redis.Redis(server.host, server.port, single_connection_client=True)
    nodes = cache_servers.cluster("redis")
    cluster = redis.RedisCluster(nodes[0].host, nodes[0].port)
    try:
        assert SyncRedisPyCacheClient(single)._connections is None
        assert SyncRedisPyCacheClient(cluster)._connections is None
        for client in (single, cluster):  # and their scripts still run
            store = as_sync_store(CachePersistenceLayer(client))
            k = f"{{pool}}{key()}"
            assert store.claim(in_progress(k, tok("b")), now=0).claimed
            store.complete(completed(k, {"ok": 1}), owner=tok("b"))
            done = store.get(k)
            assert done is not None
            assert done.status is RecordStatus.COMPLETED
    finally:
        single.close()
        cluster.close()


def test_a_lost_claim_reply_is_recognised_as_the_callers_own_on_the_resend(
    layer: SyncCachePersistenceLayer, proxy: FaultProxy
) -> None:
    k = key()
    before = proxy.stats().resets
    proxy.reset_next(k.encode(), deliver=True)  # the claim lands, its reply is lost
    result = layer.claim(in_progress(k, tok("c")), now=0)
    assert proxy.stats().resets == before + 1
    # The resend found a record: the caller's own claim (the engine compares tokens).
    assert not result.claimed
    assert result.existing is not None
    assert result.existing.owner == tok("c")


def test_a_reply_held_past_the_timeout_is_never_read_by_the_next_call(
    layer: SyncCachePersistenceLayer, proxy: FaultProxy, server: Server
) -> None:
    first, second = key(), key()
    proxy.hold_replies()
    with pytest.raises(IdempotencyPersistenceConnectionError):
        layer.claim(in_progress(first, tok("d")), now=0)
    proxy.pass_through()  # the held replies flow now, to connections given up on
    # A connection left with a late reply in it would answer this claim with the
    # first claim's reply; each connection that timed out was disconnected instead.
    assert layer.claim(in_progress(second, tok("e")), now=0).claimed
    stored = server.admin().get(second)
    assert stored is not None
    assert tok("e").encode() in stored


def test_an_interrupted_read_disconnects_the_connection(
    layer: SyncCachePersistenceLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = adapter_of(layer)
    pool = adapter.client.connection_pool
    connection = pool.get_connection()
    pool.release(connection)  # the next call takes this one
    original = connection.read_response

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(connection, "read_response", original)
        raise KeyboardInterrupt  # as Ctrl-C between sending and reading

    monkeypatch.setattr(connection, "read_response", interrupted)
    k = key()
    with pytest.raises(KeyboardInterrupt):
        layer.claim(in_progress(k, tok("f")), now=0)
    assert connection._sock is None  # disconnected: its unread reply is dropped
    other = key()
    assert layer.claim(in_progress(other, tok("g")), now=0).claimed
    mine = layer.get(k)  # the interrupted claim did land; a resend would see it as own
    assert mine is not None
    assert mine.owner == tok("f")


def evals(admin: redis.Redis) -> int:
    stats: dict[str, Any] = admin.info("commandstats")
    return int(stats.get("cmdstat_eval", {}).get("calls", 0))


def test_a_flushed_script_cache_falls_back_to_eval(
    layer: SyncCachePersistenceLayer, server: Server
) -> None:
    adapter_of(layer)
    admin = server.admin()
    for attempt in range(2):  # first with the scripts cached, then flushed
        if attempt:
            admin.script_flush()
        before = evals(admin)
        k = key()
        assert layer.claim(in_progress(k, tok("h")), now=0).claimed  # SET NX GET
        layer.release(k, owner=tok("h"))  # a script
        assert layer.claim(in_progress(k, tok("h")), now=0).claimed
        layer.complete(completed(k, {"n": attempt}), owner=tok("h"))  # another
        done = layer.get(k)
        assert done is not None
        assert done.response_data == json.dumps({"n": attempt})
        if attempt:  # each script fell back once, and is cached again
            assert evals(admin) == before + 2


def test_a_frozen_server_gives_a_typed_error_and_the_store_recovers(
    layer: SyncCachePersistenceLayer, proxy: FaultProxy
) -> None:
    adapter_of(layer)
    proxy.stall()
    with pytest.raises(IdempotencyPersistenceConnectionError):
        layer.claim(in_progress(key(), tok("i")), now=0)
    proxy.pass_through()
    k = key()
    assert layer.claim(in_progress(k, tok("j")), now=0).claimed


@pytest.mark.parametrize("target", [b"INPROGRESS", b"COMPLETED"], ids=["claim", "complete"])
def test_a_call_whose_reply_is_lost_runs_once_and_completes(
    proxy: FaultProxy, target: bytes
) -> None:
    client = redis.Redis(
        proxy.host, proxy.port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
    )
    store = CachePersistenceLayer(client)
    runs: list[str] = []

    @idempotent_function(
        data_keyword_argument="order", persistence_store=store, config=IdempotencyConfig()
    )
    def charge(order: dict[str, str]) -> dict[str, str]:
        runs.append(order["id"])
        return {"charged": order["id"]}

    with contextlib.closing(client):
        order = {"id": uuid.uuid4().hex}
        proxy.reset_next(target, deliver=True)
        assert charge(order=order) == {"charged": order["id"]}
        assert proxy.stats().resets >= 1
        assert charge(order=order) == {"charged": order["id"]}  # a replay
        assert runs == [order["id"]]


# -- connections kept between commands ------------------------------------------------------


def created(pool: Any) -> int:
    """How many connections `pool` has made (idle in it or in use)."""
    return len(pool._available_connections) + len(pool._in_use_connections)


def test_one_connection_is_kept_for_sequential_calls(server: Server) -> None:
    client = redis.Redis(server.host, server.port)
    with contextlib.closing(client):
        store = SyncCachePersistenceLayer(client)
        adapter = adapter_of(store)
        assert adapter._connections is not None
        for n in range(20):
            k = key()
            assert store.claim(in_progress(k, tok("k")), now=0).claimed
            store.complete(completed(k, {"n": n}), owner=tok("k"))
        assert adapter._connections.idle() == 1  # kept between the 40 commands
        assert created(client.connection_pool) == 1


def test_a_blocking_pool_gets_each_connection_back_at_once(server: Server) -> None:
    pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
        host=server.host, port=server.port, max_connections=4
    )
    client = redis.Redis(connection_pool=pool)
    with contextlib.closing(client):
        store = SyncCachePersistenceLayer(client)
        adapter = adapter_of(store)
        assert adapter._connections is not None
        k = key()
        assert store.claim(in_progress(k, tok("l")), now=0).claimed
        assert adapter._connections.idle() == 0
        assert pool.pool.full()  # every connection it made is back in its queue


def test_at_most_a_quarter_of_a_pool_is_kept_idle(server: Server) -> None:
    client = redis.Redis(server.host, server.port, max_connections=8)
    threads = 6
    with contextlib.closing(client):
        store = SyncCachePersistenceLayer(client)
        adapter = adapter_of(store)
        assert adapter._connections is not None
        held = [adapter._connections.take() for _ in range(threads)]  # 6 calls at once
        for connection in held:
            adapter._connections.give_back(connection)
        assert adapter._connections.idle() == 2  # 8 // 4; the others went back
        assert len(client.connection_pool._in_use_connections) == 2


def test_threads_keep_no_more_connections_than_ran_at_once(server: Server) -> None:
    client = redis.Redis(server.host, server.port)
    threads, calls = 8, 25
    start = threading.Barrier(threads, timeout=30)
    failures: list[BaseException] = []

    with contextlib.closing(client):
        store = SyncCachePersistenceLayer(client)
        adapter = adapter_of(store)
        assert adapter._connections is not None

        def work(name: str) -> None:
            try:
                start.wait()
                for _ in range(calls):
                    k = key()
                    assert store.claim(in_progress(k, tok(name)), now=0).claimed
                    store.complete(completed(k, {"by": name}), owner=tok(name))
                    done = store.get(k)
                    assert done is not None
                    assert done.response_data == json.dumps({"by": name})
            except BaseException as exc:  # reported below
                failures.append(exc)

        workers = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert failures == []
        assert 1 <= adapter._connections.idle() <= threads
        # the layer's own plus the client's GETs: never more than the threads at once
        assert created(client.connection_pool) <= 2 * threads


def test_a_forked_child_never_uses_the_parents_connection(server: Server) -> None:
    """A layer refuses a client passed to it in a forked child, and opens its own per
    process otherwise; the adapter's kept connections are still dropped in a child."""
    client = redis.Redis(server.host, server.port)
    with contextlib.closing(client):
        adapter = SyncRedisPyCacheClient(client)
        connections = adapter._connections
        assert connections is not None
        assert adapter.set_nx_get(key(), "parent", ex=60) is None
        (parents,) = connections._idle
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            ok = False
            try:
                ok = adapter.set_nx_get(key(), "child", ex=60) is None and all(
                    kept is not parents for kept in connections._idle
                )
            finally:
                os.write(write, b"1" if ok else b"0")
                os._exit(0)
        os.close(write)
        try:
            assert os.read(read, 1) == b"1"  # blocks until the child wrote (bounded: it exits)
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        assert connections._idle == [parents]  # the parent's is still kept, and works
        k = key()
        assert adapter.set_nx_get(k, "again", ex=60) is None
        assert adapter.set_nx_get(k, "later", ex=60) == b"again"
