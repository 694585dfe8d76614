"""The Redis/Valkey store under faults: operations resent after a lost reply,
transient errors retried and mapped, a bare client that never touches a record that is
not its own claim, huge garbage values, pool exhaustion, and `os.fork()` with each
client kind. Real servers throughout; in-process wrappers only inject faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency._async.cache import (
    CacheAccessDeniedError,
    CachePersistenceLayer,
    LuaScript,
    RedisPyCacheClient,
)
from aioidempotency._async.glide import GlideCacheClient
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from tests.backends.cache import BACKENDS
from tests.servers.redis import Server, ServerPool


def token() -> str:
    return uuid.uuid4().hex


def new_key() -> str:
    return f"test-cache.faults#{uuid.uuid4().hex}"


def in_progress(key: str, owner: str, *, in_progress_ms: int | None = None) -> DataRecord:
    now = time.time()
    return DataRecord(
        key,
        RecordStatus.INPROGRESS,
        int(now) + 600,
        in_progress_expiry_timestamp=(
            int(now * 1000) + 60_000 if in_progress_ms is None else in_progress_ms
        ),
        owner=owner,
    )


def completed(key: str, data: Any) -> DataRecord:
    return DataRecord(
        key, RecordStatus.COMPLETED, int(time.time()) + 600, response_data=json.dumps(data)
    )


# -- every operation is safe to repeat (a client's resend after a lost reply) ------------


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> CachePersistenceLayer:
    """A fresh store of each cache backend (tests/backends/cache.py)."""
    layer = request.getfixturevalue(f"store_{request.param}")
    assert isinstance(layer, CachePersistenceLayer)
    return layer


async def test_each_operation_sent_twice_is_recognised_as_its_owners(
    store: CachePersistenceLayer,
) -> None:
    key, owner = new_key(), token()
    claim = in_progress(key, owner)
    assert (await store.claim(claim, now=time.time())).claimed
    again = await store.claim(claim, now=time.time())
    assert not again.claimed
    assert again.existing is not None
    assert again.existing.owner == owner  # the engine counts this as its own win

    later = in_progress(key, owner, in_progress_ms=int(time.time() * 1000) + 90_000)
    await store.renew(later)
    await store.renew(later)
    current = await store.get(key)
    assert current is not None
    assert current.in_progress_expiry_timestamp == later.in_progress_expiry_timestamp

    done = completed(key, {"paid": 1})
    await store.complete(done, owner=owner)
    await store.complete(done, owner=owner)  # resent: succeeds, changes nothing
    replay = await store.claim(in_progress(key, token()), now=time.time())
    assert replay.existing is not None
    assert replay.existing.response_json() == {"paid": 1}
    with pytest.raises(IdempotencyClaimLostError):
        await store.complete(completed(key, "another result"), owner=owner)

    await store.release(key, owner=owner)  # never deletes a completed record
    assert await store.get(key) is not None

    other = new_key()
    assert (await store.claim(in_progress(other, owner), now=time.time())).claimed
    await store.release(other, owner=owner)
    await store.release(other, owner=owner)
    assert await store.get(other) is None


# -- a bare client never deletes or overwrites a record that is not its claim ------------


@pytest.mark.parametrize("client", ["redis", "glide"])
async def test_protocol_late_failure_leaves_the_new_owners_record(
    cache_servers: ServerPool, client: str
) -> None:
    """Before: a late failure's release was a plain DEL and deleted the new owner's
    COMPLETED record, so the function ran again; a late completion overwrote it."""
    node = cache_servers.standalone("valkey")
    url = f"redis://{node.host}:{node.port}?client={client}&atomic=false&timeout=5"
    async with CachePersistenceLayer.from_url(url) as layer:
        key, late, winner = new_key(), token(), token()
        past = int(time.time() * 1000) - 1000
        assert await layer.claim(in_progress(key, late, in_progress_ms=past), now=time.time())
        assert (await layer.claim(in_progress(key, winner), now=time.time())).claimed
        await layer.complete(completed(key, "winner"), owner=winner)
        with node.admin() as admin:
            stored = admin.get(key)

        await layer.release(key, owner=late)
        with pytest.raises(IdempotencyClaimLostError, match="taken over"):
            await layer.complete(completed(key, "late"), owner=late)
        with pytest.raises(IdempotencyClaimLostError, match="taken over"):
            await layer.renew(in_progress(key, late))
        with node.admin() as admin:
            assert admin.get(key) == stored


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
async def test_an_owner_token_inside_a_stored_result_does_not_make_it_ours(
    cache_servers: ServerPool, atomic: bool
) -> None:
    node = cache_servers.standalone("redis")
    url = f"redis://{node.host}:{node.port}?atomic={str(atomic).lower()}&timeout=5"
    layer = CachePersistenceLayer.from_url(url)  # `async with` gives back a PersistenceLayer
    async with layer:
        key, owner = new_key(), token()
        decoy = {"status": "INPROGRESS", "owner_token": owner}
        with node.admin() as admin:
            admin.set(key, layer.attributes.to_json(completed(key, decoy)), ex=600)
            before = admin.get(key)
        assert owner.encode() in before
        await layer.release(key, owner=owner)
        with pytest.raises(IdempotencyClaimLostError):
            await layer.renew(in_progress(key, owner))
        with pytest.raises(IdempotencyClaimLostError):
            await layer.complete(completed(key, 1), owner=owner)
        with node.admin() as admin:
            assert admin.get(key) == before


async def test_short_owner_tokens_are_refused_by_the_owner_checks(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")
    async with CachePersistenceLayer.from_url(f"redis://{node.host}:{node.port}") as layer:
        with pytest.raises(IdempotencyPersistenceConfigError, match="too short"):
            await layer.release(new_key(), owner="a")


# -- huge garbage -----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "client"), [("redis", "redis"), ("valkey", "glide")])
async def test_a_20_mb_garbage_value_raises_the_typed_error_and_stays(
    cache_servers: ServerPool,
    record_property: Callable[[str, object], None],
    kind: Any,
    client: str,
) -> None:
    """The claim reads the value once (``SET NX GET`` returns it in the claim's round
    trip) and records.py refuses it. The server's time is recorded, not asserted."""
    node = cache_servers.standalone(kind)
    key = new_key()
    garbage = b"\x00garbage" * (20 * 1024 * 1024 // 8)
    url = f"redis://{node.host}:{node.port}?client={client}&timeout=10"
    async with CachePersistenceLayer.from_url(url) as layer:
        await layer.get(new_key())  # connected: the stats below are the claim's
        with node.admin() as admin:
            admin.set(key, garbage, ex=600)
            admin.config_resetstat()
        with pytest.raises(IdempotencyInvalidStatusError, match="not valid JSON"):
            await layer.claim(in_progress(key, token()), now=time.time())
        with node.admin() as admin:
            stats = admin.info("commandstats")
            assert admin.strlen(key) == len(garbage)
            assert admin.getrange(key, 0, 63) == garbage[:64]
            admin.delete(key)
    data = ("cmdstat_set", "cmdstat_get", "cmdstat_getrange", "cmdstat_evalsha", "cmdstat_eval")
    calls = {name: stats[name]["calls"] for name in data if name in stats}
    assert calls == {"cmdstat_set": 1}, calls  # one command, and no script copied anything
    record_property("claim_usec", stats["cmdstat_set"]["usec"])


# -- transient errors: retried, then mapped ----------------------------------------------


class Fault:
    """An error to raise on one call, before the command is sent or after it ran (the
    reply is lost)."""

    def __init__(self, error: BaseException, *, after: bool = False) -> None:
        self.error = error
        self.after = after


class FaultyClient:
    """A real client whose next calls fail as told by `faults` (fault injection only)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.faults: list[Fault] = []
        self.calls = 0

    async def _call(self, method: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        self.calls += 1
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and not fault.after:
            raise fault.error
        result = await method(*args, **kw)
        if fault is not None:
            raise fault.error
        return result

    async def get(self, name: str) -> Any:
        return await self._call(self.inner.get, name)

    async def set(self, name: str, value: str, *, ex: int | None = None, nx: bool = False) -> Any:
        return await self._call(self.inner.set, name, value, ex=ex, nx=nx)

    async def delete(self, *names: str) -> Any:
        return await self._call(self.inner.delete, *names)

    async def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        return await self._call(self.inner.run_script, script, key, args)


@pytest.fixture(params=["redis-py", "glide"])
async def faulty(request: pytest.FixtureRequest, cache_servers: ServerPool) -> Any:
    node = cache_servers.standalone("valkey")
    inner: Any
    if request.param == "glide":
        inner = await GlideCacheClient.connect(node.host, node.port)
    else:
        inner = RedisPyCacheClient(aioredis.Redis(host=node.host, port=node.port), owned=True)
    yield FaultyClient(inner)
    await inner.aclose()


def _redis_internal_attribute_error() -> AttributeError:
    """An AttributeError raised inside redis-py, as its cluster client raises during a
    failover."""
    try:
        aioredis.RedisCluster.keyslot(None, "k")  # type: ignore[arg-type]
    except AttributeError as exc:
        return exc
    raise AssertionError("expected an AttributeError from redis-py")


def _transient_errors() -> list[BaseException]:
    import glide

    return [
        redis.exceptions.ConnectionError("Connection reset by peer"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.TryAgainError("TRYAGAIN Multiple keys request during rehashing"),
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.BusyLoadingError("LOADING Redis is loading the dataset"),
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica"),
        redis.exceptions.MovedError("3999 127.0.0.1:6381"),
        glide.RequestError("An error was signalled by the server: MOVED 3999 127.0.0.1:6381"),
        glide.TimeoutError("timed out"),
        ConnectionRefusedError(111, "Connection refused"),
        _redis_internal_attribute_error(),
    ]


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
@pytest.mark.parametrize("index", range(11))
async def test_a_transient_error_is_retried(faulty: FaultyClient, index: int, atomic: bool) -> None:
    error = _transient_errors()[index]
    layer = CachePersistenceLayer(faulty, atomic=atomic)
    faulty.faults = [Fault(error)]
    key, owner = new_key(), token()
    assert (await layer.claim(in_progress(key, owner), now=time.time())).claimed
    assert faulty.calls == 2
    record = await layer.get(key)
    assert record is not None
    assert record.owner == owner


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
async def test_a_claim_and_a_completion_whose_replies_were_lost_are_ours(
    faulty: FaultyClient, atomic: bool
) -> None:
    """The command ran, its reply was lost, the store resent it: the claim comes back as
    our own record and the engine runs the function once; the completion is done."""
    layer = CachePersistenceLayer(faulty, atomic=atomic)
    engine = IdempotencyEngine(layer, IdempotencyConfig(), key_prefix=new_key())
    runs: list[int] = []

    async def pay() -> str:
        runs.append(1)
        # The completion's reply is lost too (protocol path: the GET before the SET).
        faulty.faults = [Fault(redis.exceptions.TimeoutError("lost reply"), after=True)]
        return "paid"

    faulty.faults = [Fault(redis.exceptions.TimeoutError("lost reply"), after=True)]
    assert await engine.run({"order": 1}, pay) == "paid"
    assert runs == [1]
    assert await engine.run({"order": 1}, pay) == "paid"  # a replay
    assert runs == [1]


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
async def test_a_lasting_outage_is_a_transient_connection_error_after_3_attempts(
    faulty: FaultyClient, atomic: bool
) -> None:
    layer = CachePersistenceLayer(faulty, atomic=atomic)
    cause = redis.exceptions.ConnectionError("Connection refused")
    faulty.faults = [Fault(cause) for _ in range(5)]
    with pytest.raises(IdempotencyPersistenceConnectionError) as caught:
        await layer.claim(in_progress(new_key(), token()), now=time.time())
    assert caught.value.transient
    assert caught.value.__cause__ is cause
    assert faulty.calls == 3


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.AuthenticationError("WRONGPASS invalid username-password pair"),
        redis.exceptions.NoPermissionError("NOPERM this user has no permissions"),
        redis.exceptions.ResponseError("NOAUTH Authentication required."),
        redis.exceptions.ResponseError("ERR unknown command"),
    ],
    ids=["wrongpass", "noperm", "noauth", "other"],
)
async def test_a_refusal_is_not_retried_and_says_what_it_is(
    faulty: FaultyClient, error: BaseException
) -> None:
    layer = CachePersistenceLayer(faulty)
    faulty.faults = [Fault(error)]
    with pytest.raises(IdempotencyPersistenceLayerError) as caught:
        await layer.claim(in_progress(new_key(), token()), now=time.time())
    assert faulty.calls == 1
    assert not caught.value.transient
    assert caught.value.__cause__ is error
    denied = "ERR" not in str(error)
    assert isinstance(caught.value, CacheAccessDeniedError) == denied


@pytest.mark.parametrize("client", ["redis", "glide"])
async def test_a_wrong_password_on_a_real_server_is_access_denied(
    cache_servers: ServerPool, client: str
) -> None:
    """redis-py's AuthenticationError is a ConnectionError, glide's a ClosingError: both
    used to be reported as transient."""
    node = cache_servers.standalone("redis")
    url = f"redis://nobody:wrong@{node.host}:{node.port}?client={client}&timeout=2"
    async with CachePersistenceLayer.from_url(url) as layer:
        with pytest.raises(CacheAccessDeniedError) as caught:
            await layer.claim(in_progress(new_key(), token()), now=time.time())
    assert not caught.value.transient


# -- a user's redis-py client: calls in flight bounded by its pool ------------------------


async def test_a_default_redis_client_carries_hundreds_of_concurrent_calls(
    cache_servers: ServerPool,
) -> None:
    """Before: redis-py 8's default pool holds 100 connections and the 101st concurrent
    call failed with MaxConnectionsError ("Too many connections")."""
    calls = 300
    node = cache_servers.standalone("valkey")
    client = aioredis.Redis(host=node.host, port=node.port)
    assert client.connection_pool.max_connections == 100
    layer = CachePersistenceLayer(client)
    engine = IdempotencyEngine(layer, IdempotencyConfig(), key_prefix=new_key())
    all_claimed, gate = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    async def work(n: int) -> int:
        runs.append(n)
        if len(runs) == calls:
            all_claimed.set()
        await asyncio.wait_for(gate.wait(), 60)
        return n

    try:
        tasks = [asyncio.create_task(engine.run({"n": n}, work, n)) for n in range(calls)]
        claimed = asyncio.ensure_future(all_claimed.wait())
        await asyncio.wait([claimed, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        claimed.cancel()
        gate.set()  # every call claimed its key (or one failed): let them all complete
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    finally:
        await client.aclose()
    assert results == list(range(calls))
    assert sorted(runs) == list(range(calls))


# -- fork ------------------------------------------------------------------------------------

OK, RAN_AGAIN, OTHER_ERROR, NOT_REFUSED = 0, 11, 12, 13


async def _wait_child(pid: int, timeout: float = 60) -> int:
    """The child's exit code; a child still running after `timeout` is killed."""
    try:
        _, status = await asyncio.wait_for(asyncio.to_thread(os.waitpid, pid, 0), timeout)
    except asyncio.TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"child {pid} did not finish within {timeout}s") from None
    return os.waitstatus_to_exitcode(status)


def _fork(child: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Fork; the child runs `child()` in a new loop and exits with its code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # glide's threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = OTHER_ERROR
        try:
            code = asyncio.run(child())
        finally:
            os._exit(code)
    return pid


async def _open_user_client(client: str, node: Server) -> Any:
    if client == "glide":
        import glide

        config = glide.GlideClientConfiguration([glide.NodeAddress(node.host, node.port)])
        return await glide.GlideClient.create(config)
    return aioredis.Redis(host=node.host, port=node.port)


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
@pytest.mark.parametrize("client", ["redis", "glide"])
@pytest.mark.parametrize("built", ["url", "user"])
async def test_a_layer_used_in_a_parent_and_a_forked_child(
    cache_servers: ServerPool, built: str, client: str, atomic: bool
) -> None:
    node = cache_servers.standalone("valkey")
    user_client = None
    if built == "url":
        query = f"client={client}&atomic={str(atomic).lower()}&timeout=5"
        layer = CachePersistenceLayer.from_url(f"redis://{node.host}:{node.port}?{query}")
    else:
        user_client = await _open_user_client(client, node)
        layer = CachePersistenceLayer(user_client, atomic=atomic)
    engine = IdempotencyEngine(layer, IdempotencyConfig(), key_prefix=new_key())
    executions = f"{engine.key_prefix}:executions"
    counter = aioredis.Redis(host=node.host, port=node.port)

    async def pay(order: int) -> dict[str, int]:
        await counter.incr(f"{executions}:{order}")
        return {"order": order, "pid": os.getpid()}

    async def child() -> int:  # pragma: no cover - runs in the child
        counter_in_child = aioredis.Redis(host=node.host, port=node.port)

        async def pay_in_child(order: int) -> dict[str, int]:
            await counter_in_child.incr(f"{executions}:{order}")
            return {"order": order, "pid": os.getpid()}

        try:
            replayed = await engine.run({"order": 1}, lambda: pay_in_child(1))
            if built == "user":
                return NOT_REFUSED
            fresh = await engine.run({"order": 2}, lambda: pay_in_child(2))
            ok = replayed["pid"] != os.getpid() and fresh["pid"] == os.getpid()
            return OK if ok else RAN_AGAIN
        except IdempotencyPersistenceConfigError as exc:
            return OK if built == "user" and "os.fork()" in str(exc) else OTHER_ERROR
        finally:
            await layer.aclose()  # leaves the parent's clients alone
            await counter_in_child.aclose()

    try:
        first = await engine.run({"order": 1}, lambda: pay(1))
        assert first["pid"] == os.getpid()
        pid = _fork(child)
        assert await _wait_child(pid) == OK
        # The parent goes on with its own layer and clients.
        assert await engine.run({"order": 1}, lambda: pay(1)) == first
        third = await engine.run({"order": 3}, lambda: pay(3))
        assert third["pid"] == os.getpid()
        if built == "url":  # the child's own record is replayed here
            second = await engine.run({"order": 2}, lambda: pay(2))
            assert second["pid"] == pid
        with node.admin() as admin:
            counts = {n: admin.get(f"{executions}:{n}") for n in (1, 2, 3)}
        assert counts == {1: b"1", 2: b"1" if built == "url" else None, 3: b"1"}
    finally:
        await layer.aclose()
        await counter.aclose()
        if user_client is not None:
            await (user_client.close() if client == "glide" else user_client.aclose())
