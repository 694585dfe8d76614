"""The native sync cache store (`SyncCachePersistenceLayer`) on real servers.

Every client it takes (redis-py `Redis` and `RedisCluster`, glide_sync standalone and
cluster, a URL, a bare get/set/delete client and the sync twin of an async layer) is
run through the store contract; then what `@idempotent` gets for each way of building
a `CachePersistenceLayer`, the errors for a client of the wrong kind, Powertools'
constructor arguments, `wait_replicas`, threads and `os.fork()`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import glide_sync
import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency import (
    CachePersistenceLayer,
    IdempotencyConfig,
    IdempotencyPersistenceConnectionError,
    RedisCachePersistenceLayer,
    SyncCachePersistenceLayer,
    idempotent,
    idempotent_async,
    idempotent_function,
    idempotent_function_async,
)
from aioidempotency._records import RecordStatus
from aioidempotency._sync.bridge import BridgedStore
from aioidempotency._twins import as_sync_store
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
)
from tests.persistence import cache_setups
from tests.persistence.test_cache_store import completed, in_progress, new_key, renewed, tok
from tests.servers.redis import Server, ServerPool, keys_on_every_node

WAIT = 30.0


class BareClient:
    """A user's own sync client: get, set (TTL only) and delete, nothing else."""

    def __init__(self, inner: redis.Redis) -> None:
        self.inner = inner
        self.sets: list[dict[str, Any]] = []

    def get(self, name: str) -> bytes | None:
        # redis-py types GET as bytes | str | None; without decode_responses it is bytes.
        return cast("bytes | None", self.inner.get(name))

    def set(self, name: str, value: str, *, ex: int | None = None, nx: bool = False) -> Any:
        self.sets.append({"ex": ex, "nx": nx})
        return self.inner.set(name, value, ex=ex, nx=nx)

    def delete(self, *names: str) -> int:
        count: int = self.inner.delete(*names)
        return count


class BareScriptingClient(BareClient):
    """A user's own sync client that also runs the store's scripts (the atomic path)."""

    def run_script(self, script: Any, key: str, args: Any) -> Any:
        return self.inner.eval(script.code, 1, key, *args)


def _glide_sync(node: Server, *, cluster: bool = False) -> Any:
    addresses = [glide_sync.NodeAddress(node.host, node.port)]
    if cluster:
        config = glide_sync.GlideClusterClientConfiguration(addresses, request_timeout=5000)
        return glide_sync.GlideClusterClient.create(config)
    return glide_sync.GlideClient.create(
        glide_sync.GlideClientConfiguration(addresses, request_timeout=5000)
    )


def _url(node: Server, client: str, **query: str) -> str:
    options = "&".join(f"{name}={value}" for name, value in {"client": client, **query}.items())
    return f"redis://{node.host}:{node.port}?timeout=5&{options}"


#: name -> (cluster, atomic)
STORES = {
    "redis": (False, True),
    "redis_protocol": (False, False),
    "redis_cluster": (True, True),
    "glide": (False, True),
    "glide_cluster": (True, True),
    "url_redis": (False, True),
    "url_glide_protocol": (False, False),
    "url_redis_cluster": (True, True),
    "bare": (False, False),
    "bare_scripting": (False, True),
    "twin_of_url": (False, True),
}


@pytest.fixture(params=list(STORES))
def sync_store(
    request: pytest.FixtureRequest, cache_servers: ServerPool
) -> Iterator[tuple[SyncCachePersistenceLayer, Any]]:
    """A sync cache store of each kind, and an admin client of its server."""
    name = request.param
    cluster, atomic = STORES[name]
    node = cache_servers.cluster("valkey")[0] if cluster else cache_servers.standalone("valkey")
    admin: Any = redis.RedisCluster(node.host, node.port) if cluster else node.admin()
    to_close: list[Callable[[], Any]] = [admin.close]
    store: Any
    if name.startswith("redis"):
        raw: Any = redis.RedisCluster(node.host, node.port) if cluster else node.admin()
        to_close.append(raw.close)
        store = SyncCachePersistenceLayer(raw, atomic=atomic)
    elif name.startswith("glide"):
        raw = _glide_sync(node, cluster=cluster)
        to_close.append(raw.close)
        store = SyncCachePersistenceLayer(raw)
    elif name.startswith("url"):
        client = name.split("_")[1]
        query = {"atomic": str(atomic).lower()} | ({"cluster": "true"} if cluster else {})
        store = SyncCachePersistenceLayer.from_url(_url(node, client, **query))
        to_close.append(store.close)
    elif name.startswith("bare"):
        kind = BareScriptingClient if atomic else BareClient
        bare = kind(node.admin())
        to_close.append(bare.inner.close)
        store = SyncCachePersistenceLayer(bare)
    else:
        layer = CachePersistenceLayer(url=_url(node, "redis"))
        store = as_sync_store(layer)
        to_close.append(store.close)
    assert isinstance(store, SyncCachePersistenceLayer)
    assert store.atomic is atomic
    try:
        yield store, admin
    finally:
        for close in reversed(to_close):
            with contextlib.suppress(Exception):
                close()


def test_the_store_contract(sync_store: tuple[SyncCachePersistenceLayer, Any]) -> None:
    store, admin = sync_store
    key = new_key()
    now = time.time()
    claim = in_progress(key, "a")
    assert store.claim(claim, now=now).claimed
    # Written with its absolute expiry: the server's TTL is what is left of it.
    assert 590 <= admin.ttl(key) <= 600
    refused = store.claim(in_progress(key, "b"), now=now)
    assert not refused.claimed
    assert refused.existing is not None
    assert refused.existing.owner == tok("a")
    # A claim resent after a lost reply returns the caller's own record.
    again = store.claim(claim, now=now)
    assert again.existing is not None
    assert again.existing.owner == tok("a")
    store.renew(renewed(claim, int(now * 1000) + 120_000))
    stored = store.get(key, now=now)
    assert stored is not None
    assert stored.in_progress_expiry_timestamp == int(now * 1000) + 120_000
    store.release(key, owner=tok("b"))  # not b's claim: left alone
    store.complete(completed(key, {"paid": 1}), owner=tok("a"))
    store.complete(completed(key, {"paid": 1}), owner=tok("a"))  # resent: done
    assert 590 <= admin.ttl(key) <= 600
    replay = store.claim(in_progress(key, "c"), now=time.time())
    assert replay.existing is not None
    assert replay.existing.status is RecordStatus.COMPLETED
    assert replay.existing.response_json() == {"paid": 1}
    store.release(key, owner=tok("a"))  # never deletes a completed record
    assert store.get(key) is not None
    assert store.delete(key)
    assert store.get(key) is None
    assert not store.delete(key)


def test_an_orphan_is_taken_over_and_its_late_owner_loses(
    sync_store: tuple[SyncCachePersistenceLayer, Any],
) -> None:
    store, _ = sync_store
    key = new_key()
    orphan = in_progress(key, "a", in_progress_ms=int(time.time() * 1000) - 1)
    assert store.claim(orphan, now=time.time()).claimed
    assert store.claim(in_progress(key, "b"), now=time.time()).claimed
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        store.complete(completed(key, 1), owner=tok("a"))
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        store.renew(renewed(orphan, int(time.time() * 1000) + 60_000))
    store.release(key, owner=tok("a"))
    record = store.get(key)
    assert record is not None
    assert record.owner == tok("b")
    store.release(key, owner=tok("b"))
    assert store.get(key) is None
    with pytest.raises(IdempotencyClaimLostError, match="gone"):
        store.complete(completed(key, 1), owner=tok("b"))


def test_values_that_are_not_records_are_never_overwritten(
    sync_store: tuple[SyncCachePersistenceLayer, Any],
) -> None:
    store, admin = sync_store
    key, listed = new_key(), new_key()
    admin.set(key, "not json")
    admin.rpush(listed, "x")
    for target in (key, listed):
        with pytest.raises(IdempotencyInvalidStatusError):
            store.claim(in_progress(target, "a"), now=time.time())
    assert admin.get(key) == b"not json"
    assert admin.type(listed) == b"list"


def test_a_bare_client_that_knows_only_ttls_gets_the_seconds_left(
    cache_servers: ServerPool,
) -> None:
    bare = BareClient(cache_servers.standalone("redis").admin())
    try:
        store = SyncCachePersistenceLayer(bare)
        key = new_key()
        assert store.claim(in_progress(key, "a", ttl=300), now=time.time()).claimed
        assert bare.sets[0]["nx"] is True
        assert 299 <= bare.sets[0]["ex"] <= 300
        with pytest.raises(IdempotencyPersistenceConfigError, match="cannot run scripts"):
            SyncCachePersistenceLayer(bare, atomic=True)
    finally:
        bare.inner.close()


# -- what @idempotent gets ---------------------------------------------------------------


def charge_counter() -> tuple[list[Any], Callable[..., dict[str, Any]]]:
    calls: list[Any] = []

    def charge(order: dict[str, Any]) -> dict[str, Any]:
        calls.append(order)
        return {"charged": order["id"]}

    return calls, charge


def test_powertools_usage_a_sync_client_serves_idempotent_natively(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")
    client = redis.Redis(host=node.host, port=node.port, decode_responses=True)
    try:
        layer = CachePersistenceLayer(client=client)
        assert layer.atomic
        twin = as_sync_store(layer)
        assert isinstance(twin, SyncCachePersistenceLayer)
        calls, charge = charge_counter()
        wrapped = idempotent_function(data_keyword_argument="order", persistence_store=layer)(
            charge
        )
        order = {"id": uuid.uuid4().hex}
        assert wrapped(order=order) == {"charged": order["id"]}
        assert wrapped(order=order) == {"charged": order["id"]}
        assert calls == [order]

        @idempotent(persistence_store=layer)
        def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
            calls.append(event)
            return {"ok": event["id"]}

        event = {"id": uuid.uuid4().hex}
        assert handler(event, None) == handler(event, None) == {"ok": event["id"]}
        assert calls.count(event) == 1
    finally:
        client.close()


async def test_a_sync_client_is_refused_by_async_code_with_what_to_pass(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")
    client = redis.Redis(host=node.host, port=node.port)
    try:
        layer = CachePersistenceLayer(client)
        with pytest.raises(TypeError, match=r"sync client \(Redis\).*redis\.asyncio"):

            @idempotent_async(persistence_store=layer)
            async def handler(event: dict[str, Any], context: Any) -> None: ...

        with pytest.raises(IdempotencyPersistenceConfigError, match="block the event loop"):
            await layer.claim(in_progress(new_key(), "a"), now=time.time())
        await layer.aclose()  # a client passed in stays open
        assert client.ping()
    finally:
        client.close()


async def test_an_async_client_is_refused_by_sync_code_with_what_to_pass(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")
    client = aioredis.Redis(host=node.host, port=node.port)
    try:
        layer = CachePersistenceLayer(client)
        with pytest.raises(TypeError, match=r"asyncio client.*redis\.Redis"):

            @idempotent(persistence_store=layer)
            def handler(event: dict[str, Any], context: Any) -> None: ...

        with pytest.raises(IdempotencyPersistenceConfigError, match="asyncio client"):
            SyncCachePersistenceLayer(client)
        # The same layer goes on serving async code.
        assert (await layer.claim(in_progress(new_key(), "a"), now=time.time())).claimed
    finally:
        await client.aclose()


async def test_a_custom_async_factory_goes_through_the_bridge(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("redis")

    async def open_client() -> aioredis.Redis:
        return aioredis.Redis(host=node.host, port=node.port)

    layer = CachePersistenceLayer(client_factory=open_client)
    assert isinstance(as_sync_store(layer), BridgedStore)
    await layer.aclose()


@pytest.mark.parametrize("client", ["redis", "glide"])
async def test_a_url_layer_serves_both_worlds_on_the_same_records(
    cache_servers: ServerPool, client: str
) -> None:
    node = cache_servers.standalone("valkey")
    layer = CachePersistenceLayer.from_url(_url(node, client))
    try:
        twin = as_sync_store(layer)
        assert isinstance(twin, SyncCachePersistenceLayer)
        assert as_sync_store(layer) is twin
        assert twin.connection == layer.connection
        calls, charge = charge_counter()
        prefix = new_key()
        sync_charge = idempotent_function(
            data_keyword_argument="order", persistence_store=layer, key_prefix=prefix
        )(charge)

        @idempotent_function_async(
            data_keyword_argument="order", persistence_store=layer, key_prefix=prefix
        )
        async def async_charge(order: dict[str, Any]) -> dict[str, Any]:
            return charge(order)

        order = {"id": uuid.uuid4().hex}
        first = await async_charge(order=order)
        # The sync twin replays what the async layer stored, and vice versa.
        assert await asyncio_to_thread(sync_charge, order=order) == first
        other = {"id": uuid.uuid4().hex}
        assert await asyncio_to_thread(sync_charge, order=other) == await async_charge(order=other)
        assert calls == [order, other]
    finally:
        await layer.aclose()
    # aclose closed the twin's client too; a later sync call opens a new one.
    assert twin._clients is not None
    assert twin._clients.current() is None


async def asyncio_to_thread(fn: Callable[..., Any], **kwargs: Any) -> Any:
    import asyncio

    return await asyncio.wait_for(asyncio.to_thread(fn, **kwargs), WAIT)


def test_threads_share_one_client_and_run_a_payload_once(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    store = SyncCachePersistenceLayer.from_url(_url(node, "glide"))
    calls, charge = charge_counter()
    lock = threading.Lock()

    def slow_charge(order: dict[str, Any]) -> dict[str, Any]:
        with lock:
            result = charge(order)
        time.sleep(0.2)
        return result

    wrapped = idempotent_function(
        data_keyword_argument="order",
        persistence_store=store,
        config=IdempotencyConfig(raise_on_no_idempotency_key=True),
    )(slow_charge)
    order = {"id": uuid.uuid4().hex}
    results: list[Any] = []

    def call() -> None:
        with contextlib.suppress(Exception):
            results.append(wrapped(order=order))

    threads = [threading.Thread(target=call, daemon=True) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    try:
        assert not any(thread.is_alive() for thread in threads)
        assert calls == [order]
        assert results
        assert all(result == {"charged": order["id"]} for result in results)
    finally:
        store.close()


# -- Powertools' constructor ----------------------------------------------------------------


def test_the_constructor_takes_powertools_connection_arguments_and_defaults() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
            RedisCachePersistenceLayer as Theirs,
        )
    ours = inspect.signature(CachePersistenceLayer).parameters
    for name, parameter in inspect.signature(Theirs.__init__).parameters.items():
        if name == "self":
            continue
        assert name in ours, name
        if name != "client":
            assert ours[name].default == parameter.default, name
    assert RedisCachePersistenceLayer is CachePersistenceLayer
    # ssl defaults to True, as in Powertools; a URL says it with its scheme.
    assert CachePersistenceLayer(host="cache.example").connection.tls  # type: ignore[union-attr]
    by_url = CachePersistenceLayer(url="redis://cache.example:6380/3", mode="cluster")
    assert by_url.connection is not None
    assert (by_url.connection.port, by_url.connection.cluster) == (6380, True)
    assert not by_url.connection.tls
    positional = CachePersistenceLayer("valkeys://u:p@cache.example?client=glide&atomic=false")
    assert positional.connection is not None
    assert positional.connection.tls
    assert not positional.atomic
    with pytest.raises(IdempotencyPersistenceConfigError, match="exactly one"):
        CachePersistenceLayer(redis.Redis(), host="cache.example")
    with pytest.raises(IdempotencyPersistenceConfigError, match="mode must be"):
        CachePersistenceLayer(host="cache.example", mode="sentinel")  # type: ignore[arg-type]


def test_host_username_password_and_db_index_reach_the_server(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    user, password = f"idem-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with node.admin() as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    calls, charge = charge_counter()
    layer = RedisCachePersistenceLayer(
        host=node.host,
        port=node.port,
        username=user,
        password=password,
        db_index=5,
        ssl=False,
    )
    try:
        wrapped = idempotent_function(data_keyword_argument="order", persistence_store=layer)(
            charge
        )
        order = {"id": uuid.uuid4().hex}
        assert wrapped(order=order) == wrapped(order=order)
        assert calls == [order]
        with redis.Redis(node.host, node.port, db=5) as db5:
            stored = [json.loads(db5.get(key)) for key in db5.keys("*charge*")]
        assert any(record["status"] == "COMPLETED" for record in stored)
    finally:
        as_sync_store(layer).close()
        with node.admin() as admin:
            admin.execute_command("ACL", "DELUSER", user)


# -- wait_replicas ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def primary_with_replica(cache_servers: ServerPool) -> tuple[Server, Server]:
    """A Valkey primary with one replica of its own (not shared with other tests), once
    the replica acknowledges writes."""
    return cache_setups.primary_with_replica(cache_servers)


@pytest.mark.parametrize("client", ["redis", "glide", "url_redis", "url_glide"])
def test_wait_replicas_waits_on_the_connection_that_wrote(
    primary_with_replica: tuple[Server, Server], client: str
) -> None:
    primary, replica = primary_with_replica
    raw: Any = None
    if client == "redis":
        raw = primary.admin()
        store = SyncCachePersistenceLayer(raw, wait_replicas=1, wait_timeout=5)
    elif client == "glide":
        raw = _glide_sync(primary)
        store = SyncCachePersistenceLayer(raw, wait_replicas=1, wait_timeout=5)
    else:
        url = _url(primary, client.split("_")[1], wait_replicas="1", wait_timeout="5")
        store = SyncCachePersistenceLayer.from_url(url)
        assert (store.wait_replicas, store.wait_timeout) == (1, 5.0)
    try:
        key = new_key()
        assert store.claim(in_progress(key, "a"), now=time.time()).claimed
        with replica.admin() as on_replica:
            assert on_replica.get(key) is not None  # WAIT returned: the replica has it
            store.complete(completed(key, 7), owner=tok("a"))
            assert json.loads(on_replica.get(key))["status"] == "COMPLETED"
        # More replicas than there are: the claim is released and refused (transient).
        short = SyncCachePersistenceLayer(
            raw if raw is not None else primary.admin(),
            wait_replicas=2,
            wait_timeout=0.05,
            retry_attempts=1,
        )
        other = new_key()
        with pytest.raises(IdempotencyPersistenceConnectionError) as caught:
            short.claim(in_progress(other, "a"), now=time.time())
        assert caught.value.transient
        assert store.get(other) is None
    finally:
        store.close()
        if raw is not None:
            raw.close()


@pytest.mark.parametrize("client", ["redis", "glide"])
def test_wait_replicas_on_a_cluster_runs_on_the_node_holding_the_key(
    cache_servers: ServerPool, client: str
) -> None:
    node = cache_servers.cluster("valkey")[0]
    raw: Any = redis.RedisCluster(node.host, node.port) if client == "redis" else None
    if raw is None:
        raw = _glide_sync(node, cluster=True)
    try:
        # The cluster has no replicas: every node answers WAIT with 0.
        store = SyncCachePersistenceLayer(raw, wait_replicas=1, wait_timeout=0.05, retry_attempts=1)
        keys = keys_on_every_node(new_key)
        for key in keys:
            with pytest.raises(IdempotencyPersistenceConnectionError, match="unreachable"):
                store.claim(in_progress(key, "a"), now=time.time())
            assert store.get(key) is None  # released
        plain = SyncCachePersistenceLayer(raw)
        assert plain.claim(in_progress(keys[0], "a"), now=time.time()).claimed
    finally:
        raw.close()


def test_wait_replicas_needs_the_atomic_path(cache_servers: ServerPool) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match="atomic path"):
        SyncCachePersistenceLayer(host="cache.example", atomic=False, wait_replicas=1)


# -- os.fork() --------------------------------------------------------------------------------

OK, RAN_AGAIN, OTHER_ERROR, NOT_REFUSED = 0, 11, 12, 13


def _fork(child: Callable[[], int]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # threads of the test process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = OTHER_ERROR
        try:
            code = child()
        finally:
            os._exit(code)
    return pid


def _wait_child(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout}s")
        time.sleep(0.02)


@pytest.mark.parametrize("client", ["redis", "glide"])
@pytest.mark.parametrize("built", ["url", "user"])
def test_a_sync_layer_used_in_a_parent_and_a_forked_child(
    cache_servers: ServerPool, built: str, client: str
) -> None:
    node = cache_servers.standalone("valkey")
    raw: Any = None
    if built == "url":
        store = SyncCachePersistenceLayer.from_url(_url(node, client))
    else:
        raw = node.admin() if client == "redis" else _glide_sync(node)
        store = SyncCachePersistenceLayer(raw)
    prefix = new_key()
    executions = f"{prefix}:executions"
    counter = node.admin()

    def pay(order: int) -> dict[str, int]:
        counter.incr(f"{executions}:{order}")
        return {"order": order, "pid": os.getpid()}

    wrapped = idempotent_function(
        data_keyword_argument="order", persistence_store=store, key_prefix=prefix
    )(lambda order: pay(order["n"]))

    def child() -> int:  # pragma: no cover - runs in the child
        try:
            replayed = wrapped(order={"n": 1, "p": prefix})
            if built == "user":
                return NOT_REFUSED
            fresh = wrapped(order={"n": 2, "p": prefix})
            ok = replayed["pid"] != os.getpid() and fresh["pid"] == os.getpid()
            return OK if ok else RAN_AGAIN
        except IdempotencyPersistenceConfigError as exc:
            return OK if built == "user" and "os.fork()" in str(exc) else OTHER_ERROR
        finally:
            store.close()  # leaves the parent's client alone

    try:
        first = wrapped(order={"n": 1, "p": prefix})
        assert first["pid"] == os.getpid()
        pid = _fork(child)
        assert _wait_child(pid) == OK
        # The parent goes on with its own client.
        assert wrapped(order={"n": 1, "p": prefix}) == first
        assert wrapped(order={"n": 3, "p": prefix})["pid"] == os.getpid()
        if built == "url":
            assert wrapped(order={"n": 2, "p": prefix})["pid"] == pid
        counts = {n: counter.get(f"{executions}:{n}") for n in (1, 2, 3)}
        assert counts == {1: b"1", 2: b"1" if built == "url" else None, 3: b"1"}
    finally:
        store.close()
        counter.close()
        if raw is not None:
            raw.close()
