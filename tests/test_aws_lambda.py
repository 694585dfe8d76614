"""`lambda_handler`: async handlers called the way the Lambda Python runtime calls them.

The handler module (`tests/lambda_app.py`) is imported once per "execution
environment" and called synchronously many times (warm invocations); every result
must go through `json.dumps`, clients must be opened once, and the claim's
in-progress expiry must follow the context's remaining time. A fresh interpreter
(cold start) and a forked child work too. Stores: in-memory, Valkey with glide, and
DynamoDB on moto.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from aioidempotency import (
    IdempotencyAlreadyInProgressError,
    InMemoryPersistenceLayer,
    PersistenceLayer,
    idempotent_async,
)
from aioidempotency._async.glide import GlideCacheClient
from aioidempotency._records import RecordStatus
from aioidempotency.aws_lambda import LambdaHandlerError, handler_loop, lambda_handler
from tests.aws_helpers import create_table
from tests.faults.servers import ManagedServer
from tests.helpers import WrapperStore
from tests.servers.moto import MotoServer
from tests.servers.redis import ServerPool

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "lambda_app.py"
STORES = ["memory", "valkey_glide", "dynamodb"]
WARM_CALLS = 40
ORDERS = 8


def event(order_id: str) -> dict[str, Any]:
    """An API Gateway-like event whose JSON body carries the business key."""
    return {"body": json.dumps({"order_id": order_id, "amount": 10}), "path": "/orders"}


@pytest.fixture
def store_url(request: pytest.FixtureRequest) -> str:
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "valkey_glide":
        pool: ServerPool = request.getfixturevalue("cache_servers")
        node = pool.standalone("valkey")
        node.admin().flushall()
        return f"valkey://{node.host}:{node.port}?client=glide&timeout=5"
    server: MotoServer = request.getfixturevalue("moto_server")
    return f"dynamodb://{create_table(server)}?endpoint_url={server.endpoint_url}"


class Counter:
    """Counts calls of a wrapped (class or static) factory."""

    def __init__(self) -> None:
        self.calls = 0


@pytest.fixture
def client_creations(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts the glide clients and aiobotocore clients opened during the test."""
    from aiobotocore.session import AioSession

    counter = Counter()
    connect = GlideCacheClient.connect.__func__  # type: ignore[attr-defined]

    async def counted_connect(cls: Any, *args: Any, **kwargs: Any) -> Any:
        counter.calls += 1
        return await connect(cls, *args, **kwargs)

    create_client = AioSession.create_client

    def counted_create_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter.calls += 1
        return create_client(self, *args, **kwargs)

    monkeypatch.setattr(GlideCacheClient, "connect", classmethod(counted_connect))
    monkeypatch.setattr(AioSession, "create_client", counted_create_client)
    return counter


def import_app(store_url: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Import `tests/lambda_app.py` afresh, as a new execution environment would."""
    monkeypatch.setenv("LAMBDA_APP_STORE_URL", store_url)
    name = f"lambda_app_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, APP)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AppLoader = Callable[[str], types.ModuleType]


@pytest.fixture
def load_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[AppLoader]:
    """Imports app modules; their stores are closed on the handler loop afterwards."""
    imported: list[types.ModuleType] = []

    def load(url: str) -> types.ModuleType:
        module = import_app(url, monkeypatch)
        imported.append(module)
        return module

    yield load
    for module in imported:
        handler_loop.run(module.store.aclose())


@pytest.mark.parametrize("store_url", STORES, indirect=True)
def test_warm_invocations_share_one_loop_and_one_client(
    store_url: str, load_app: AppLoader, client_creations: Counter
) -> None:
    app = load_app(store_url)
    context = app.FakeLambdaContext(remaining_ms=42_000)
    loops_before = handler_loop.created
    first: dict[str, str] = {}
    loop = None
    for call in range(WARM_CALLS):
        order_id = f"order-{call % ORDERS}"
        before_ms = int(time.time() * 1000)
        result = app.handler(event(order_id), context)
        after_ms = int(time.time() * 1000)
        text = json.dumps(result)  # what the runtime does with the return value
        if order_id not in first:
            first[order_id] = text
            # The claim read inside the handler: in progress, expiring when the
            # invocation's time runs out (claimed between before_ms and after_ms).
            assert result["claim_status"] == RecordStatus.INPROGRESS.value
            claimed_at_ms = result["claim_in_progress_expiration_ms"] - 42_000
            assert before_ms <= claimed_at_ms <= after_ms
        else:
            replayed, original = json.loads(text), json.loads(first[order_id])
            assert replayed == original, "a warm duplicate replays the stored result"
        current = handler_loop.loop()
        assert loop is None or current is loop, "every invocation runs on the same loop"
        loop = current
    assert dict(app.EXECUTIONS) == {f"order-{n}": 1 for n in range(ORDERS)}
    assert app.STORE_BUILDS == 1
    assert handler_loop.created - loops_before <= 1
    expected_clients = 0 if store_url.startswith("memory") else 1
    assert client_creations.calls == expected_clients


def test_valkey_connections_survive_warm_invocations(load_app: AppLoader) -> None:
    # A server of its own: the session's shared one also takes the connections of other
    # tests' clients (a glide client reconnects in the background), which this counts.
    with ManagedServer("valkey") as node:
        admin = node.admin()
        app = load_app(f"valkey://{node.host}:{node.port}?client=glide&timeout=5")
        context = app.FakeLambdaContext()
        app.handler(event(f"conn-{uuid.uuid4()}"), context)  # cold: opens the connection
        opened = int(admin.info("stats")["total_connections_received"])
        for n in range(20):
            app.handler(event(f"conn-{n}-{uuid.uuid4()}"), context)
        # the admin client's own connection is already open: nothing new reached the server
        assert int(admin.info("stats")["total_connections_received"]) == opened
        admin.close()


@pytest.mark.parametrize("store_url", STORES, indirect=True)
def test_cold_start_in_a_fresh_interpreter(store_url: str, load_app: AppLoader) -> None:
    order_id = f"cold-{uuid.uuid4()}"
    script = (
        "import json, sys\n"
        "from tests.lambda_app import FakeLambdaContext, handler, EXECUTIONS\n"
        "event = json.loads(sys.argv[1])\n"
        "first = handler(event, FakeLambdaContext())\n"
        "second = handler(event, FakeLambdaContext())\n"
        "print(json.dumps({'first': first, 'second': second, 'runs': dict(EXECUTIONS)}))\n"
    )
    env = {**os.environ, "LAMBDA_APP_STORE_URL": store_url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(event(order_id))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["first"] == out["second"]
    assert out["runs"] == {order_id: 1}
    assert "Unclosed" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_loop_of_its_own(load_app: AppLoader) -> None:
    app = load_app("memory://")
    context = app.FakeLambdaContext()
    app.handler(event("fork-parent"), context)
    parent_loop = handler_loop.loop()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            result = app.handler(event("fork-child"), context)
            report = {"fresh": handler_loop.loop() is not parent_loop, "result": result}
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 30
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            break
        assert time.monotonic() < deadline, "the forked child hung"
        time.sleep(0.01)  # polling a child process, bounded by the deadline
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read())
    assert os.waitstatus_to_exitcode(status) == 0
    assert report["fresh"] is True
    assert report["result"]["order_id"] == "fork-child"
    assert handler_loop.loop() is parent_loop, "the parent keeps its loop"


async def test_refused_inside_a_running_loop(load_app: AppLoader) -> None:
    app = load_app("memory://")
    with pytest.raises(LambdaHandlerError, match="inside a running event loop"):
        app.handler(event("in-loop"), app.FakeLambdaContext())
    assert app.EXECUTIONS["in-loop"] == 0
    # the undecorated coroutine function stays reachable for async callers
    result = await app.handler.__wrapped__(event("in-loop"), app.FakeLambdaContext())
    assert result["order_id"] == "in-loop"


def test_wrapper_keeps_the_handler_identity(load_app: AppLoader) -> None:
    app = load_app("memory://")
    assert app.handler.__wrapped__ is app.charge
    assert app.handler.__name__ == "_charge"
    assert app.handler.engine is app.charge.engine  # the idempotent wrapper's engine
    assert not asyncio.iscoroutinefunction(app.handler)


def test_plain_functions_are_refused() -> None:
    def sync_handler(event: Any, context: Any) -> None:
        return None

    with pytest.raises(TypeError, match="not an async function"):
        lambda_handler(sync_handler)  # type: ignore[arg-type]


def test_handler_exceptions_propagate_and_release_the_claim() -> None:
    store = InMemoryPersistenceLayer()
    attempts: list[int] = []

    @lambda_handler
    @idempotent_async(persistence_store=store)
    async def flaky(event: dict[str, Any], context: Any) -> dict[str, Any]:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("first attempt fails")
        return {"ok": True}

    context = types.SimpleNamespace(get_remaining_time_in_millis=lambda: 10_000)
    with pytest.raises(ValueError, match="first attempt"):
        flaky({"id": 1}, context)
    assert flaky({"id": 1}, context) == {"ok": True}
    assert flaky({"id": 1}, context) == {"ok": True}
    assert len(attempts) == 2


def test_idempotent_async_outside_lambda_handler() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[str] = []

    async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        runs.append(event["id"])
        remaining = context.get_remaining_time_in_millis()
        record = await store.get(outer.engine.idempotency_key(event, handler))
        assert record is not None
        assert record.in_progress_expiry_timestamp is not None
        return {"id": event["id"], "deadline_ms": record.in_progress_expiry_timestamp - remaining}

    outer = cast(Any, idempotent_async(persistence_store=store))(lambda_handler(handler))
    assert not asyncio.iscoroutinefunction(outer), "the runtime must get a sync handler"
    context = types.SimpleNamespace(get_remaining_time_in_millis=lambda: 5_000)
    before = int(time.time() * 1000)
    first = outer({"id": "a"}, context)
    assert json.loads(json.dumps(first)) == outer({"id": "a"}, context)
    assert before <= first["deadline_ms"] <= int(time.time() * 1000)
    assert runs == ["a"]


def test_mypy_sees_the_handler_signature(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    sample = tmp_path / "lambda_sample.py"
    sample.write_text(
        "from typing import Any\n"
        "from aioidempotency.aws_lambda import lambda_handler\n"
        "@lambda_handler\n"
        "async def handler(event: dict[str, Any], context: object) -> list[int]:\n"
        "    return [1]\n"
        "reveal_type(handler({}, None))\n"
        "handler('not a dict', None)\n"
        "handler({})\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(sample)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout
    assert 'lambda_sample.py:6: note: Revealed type is "list[int]"' in out, out
    assert "lambda_sample.py:7: error: Argument 1" in out, out
    assert 'incompatible type "str"; expected "dict[str, Any]"' in out, out
    assert "lambda_sample.py:8: error: Missing positional argument" in out, out


# -- durable functions ---------------------------------------------------------------


class FakeDurableState:
    """The checkpointed state of a durable execution: its operations so far."""

    def __init__(self, operations: int) -> None:
        self.operations = {f"op-{n}": object() for n in range(operations)}


class FakeDurableContext:
    """What the durable-execution SDK passes a handler: the Lambda context inside,
    and the execution's state (one operation on the first invocation)."""

    def __init__(self, operations: int, remaining_ms: int = 30_000) -> None:
        self.lambda_context = types.SimpleNamespace(
            get_remaining_time_in_millis=lambda: remaining_ms
        )
        self.state = FakeDurableState(operations)


@pytest.fixture(params=["memory", "valkey_glide_atomic", "dynamodb_simple"])
def durable_store(request: pytest.FixtureRequest) -> PersistenceLayer:
    """A fresh store of three kinds (resolved at setup, outside the test's loop)."""
    store = request.getfixturevalue(f"store_{request.param}")
    assert isinstance(store, PersistenceLayer)
    return store


async def test_durable_replay_completes_its_own_in_progress_claim(
    durable_store: PersistenceLayer,
) -> None:
    store = durable_store
    suspended = asyncio.Event()
    runs: list[int] = []

    @idempotent_async(persistence_store=store)
    async def handler(event: dict[str, Any], context: FakeDurableContext) -> dict[str, Any]:
        runs.append(len(context.state.operations))
        if len(context.state.operations) == 1:
            suspended.set()
            await asyncio.Event().wait()  # the first invocation suspends (never returns)
        return {"order": event["order"], "status": "shipped"}

    event = {"order": f"durable-{uuid.uuid4()}"}
    first = asyncio.create_task(handler(event, FakeDurableContext(operations=1)))
    try:
        await asyncio.wait_for(suspended.wait(), 10)
        key = handler.engine.idempotency_key(event, inspect.unwrap(handler))
        claim = await store.get(key)
        assert claim is not None
        assert claim.status is RecordStatus.INPROGRESS
        # A new execution with the same payload is a duplicate: still refused.
        with pytest.raises(IdempotencyAlreadyInProgressError):
            await handler(event, FakeDurableContext(operations=1))
        # The replay of the suspended execution runs and completes the claim.
        replayed = await handler(event, FakeDurableContext(operations=3))
        assert replayed == {"order": event["order"], "status": "shipped"}
        stored = await store.get(key)
        assert stored is not None
        assert stored.status is RecordStatus.COMPLETED
        assert stored.response_json() == replayed
        # From now on every invocation, durable or not, replays the stored result.
        assert await handler(event, FakeDurableContext(operations=1)) == replayed
        assert runs == [1, 3]
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await handler.engine.drain(10)
    stored = await store.get(key)
    assert stored is not None
    assert stored.status is RecordStatus.COMPLETED, "the suspended call's release is a no-op"


async def test_durable_replay_without_a_claim_just_runs() -> None:
    store = WrapperStore()

    @idempotent_async(persistence_store=store)
    async def handler(event: dict[str, Any], context: FakeDurableContext) -> int:
        return 7

    assert await handler({"n": 1}, FakeDurableContext(operations=4)) == 7
    assert await handler({"n": 1}, FakeDurableContext(operations=1)) == 7
    assert store.counts["complete"] == 1


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def test_handler_sees_the_callers_context_variables() -> None:
    @lambda_handler
    async def handler(event: dict[str, Any], context: Any) -> str:
        return REQUEST_ID.get()

    REQUEST_ID.set("req-1")
    assert handler({}, None) == "req-1"
    REQUEST_ID.set("req-2")
    assert handler({}, None) == "req-2"


def test_glide_clients_on_other_loops_keep_working(
    cache_servers: ServerPool, load_app: AppLoader
) -> None:
    """valkey-glide 2.x reads every client's replies on the first loop that opened a
    client: the handler loop must keep running between invocations, or a glide
    client of any other loop in the process waits forever."""
    node = cache_servers.standalone("valkey")
    app = load_app(f"valkey://{node.host}:{node.port}?client=glide&timeout=5")
    app.handler(event(f"glide-{uuid.uuid4()}"), app.FakeLambdaContext())

    async def elsewhere() -> bytes | None:
        client = await GlideCacheClient.connect(node.host, node.port)
        try:
            await client.set("other-loop", "yes")
            return await client.get("other-loop")
        finally:
            await client.aclose()

    assert asyncio.run(asyncio.wait_for(elsewhere(), 10)) == b"yes"
