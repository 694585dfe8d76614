"""Automatic pipelining in the asyncio cache adapters, on real Valkey and Redis with
glide and redis-py: the commands of one loop turn go as one batch, but the first of a
burst, which goes alone (counted by the adapter, and by the server: one command per
call, few socket reads), each caller gets
its own reply or error, NOSCRIPT recovers, cancellation before the flush keeps a
command off the server, a frozen or killed server fails every caller with the typed
error, closing fails what is queued, and the engine runs each key once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.glide import GlideCacheClient
from aioidempotency._async.pipelining import Batcher
from aioidempotency._async.redis import RedisPyCacheClient
from aioidempotency._lua import COMPLETE
from aioidempotency._records import RecordStatus
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from tests.faults.servers import managed_server
from tests.persistence.test_cache_store import completed, in_progress, tok
from tests.servers.redis import Kind, Server, ServerPool

Adapter = GlideCacheClient | RedisPyCacheClient

SETUPS = [("valkey", "glide"), ("valkey", "redis"), ("redis", "glide"), ("redis", "redis")]
IDS = [f"{kind}-{client}" for kind, client in SETUPS]
N = 50
#: The client's own timeout in the fault tests (seconds), and what a failure may take.
TIMEOUT = 0.5
BOUND = 15.0


async def open_adapter(
    host: str, port: int, client: str, *, timeout: float = 5.0, **options: Any
) -> Adapter:
    """A pipelining adapter; redis-py's without retries of its own (its timeout is
    `timeout`, as glide's)."""
    if client == "glide":
        return await GlideCacheClient.connect(
            host, port, request_timeout_ms=int(timeout * 1000), auto_pipeline=True, **options
        )
    raw = aioredis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return RedisPyCacheClient(raw, owned=True, auto_pipeline=True, **options)


def batcher(adapter: Adapter) -> Batcher[Any]:
    """The adapter's batcher for the running loop (created by its first command)."""
    if isinstance(adapter, GlideCacheClient):
        assert adapter.batcher is not None
        return adapter.batcher
    return adapter._batcher()


@pytest.fixture(params=SETUPS, ids=IDS)
async def setup(
    request: pytest.FixtureRequest, cache_servers: ServerPool
) -> AsyncIterator[tuple[Server, Adapter]]:
    kind, client = request.param
    server = cache_servers.standalone(kind)
    adapter = await open_adapter(server.host, server.port, client)
    yield server, adapter
    await adapter.aclose()


def keys(count: int) -> list[str]:
    prefix = uuid.uuid4().hex
    return [f"test-pipelining#{prefix}-{i}" for i in range(count)]


def server_stats(server: Server, admin: Any = None) -> dict[str, int]:
    """Calls per command, and the socket reads the server has made, so far."""
    if admin is None:
        with server.admin() as admin:
            return server_stats(server, admin)
    stats = admin.info("commandstats")
    reads = int(admin.info("stats")["total_reads_processed"])
    found = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    found["reads"] = reads
    return found


def as_bytes(value: Any) -> Any:
    return value.encode() if isinstance(value, str) else value


def delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


async def wait_until(check: Callable[[], bool], what: str) -> None:
    """Yield to the loop until `check()` holds (at most 1,000 turns and 5 s)."""
    deadline = time.monotonic() + 5.0
    for _ in range(1000):
        if check():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0)
    raise AssertionError(f"not reached: {what}")


# -- one batch per loop turn -------------------------------------------------------------


async def test_claims_of_one_turn_travel_as_one_batch(setup: tuple[Server, Adapter]) -> None:
    server, adapter = setup
    names = keys(N)
    held = names[::5]  # already hold a value: the plain claim returns it
    with server.admin() as admin:
        for name in held:
            admin.set(name, f"old-{name}", ex=60)
    with server.admin() as admin:
        start = server_stats(server, admin)
        before = server_stats(server, admin)  # what two snapshots cost: `idle` reads
        sent = batcher(adapter).batches
        replies = await asyncio.gather(
            *(adapter.set_nx_get(name, f"new-{name}", ex=60) for name in names)
        )
        after = server_stats(server, admin)
    idle = delta(start, before, "reads")
    assert batcher(adapter).batches - sent == 1
    for name, reply in zip(names, replies, strict=True):
        if name in held:
            assert as_bytes(reply) == f"old-{name}".encode()
        else:
            assert reply is None
    assert delta(before, after, "set") == N  # still one command per call on the server
    # The batch came in a few socket reads of the server, not one per command.
    assert delta(before, after, "reads") - idle <= N // 5
    with server.admin() as admin:
        stored = admin.mget(names)
    for name, value in zip(names, stored, strict=True):
        assert value == (f"old-{name}" if name in held else f"new-{name}").encode()


async def test_gets_sets_deletes_and_scripts_get_their_own_replies(
    setup: tuple[Server, Adapter],
) -> None:
    server, adapter = setup
    names = keys(4 * 10)
    gets, sets, deletes, scripts = names[:10], names[10:20], names[20:30], names[30:]
    with server.admin() as admin:
        for name in gets + deletes:
            admin.set(name, f"v-{name}", ex=60)
    sent = batcher(adapter).batches
    expiry = int(time.time()) + 60
    results = await asyncio.gather(
        *(adapter.get(name) for name in gets),
        *(adapter.set(name, f"s-{name}", exat=expiry) for name in sets),
        *(adapter.delete(name) for name in deletes),
        # COMPLETE on a key that holds nothing: the script answers GONE (0)
        *(adapter.run_script(COMPLETE, name, (tok("x"), "{}", expiry)) for name in scripts),
    )
    assert batcher(adapter).batches - sent == 1
    got, written, removed, completions = (results[i : i + 10] for i in range(0, 40, 10))
    assert [as_bytes(v) for v in got] == [f"v-{name}".encode() for name in gets]
    assert all(written)
    assert removed == [1] * 10
    assert [int(code) for code in completions] == [0] * 10
    with server.admin() as admin:
        assert admin.mget(sets) == [f"s-{name}".encode() for name in sets]
        assert admin.exists(*deletes) == 0
        assert admin.ttl(sets[0]) > 0


async def test_a_size_cap_splits_the_turn_into_batches(cache_servers: ServerPool) -> None:
    server = cache_servers.standalone("valkey")
    for client in ("glide", "redis"):
        adapter = await open_adapter(server.host, server.port, client, max_batch=8)
        try:
            names = keys(20)
            replies = await asyncio.gather(*(adapter.set_nx_get(n, "v", ex=60) for n in names))
            assert replies == [None] * 20
            # The first went alone; the 19 others in batches of 8, 8 and 3.
            assert (batcher(adapter).batches, batcher(adapter).commands) == (3, 19)
        finally:
            await adapter.aclose()


# -- the store over a pipelining adapter -------------------------------------------------


@pytest.fixture
async def layer(setup: tuple[Server, Adapter]) -> CachePersistenceLayer:
    _, adapter = setup
    return CachePersistenceLayer(client=adapter)


async def test_store_claims_gets_and_completions_batch(
    setup: tuple[Server, Adapter], layer: CachePersistenceLayer
) -> None:
    server, adapter = setup
    names = keys(N)
    now = time.time()
    sent = batcher(adapter).batches
    stats = [server_stats(server)]
    claims = await asyncio.gather(*(layer.claim(in_progress(n, "a"), now=now) for n in names))
    stats.append(server_stats(server))
    await asyncio.gather(*(layer.complete(completed(n, {"n": n}), owner=tok("a")) for n in names))
    stats.append(server_stats(server))
    records = await asyncio.gather(*(layer.get(n, now=now) for n in names))
    stats.append(server_stats(server))
    assert batcher(adapter).batches - sent == 3  # claims, completions, gets: one batch each
    assert all(claim.claimed for claim in claims)
    for name, record in zip(names, records, strict=True):
        assert record is not None
        assert record.status == RecordStatus.COMPLETED
        assert record.response_data == f'{{"n": "{name}"}}'
    # Still one command per call on the server.
    assert delta(stats[0], stats[1], "set") == N
    assert delta(stats[1], stats[2], "evalsha") == N
    assert delta(stats[2], stats[3], "get") == N
    # A second claim of each key is refused with its completed record.
    again = await asyncio.gather(*(layer.claim(in_progress(n, "b"), now=now) for n in names))
    assert all(not c.claimed and c.existing is not None for c in again)


async def test_one_callers_error_leaves_the_others_alone(
    setup: tuple[Server, Adapter], layer: CachePersistenceLayer
) -> None:
    server, adapter = setup
    names = keys(10)
    wrong = names[3]
    with server.admin() as admin:
        admin.rpush(wrong, "a list")
    now = time.time()
    sent = batcher(adapter).batches
    outcomes = await asyncio.gather(
        *(layer.claim(in_progress(n, "a"), now=now) for n in names), return_exceptions=True
    )
    assert batcher(adapter).batches - sent == 1
    for name, outcome in zip(names, outcomes, strict=True):
        if name == wrong:
            assert isinstance(outcome, IdempotencyInvalidStatusError)
        else:
            assert not isinstance(outcome, BaseException)
            assert outcome.claimed
    with pytest.raises(IdempotencyInvalidStatusError):
        await layer.get(wrong)


async def test_noscript_in_a_batch_loads_the_script_and_runs_it_again(
    setup: tuple[Server, Adapter], layer: CachePersistenceLayer
) -> None:
    server, _adapter = setup
    names = keys(20)
    now = time.time()
    claims = await asyncio.gather(*(layer.claim(in_progress(n, "a"), now=now) for n in names))
    assert all(c.claimed for c in claims)
    with server.admin() as admin:
        admin.script_flush()
        assert admin.script_exists(COMPLETE.sha) == [False]
    before = server_stats(server)
    await asyncio.gather(*(layer.complete(completed(n, 7), owner=tok("a")) for n in names))
    after = server_stats(server)
    records = await asyncio.gather(*(layer.get(n, now=now) for n in names))
    assert all(r is not None and r.status == RecordStatus.COMPLETED for r in records)
    with server.admin() as admin:
        assert admin.script_exists(COMPLETE.sha) == [True]
    assert delta(before, after, "evalsha") >= len(names)  # the batch's, refused


# -- cancellation and closing ------------------------------------------------------------


async def test_a_caller_cancelled_before_the_flush_is_never_sent(
    setup: tuple[Server, Adapter],
) -> None:
    server, adapter = setup
    alone, kept, dropped = keys(3)
    queue = batcher(adapter)
    commands = queue.commands
    first = asyncio.ensure_future(adapter.set_nx_get(alone, "v", ex=60))  # goes alone
    second = asyncio.ensure_future(adapter.set_nx_get(kept, "v", ex=60))
    third = asyncio.ensure_future(adapter.set_nx_get(dropped, "v", ex=60))
    await wait_until(lambda: queue.queued == 2, "two commands queued")
    third.cancel()
    assert await first is None
    assert await second is None
    with pytest.raises(asyncio.CancelledError):
        await third
    await queue.flushed()
    assert queue.commands - commands == 1
    with server.admin() as admin:
        assert admin.exists(alone, kept) == 2
        assert admin.exists(dropped) == 0


async def test_a_caller_cancelled_after_the_flush_only_stops_waiting(
    setup: tuple[Server, Adapter],
) -> None:
    server, adapter = setup
    alone, name = keys(2)
    queue = batcher(adapter)
    sent = queue.batches
    first = asyncio.ensure_future(adapter.set_nx_get(alone, "v", ex=60))  # goes alone
    call = asyncio.ensure_future(adapter.set_nx_get(name, "v", ex=60))
    await wait_until(lambda: queue.batches > sent, "the batch sent")
    call.cancel()
    assert await first is None
    with pytest.raises(asyncio.CancelledError):
        await call
    await queue.flushed()
    with server.admin() as admin:
        assert admin.get(name) == b"v"  # the command landed


@pytest.mark.parametrize("client", ["glide", "redis"])
async def test_closing_fails_the_commands_still_queued(
    cache_servers: ServerPool, client: str
) -> None:
    server = cache_servers.standalone("valkey")
    adapter = await open_adapter(server.host, server.port, client)
    names = keys(5)
    calls = [asyncio.ensure_future(adapter.set_nx_get(n, "v", ex=60)) for n in names]
    queue = batcher(adapter)
    await wait_until(lambda: queue.queued == 4, "the commands queued (the first went alone)")
    calls[-1].cancel()  # a queued caller gone before the close: just cancelled
    await adapter.aclose()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes.pop(), asyncio.CancelledError)
    for outcome in outcomes[1:]:
        assert isinstance(outcome, Exception), outcome
        if client == "glide":
            assert isinstance(outcome, IdempotencyPersistenceLayerError)
        else:
            assert isinstance(outcome, aioredis.ConnectionError)
        assert "closed before this command was sent" in str(outcome) + str(outcome.__cause__)
    with server.admin() as admin:
        assert admin.exists(*names[1:]) == 0
    if client == "glide":  # a closed glide client refuses every command at once
        with pytest.raises(IdempotencyPersistenceLayerError, match="closed"):
            await adapter.get(names[0])
    else:  # redis-py reconnects a closed client, with or without pipelining
        assert await adapter.get(names[1]) is None  # never sent
        await adapter.aclose()


# -- the server gone or frozen -----------------------------------------------------------


@pytest.mark.parametrize("fault", ["freeze", "kill"])
@pytest.mark.parametrize(("kind", "client"), SETUPS, ids=IDS)
async def test_a_failed_batch_fails_every_caller_with_the_typed_error(
    kind: Kind, client: str, fault: str
) -> None:
    with managed_server(kind) as server:
        adapter = await open_adapter(server.host, server.port, client, timeout=TIMEOUT)
        store = CachePersistenceLayer(client=adapter, retry_attempts=1)
        try:
            names = keys(20)
            await asyncio.gather(*(store.get(n) for n in names))  # connected and batching
            queue = batcher(adapter)
            sent = queue.batches
            server.freeze()
            started = time.monotonic()
            calls = [asyncio.ensure_future(store.get(n)) for n in names]
            await wait_until(lambda: queue.batches > sent, "the batch sent")
            if fault == "kill":
                server.kill()
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), BOUND)
            elapsed = time.monotonic() - started
            assert queue.batches - sent == 1
            for outcome in outcomes:
                assert isinstance(outcome, IdempotencyPersistenceConnectionError), outcome
            assert elapsed < TIMEOUT + 5.0
        finally:
            if fault == "freeze":
                server.thaw()
            await adapter.aclose()


# -- the engine --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "client"), SETUPS, ids=IDS)
async def test_the_engine_runs_each_key_once_with_pipelining(
    cache_servers: ServerPool, kind: Kind, client: str
) -> None:
    server = cache_servers.standalone(kind)
    url = f"redis://{server.host}:{server.port}?client={client}&timeout=5&auto_pipeline=true"
    store = CachePersistenceLayer.from_url(url)
    assert store.auto_pipeline
    engine = IdempotencyEngine(
        store,
        IdempotencyConfig(wait_for_in_progress_seconds=30, wait_poll_interval_seconds=0.01),
        key_prefix=f"test-pipelining-{uuid.uuid4().hex}",
    )
    runs: dict[int, int] = {}

    async def work(order: int) -> dict[str, int]:
        runs[order] = runs.get(order, 0) + 1
        await asyncio.sleep(0)
        return {"order": order}

    try:
        orders = [i % 50 for i in range(200)]  # 50 keys, 4 concurrent calls each
        first = await asyncio.gather(*(engine.run({"order": o}, work, o) for o in orders))
        replays = await asyncio.gather(*(engine.run({"order": o}, work, o) for o in orders))
        assert first == replays == [{"order": o} for o in orders]
        assert runs == dict.fromkeys(range(50), 1)
        opened = store._clients.current() if store._clients is not None else None
        assert isinstance(opened, (GlideCacheClient, RedisPyCacheClient))
        queue = batcher(opened)
        assert queue.batches > 0
        assert queue.commands > 2 * queue.batches
    finally:
        await store.aclose()


# -- the knob ----------------------------------------------------------------------------


async def test_the_knob_from_the_url_the_keyword_and_the_sync_layer(
    cache_servers: ServerPool,
) -> None:
    server = cache_servers.standalone("valkey")
    url = f"valkey://{server.host}:{server.port}?client=glide"
    assert CachePersistenceLayer.from_url(url).auto_pipeline is True  # the default
    assert CachePersistenceLayer.from_url(url + "&auto_pipeline=false").auto_pipeline is False
    on = CachePersistenceLayer.from_url(url + "&auto_pipeline=true", auto_pipeline=True)
    assert on.auto_pipeline is True
    off = CachePersistenceLayer.from_url(url + "&auto_pipeline=on", auto_pipeline=False)
    assert off.auto_pipeline is False
    with pytest.raises(IdempotencyPersistenceConfigError, match="auto_pipeline"):
        CachePersistenceLayer.from_url(url + "&auto_pipeline=maybe")
    # The sync layer takes the option and goes on without batching.
    sync = SyncCachePersistenceLayer.from_url(url + "&auto_pipeline=true")
    try:
        (name,) = keys(1)
        assert sync.claim(in_progress(name, "a"), now=time.time()).claimed
        assert sync.get(name) is not None
    finally:
        sync.close()
    # A raw client passed in is adapted with the layer's setting.
    raw = aioredis.Redis(host=server.host, port=server.port)
    try:
        layer = CachePersistenceLayer(client=raw, auto_pipeline=True)
        names = keys(3)
        claims = await asyncio.gather(
            *(layer.claim(in_progress(n, "a"), now=time.time()) for n in names)
        )
        assert all(c.claimed for c in claims)
        adapted = layer._clients.current() if layer._clients is not None else None
        assert isinstance(adapted, RedisPyCacheClient)
        assert adapted.auto_pipeline
        assert sum(b.batches for b in adapted.batchers.values()) == 1
    finally:
        await raw.aclose()


def test_cluster_clients_are_not_pipelined() -> None:
    cluster = aioredis.RedisCluster(host="127.0.0.1", port=1)
    assert RedisPyCacheClient(cluster, auto_pipeline=True).auto_pipeline is False


async def test_a_lone_caller_goes_alone(setup: tuple[Server, Adapter]) -> None:
    server, adapter = setup
    names = keys(5)
    queue = batcher(adapter)
    sent = queue.batches
    for name in names:  # one at a time: nothing else queued or in flight
        assert await adapter.set_nx_get(name, "v", ex=60) is None
        assert await adapter.get(name) in (b"v", "v")
    assert queue.batches == sent
    with server.admin() as admin:
        assert admin.exists(*names) == 5
