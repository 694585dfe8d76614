"""The valkey-glide asyncio adapter (`GlideCacheClient`) on real servers: when glide is
imported, what the adapter refuses, the URL's database, `wait_replicas` on a standalone
primary and on a cluster's nodes, glide's errors as the store's typed errors (another
Redis type, a command the ACL refuses, a client glide cannot create), a login refused
after a password change, a script call whose caller is cancelled, INFO of a cluster
client and which clients the layer closes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import glide
import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency._async.cache import CacheAccessDeniedError, CachePersistenceLayer
from aioidempotency._async.glide import GlideCacheClient
from aioidempotency._lua import LuaScript
from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
)
from tests.persistence.cache_setups import acl_user, primary_with_replica, set_password
from tests.persistence.test_cache_store import completed, in_progress, new_key, tok
from tests.servers.redis import Server, ServerPool, keys_on_every_node

BOUND = 30.0


@pytest.fixture(scope="module")
def replicated(cache_servers: ServerPool) -> tuple[Server, Server]:
    return primary_with_replica(cache_servers)


@pytest.fixture
async def raw_clients() -> AsyncIterator[list[Any]]:
    """glide clients a test creates (see `open_raw`), closed at its end."""
    opened: list[Any] = []
    yield opened
    for client in opened:
        await client.close()


async def open_raw(opened: list[Any], node: Server, *, cluster: bool = False) -> Any:
    """A glide client of the user's, created in the running loop."""
    addresses = [glide.NodeAddress(node.host, node.port)]
    client: Any
    if cluster:
        config: Any = glide.GlideClusterClientConfiguration(addresses, request_timeout=5000)
        client = await glide.GlideClusterClient.create(config)
    else:
        config = glide.GlideClientConfiguration(addresses, request_timeout=5000)
        client = await glide.GlideClient.create(config)
    opened.append(client)
    return client


def url_of(node: Server, *, user: str = "", path: str = "", **query: str) -> str:
    auth = f"{user}@" if user else ""
    options = "".join(f"&{name}={value}" for name, value in query.items())
    return f"redis://{auth}{node.host}:{node.port}{path}?client=glide&timeout=5{options}"


async def wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll `check` (a quick call to a server) until it holds, for at most BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def dead_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- what the adapter needs -----------------------------------------------------------------


def test_glide_is_imported_only_once_a_glide_client_is_opened(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    code = f"""
        import asyncio, sys
        from aioidempotency import CachePersistenceLayer, SyncCachePersistenceLayer

        url = "redis://{node.host}:{node.port}?client=glide&timeout=5"
        layer = CachePersistenceLayer.from_url(url)
        twin = SyncCachePersistenceLayer.from_url(url)
        print("built:", "glide" in sys.modules, "glide_sync" in sys.modules)

        async def main():
            try:
                return await layer.get("absent")
            finally:
                await layer.aclose()

        print("async:", asyncio.run(main()), "glide" in sys.modules)
        print("sync:", twin.get("absent"), "glide_sync" in sys.modules)
        twin.close()
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "built: False False",
        "async: None True",
        "sync: None True",
    ]


async def test_a_client_that_is_not_glide_is_refused(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    raw = aioredis.Redis(host=node.host, port=node.port)
    try:
        with pytest.raises(IdempotencyPersistenceConfigError) as refused:
            GlideCacheClient(raw)
    finally:
        await raw.aclose()
    assert str(refused.value) == "expected a GlideClient or GlideClusterClient, got Redis"


async def test_the_urls_database_is_the_one_written(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    key = new_key()
    async with CachePersistenceLayer.from_url(url_of(node, path="/3")) as layer:
        assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
        await layer.complete(completed(key, 5), owner=tok("a"))
    with node.admin() as db0, redis.Redis(host=node.host, port=node.port, db=3) as db3:
        assert db0.get(key) is None
        stored = db3.get(key)
    assert stored is not None
    assert json.loads(stored)["status"] == "COMPLETED"


async def test_a_client_glide_cannot_create_is_a_typed_error(
    cache_servers: ServerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With lazy_connect, a server started here never makes `create` fail; glide's
    # eager connect fails this way when the server cannot be reached.
    failure = glide.RequestError("Standalone connect failed - IoError: connection refused")

    async def failing_create(config: Any) -> Any:
        raise failure

    monkeypatch.setattr(glide.GlideClient, "create", failing_create)
    node = cache_servers.standalone("valkey")
    async with CachePersistenceLayer.from_url(url_of(node), retry_attempts=1) as layer:
        with pytest.raises(IdempotencyPersistenceConnectionError) as caught:
            await layer.get(new_key())
    assert caught.value.transient
    assert caught.value.__cause__ is failure


# -- glide's errors as the store's ----------------------------------------------------------


async def test_a_key_holding_another_redis_type_is_an_unusable_record(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("valkey")
    key = new_key()
    with node.admin() as admin:
        admin.hset(key, "status", "COMPLETED")
    async with CachePersistenceLayer.from_url(url_of(node)) as layer:
        with pytest.raises(IdempotencyInvalidStatusError, match="another Redis type"):
            await layer.get(key)
    with node.admin() as admin:
        assert admin.hgetall(key) == {b"status": b"COMPLETED"}  # left as it was


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
async def test_a_delete_the_acl_refuses_is_access_denied(
    cache_servers: ServerPool, atomic: bool
) -> None:
    node = cache_servers.standalone("valkey")
    key = new_key()
    with acl_user([node], "+@all", "-del") as user:
        url = url_of(node, user=f"{user}:pw", atomic=str(atomic).lower())
        async with CachePersistenceLayer.from_url(url) as layer:
            assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
            with pytest.raises(CacheAccessDeniedError) as caught:
                await layer.delete(key)
            assert not caught.value.transient
            assert await layer.get(key) is not None  # still there


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
async def test_a_wait_the_acl_refuses_is_access_denied(
    cache_servers: ServerPool, cluster: bool
) -> None:
    nodes = cache_servers.cluster("valkey") if cluster else [cache_servers.standalone("valkey")]
    query = {"wait_replicas": "1", "wait_timeout": "0.05"}
    if cluster:
        query["cluster"] = "true"
    with acl_user(nodes, "+@all", "-wait") as user:
        async with CachePersistenceLayer.from_url(
            url_of(nodes[0], user=f"{user}:pw", **query)
        ) as layer:
            with pytest.raises(CacheAccessDeniedError) as caught:
                await layer.claim(in_progress(new_key(), "a"), now=time.time())
    assert not caught.value.transient
    assert "wait" in str(caught.value.__cause__).lower()


async def test_a_password_changed_under_a_running_layer_is_access_denied_not_a_timeout(
    cache_servers: ServerPool,
) -> None:
    # glide logs in again in the background and reports the refusal only as timed-out
    # requests: the layer asks a fresh client, which is refused at once.
    node = cache_servers.standalone("valkey")
    with acl_user([node], "+@all") as user:
        url = url_of(node, user=f"{user}:pw", timeout="0.5")
        async with CachePersistenceLayer.from_url(url) as layer:
            assert await layer.get(new_key()) is None
            set_password([node], user, "rotated")
            with pytest.raises(CacheAccessDeniedError) as caught:
                await asyncio.wait_for(layer.get(new_key()), BOUND)
    assert not caught.value.transient
    assert "WRONGPASS" in str(caught.value)


async def test_diagnose_blames_only_a_refused_login(
    cache_servers: ServerPool, raw_clients: list[Any]
) -> None:
    node = cache_servers.standalone("valkey")
    seed = cache_servers.cluster("valkey")[0]
    passed = GlideCacheClient(await open_raw(raw_clients, node))
    assert await passed.diagnose() is None  # not built by connect: nothing to go on
    healthy = await GlideCacheClient.connect(node.host, node.port)
    healthy_cluster = await GlideCacheClient.connect(seed.host, seed.port, cluster=True)
    down = await GlideCacheClient.connect("127.0.0.1", dead_port(), request_timeout_ms=500)
    refused = await GlideCacheClient.connect(
        seed.host, seed.port, cluster=True, username="nobody", password="wrong"
    )
    try:
        assert await healthy.diagnose() is None
        assert await healthy_cluster.diagnose() is None
        assert await down.diagnose() is None  # unreachable: the timeouts say it all
        found = await refused.diagnose()
        assert isinstance(found, CacheAccessDeniedError)
        assert "WRONGPASS" in str(found) or "invalid username-password" in str(found)
    finally:
        for adapter in (healthy, healthy_cluster, down, refused):
            await adapter.aclose()


# -- a cancelled caller -----------------------------------------------------------------------


async def test_a_script_whose_caller_is_cancelled_still_runs_whole(
    cache_servers: ServerPool, raw_clients: list[Any]
) -> None:
    """glide 2.6 can free a script call's arguments when the awaiting task is cancelled,
    then send freed memory: the adapter runs the call in a task of its own."""
    node = cache_servers.standalone("valkey")
    adapter = GlideCacheClient(await open_raw(raw_clients, node))
    write = LuaScript(f"-- {uuid.uuid4().hex}\nreturn redis.call('SET', KEYS[1], ARGV[1])")
    key, value = new_key(), uuid.uuid4().hex * 2048  # 64 KiB
    caller = asyncio.create_task(adapter.run_script(write, key, [value]))
    await asyncio.sleep(0)  # one step of the loop: the caller starts its call
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    with node.admin() as admin:
        await wait_until(lambda: admin.exists(key) == 1, "the script to run")
        assert admin.get(key) == value.encode()


async def test_a_plain_claim_whose_caller_is_cancelled_writes_its_value_whole(
    cache_servers: ServerPool, raw_clients: list[Any]
) -> None:
    """The claim's ``SET NX GET``, cancelled one loop step after it was sent, lands whole
    or not at all (a script call's arguments can be freed under it, see above)."""
    node = cache_servers.standalone("valkey")
    adapter = GlideCacheClient(await open_raw(raw_clients, node))
    landed = 0
    for step in range(40):
        key, value = new_key(), uuid.uuid4().hex * 2048  # 64 KiB
        caller = asyncio.create_task(adapter.set_nx_get(key, value, ex=600))
        for _ in range(step % 4):
            await asyncio.sleep(0)  # the call is sent and in flight
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        assert await adapter.get(key) in (None, value.encode())
        landed += await adapter.get(key) is not None
        # glide answers a client's requests in order: once this one is back, so is the
        # cancelled one, which is now either stored whole or never sent.
        assert await adapter.set_nx_get(key, "later", ex=600) in (None, value.encode())
    assert landed > 0  # some calls were cancelled after they reached the server


async def test_a_failed_script_whose_caller_is_cancelled_logs_no_unretrieved_error(
    cache_servers: ServerPool, raw_clients: list[Any]
) -> None:
    node = cache_servers.standalone("valkey")
    adapter = GlideCacheClient(await open_raw(raw_clients, node))
    failing = LuaScript(f"-- {uuid.uuid4().hex}\nreturn redis.error_reply('refused')")
    echo = LuaScript(f"-- {uuid.uuid4().hex}\nreturn ARGV[1]")
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        caller = asyncio.create_task(adapter.run_script(failing, new_key(), []))
        await asyncio.sleep(0)  # one step of the loop: the caller starts its call
        caller.cancel()
        await asyncio.wait([caller])  # not raised here: no traceback keeps the call alive
        assert caller.cancelled()
        del caller
        # glide answers a client's requests in order: once this one is back, so is the
        # failed one, and its outcome was consumed when it finished.
        assert await adapter.run_script(echo, new_key(), ["after"]) == b"after"
        await asyncio.sleep(0)  # one step of the loop: done callbacks run
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


# -- wait_replicas ------------------------------------------------------------------------------


async def test_wait_replicas_waits_for_the_replica_on_the_connection_that_wrote(
    replicated: tuple[Server, Server], raw_clients: list[Any]
) -> None:
    primary, replica = replicated
    raw = await open_raw(raw_clients, primary)
    store = CachePersistenceLayer(raw, wait_replicas=1, wait_timeout=5)
    key = new_key()
    assert (await store.claim(in_progress(key, "a"), now=time.time())).claimed
    with replica.admin() as on_replica:
        assert on_replica.get(key) is not None  # WAIT returned: the replica has it
        await store.complete(completed(key, 7), owner=tok("a"))
        assert json.loads(on_replica.get(key))["status"] == "COMPLETED"
    # More replicas than there are: the claim is released and refused (transient).
    short = CachePersistenceLayer(raw, wait_replicas=2, wait_timeout=0.05, retry_attempts=1)
    other = new_key()
    with pytest.raises(IdempotencyPersistenceConnectionError) as caught:
        await short.claim(in_progress(other, "a"), now=time.time())
    assert caught.value.transient
    assert "reached 1 of 2 replicas" in str(caught.value.__cause__)
    assert await store.get(other) is None


async def test_wait_replicas_on_a_cluster_waits_on_the_node_holding_each_key(
    cache_servers: ServerPool, raw_clients: list[Any]
) -> None:
    seed = cache_servers.cluster("valkey")[0]
    raw = await open_raw(raw_clients, seed, cluster=True)
    adapter = GlideCacheClient(raw)
    store = CachePersistenceLayer(raw, wait_replicas=1, wait_timeout=0.05, retry_attempts=1)
    echo = LuaScript(f"-- {uuid.uuid4().hex}\nreturn ARGV[1]")
    keys = keys_on_every_node(new_key)
    for n, key in enumerate(keys):
        reply = await adapter.run_script_durably(echo, key, [n], replicas=0, timeout_ms=1)
        assert reply == (str(n).encode(), 0)
        # The cluster has no replicas: every node answers WAIT with 0.
        with pytest.raises(IdempotencyPersistenceConnectionError, match="unreachable"):
            await store.claim(in_progress(key, "a"), now=time.time())
        assert await store.get(key) is None  # released
    with redis.RedisCluster(seed.host, seed.port) as admin:
        assert len({admin.get_node_from_key(key).name for key in keys}) == 3


# -- INFO and closing -----------------------------------------------------------------------------


async def test_check_of_a_cluster_client_reads_info_from_one_of_its_nodes(
    cache_servers: ServerPool, raw_clients: list[Any]
) -> None:
    seed = cache_servers.cluster("valkey")[0]
    layer = CachePersistenceLayer(await open_raw(raw_clients, seed, cluster=True))
    report = await asyncio.wait_for(layer.check(), BOUND)
    assert report.ok, str(report)
    server = dict(report.facts)["server"]
    assert server.startswith("Valkey ")
    assert server.endswith("(cluster)")


@pytest.mark.parametrize("owned", [False, True], ids=["not-owned", "owned"])
async def test_an_adapter_from_a_factory_is_closed_by_the_layer_only_when_it_owns_its_client(
    cache_servers: ServerPool, raw_clients: list[Any], owned: bool
) -> None:
    node = cache_servers.standalone("valkey")
    raw = await open_raw(raw_clients, node)

    async def factory() -> GlideCacheClient:
        return GlideCacheClient(raw, owned=owned)

    layer = CachePersistenceLayer(client_factory=factory)
    key = new_key()
    assert (await layer.claim(in_progress(key, "a"), now=time.time())).claimed
    await layer.aclose()
    if owned:
        with pytest.raises(glide.ClosingError):
            await raw.get(key)
    else:
        assert await raw.get(key) is not None  # the user's client still works
