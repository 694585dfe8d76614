"""The sync shims: `@idempotent` and `@idempotent_function` on plain functions.

Every wait across threads or processes is bounded by `WAIT`.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from aioidempotency import (
    IdempotencyAlreadyInProgressError,
    IdempotencyConfig,
    IdempotencyPersistenceConnectionError,
    InMemoryPersistenceLayer,
    RecordStatus,
    SyncIdempotencyEngine,
    idempotent,
    idempotent_function,
)
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._records import DataRecord
from aioidempotency._sync.bridge import BridgedStore, background_loop
from aioidempotency.persistence import ClaimResult
from tests.helpers import FakeLambdaContext, WrapperStore

WAIT = 10.0
THREADS = 16

T = TypeVar("T")


def on_background_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a store coroutine on the shims' loop from this (sync) test."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop.loop()).result(timeout=WAIT)


def read_record(
    store: InMemoryPersistenceLayer | WrapperStore, wrapper: Any, payload: Any
) -> DataRecord | None:
    key = wrapper.engine.idempotency_key(payload, key_source=wrapper.__wrapped__)
    return on_background_loop(store.get(key))


def run_threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the basics --------------------------------------------------------------------------------


def test_handler_shim_runs_once_and_replays() -> None:
    store = InMemoryPersistenceLayer()
    events: list[Any] = []

    @idempotent(persistence_store=store)
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        events.append(event)
        return {"paid": event["order"]}

    assert handler({"order": 1}, FakeLambdaContext()) == {"paid": 1}
    assert handler({"order": 1}, FakeLambdaContext()) == {"paid": 1}
    assert handler(event={"order": 1}, context=None) == {"paid": 1}
    assert events == [{"order": 1}]
    assert handler({"order": 2}, FakeLambdaContext()) == {"paid": 2}
    assert len(events) == 2


def test_function_shim_runs_once_and_replays() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[Any] = []

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(customer: str, order: dict[str, Any]) -> list[Any]:
        runs.append(order)
        return [customer, order["id"]]

    assert place("ada", {"id": 1}) == ["ada", 1]
    assert place("ada", order={"id": 1}) == ["ada", 1]
    assert place(customer="bob", order={"id": 1}) == ["ada", 1]
    assert runs == [{"id": 1}]
    record = read_record(store, place, {"id": 1})
    assert record is not None
    assert record.status is RecordStatus.COMPLETED


def test_failure_releases_the_key() -> None:
    store = InMemoryPersistenceLayer()
    attempts: list[int] = []

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, Any]) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("card declined")
        return "placed"

    with pytest.raises(ValueError, match="card declined"):
        place(order={"id": 1})
    assert read_record(store, place, {"id": 1}) is None
    assert place(order={"id": 1}) == "placed"
    assert place(order={"id": 1}) == "placed"
    assert len(attempts) == 2


@pytest.mark.parametrize(
    "error",
    [KeyboardInterrupt(), SystemExit(3), GeneratorExit(), ValueError("plain")],
    ids=["KeyboardInterrupt", "SystemExit", "GeneratorExit", "Exception"],
)
def test_base_exceptions_release_the_claim_and_propagate_unchanged(error: BaseException) -> None:
    store = InMemoryPersistenceLayer()
    runs: list[int] = []

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, Any]) -> str:
        runs.append(1)
        if len(runs) == 1:
            raise error
        return "placed"

    with pytest.raises(type(error)) as caught:
        place(order={"id": 1})
    assert caught.value is error
    assert read_record(store, place, {"id": 1}) is None
    assert len(store) == 0
    assert place(order={"id": 1}) == "placed"
    assert len(runs) == 2


# -- threads and the background loop -----------------------------------------------------------


def test_function_runs_in_the_callers_thread() -> None:
    store = InMemoryPersistenceLayer()
    seen: dict[str, int] = {}

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, Any]) -> int:
        seen[order["who"]] = threading.get_ident()
        return threading.get_ident()

    assert place(order={"who": "main"}) == threading.get_ident()
    worker_ident: list[int] = []

    def worker() -> None:
        worker_ident.append(threading.get_ident())
        place(order={"who": "worker"})

    run_threads([worker])
    assert seen == {"main": threading.get_ident(), "worker": worker_ident[0]}


def test_store_calls_run_on_one_background_loop_across_calls() -> None:
    """The loop (and so the store's clients) survive across calls: warm invocations."""
    store = WrapperStore()

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, Any]) -> int:
        return int(order["id"])

    @idempotent(persistence_store=store)
    def handler(event: dict[str, Any], context: Any) -> int:
        return int(event["id"])

    for n in range(10):
        assert place(order={"id": n}) == n
        assert place(order={"id": n}) == n  # replay
        assert handler({"id": n}, FakeLambdaContext()) == n
    run_threads([lambda n=n: place(order={"id": 100 + n}) for n in range(4)])  # type: ignore[misc]

    assert store.counts["claim"] == 34
    assert store.counts["complete"] == 24
    loops = {id(call.loop) for call in store.calls}
    threads = {call.thread_ident for call in store.calls}
    assert len(loops) == 1
    assert len(threads) == 1
    assert store.calls[0].loop is background_loop.loop()
    assert store.calls[0].loop.is_running()
    loop_thread = background_loop.thread
    assert loop_thread is not None
    assert threads == {loop_thread.ident}
    assert threading.get_ident() not in threads


def test_cache_hits_and_missing_keys_never_cross_to_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both need no I/O, so they are answered in the caller's thread."""
    store = WrapperStore()
    executions: list[int] = []

    @idempotent_function(
        data_keyword_argument="order",
        persistence_store=store,
        config=IdempotencyConfig(event_key_jmespath="id", use_local_cache=True),
    )
    def place(order: dict[str, Any]) -> int:
        executions.append(threading.get_ident())
        return len(executions)

    assert place(order={"id": 1}) == 1
    handed_over: list[Any] = []
    original = asyncio.run_coroutine_threadsafe

    def spy(coro: Any, loop: Any) -> Any:
        handed_over.append(coro)
        return original(coro, loop)

    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", spy)
    calls_before = len(store.calls)
    for _ in range(5):
        assert place(order={"id": 1}) == 1  # local cache hit
    with pytest.warns(UserWarning, match="No idempotency key value found"):
        assert place(order={"other": 1}) == 2  # no key: runs unprotected
    assert handed_over == []
    assert len(store.calls) == calls_before
    assert executions == [threading.get_ident()] * 2


def test_sixteen_threads_with_the_same_payload_execute_once() -> None:
    store = InMemoryPersistenceLayer()
    executions: list[int] = []
    started = threading.Event()
    release = threading.Event()
    outcomes: collections.Counter[str] = collections.Counter()
    results: list[Any] = []
    lock = threading.Condition()
    barrier = threading.Barrier(THREADS, timeout=WAIT)

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, Any]) -> dict[str, Any]:
        executions.append(threading.get_ident())
        started.set()
        assert release.wait(timeout=WAIT)
        return {"placed": order["id"]}

    def caller() -> None:
        barrier.wait()
        try:
            result = place(order={"id": 1})
        except IdempotencyAlreadyInProgressError:
            outcome = "in_progress"
        else:
            outcome = "result"
            results.append(result)
        with lock:
            outcomes[outcome] += 1
            lock.notify_all()

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        assert started.wait(timeout=WAIT)
        with lock:  # every other caller has been answered while the first one runs
            assert lock.wait_for(lambda: outcomes.total() == THREADS - 1, timeout=WAIT)
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert len(executions) == 1
    assert outcomes == {"in_progress": THREADS - 1, "result": 1}
    assert results == [{"placed": 1}]
    # and afterwards every duplicate is a replay
    assert place(order={"id": 1}) == {"placed": 1}
    assert len(executions) == 1


def test_sixteen_threads_waiting_for_the_result_share_it() -> None:
    store = InMemoryPersistenceLayer()
    executions: list[int] = []
    results: list[Any] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(THREADS, timeout=WAIT)

    @idempotent_function(
        data_keyword_argument="order",
        persistence_store=store,
        config=IdempotencyConfig(wait_for_in_progress_seconds=WAIT),
    )
    def place(order: dict[str, Any]) -> dict[str, Any]:
        executions.append(1)
        return {"placed": order["id"]}

    def caller() -> None:
        barrier.wait()
        try:
            results.append(place(order={"id": 1}))
        except BaseException as exc:
            failures.append(exc)

    run_threads([caller] * THREADS)
    assert failures == []
    assert len(executions) == 1
    assert results == [{"placed": 1}] * THREADS


def test_sixteen_threads_with_distinct_payloads_each_run_once() -> None:
    store = WrapperStore()
    executions: collections.Counter[int] = collections.Counter()
    results: dict[int, Any] = {}
    barrier = threading.Barrier(THREADS, timeout=WAIT)
    lock = threading.Lock()

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, Any]) -> int:
        with lock:
            executions[order["id"]] += 1
        return int(order["id"]) * 10

    def caller(n: int) -> None:
        barrier.wait()
        results[n] = place(order={"id": n})
        assert place(order={"id": n}) == n * 10  # replay

    run_threads([lambda n=n: caller(n) for n in range(THREADS)])  # type: ignore[misc]
    assert executions == {n: 1 for n in range(THREADS)}
    assert results == {n: n * 10 for n in range(THREADS)}
    assert store.counts["complete"] == THREADS
    assert len({id(call.loop) for call in store.calls}) == 1


# -- Lambda contexts ---------------------------------------------------------------------------


def test_registered_lambda_context_is_per_thread() -> None:
    store = InMemoryPersistenceLayer()
    config = IdempotencyConfig(in_progress_lease_seconds=600.0)
    names = ("a", "b", "none", "handler")
    claimed = {name: threading.Event() for name in names}
    finish = threading.Event()
    registered = threading.Barrier(len(names), timeout=WAIT)

    @idempotent_function(data_keyword_argument="order", persistence_store=store, config=config)
    def place(order: dict[str, Any]) -> str:
        claimed[order["task"]].set()
        assert finish.wait(timeout=WAIT)
        return str(order["task"])

    @idempotent(persistence_store=store, config=config)
    def handler(event: dict[str, Any], context: Any) -> str:
        claimed[event["task"]].set()
        assert finish.wait(timeout=WAIT)
        return str(event["task"])

    results: dict[str, str] = {}

    def caller(name: str, context: FakeLambdaContext | None) -> None:
        if context is not None:
            config.register_lambda_context(context)
        registered.wait()  # all registered before any call
        if name == "handler":  # no context argument: the thread's registered one applies
            results[name] = handler({"task": name}, None)
        else:
            results[name] = place(order={"task": name})

    contexts = {
        "a": FakeLambdaContext(remaining_ms=111_111),
        "b": FakeLambdaContext(remaining_ms=222_222),
        "none": None,
        "handler": FakeLambdaContext(remaining_ms=333_333),
    }
    threads = [
        threading.Thread(target=caller, args=(name, contexts[name]), daemon=True) for name in names
    ]
    before = now_ms()
    for thread in threads:
        thread.start()
    try:
        for event in claimed.values():
            assert event.wait(timeout=WAIT)
        records = {name: read_record(store, place, {"task": name}) for name in ("a", "b", "none")}
        records["handler"] = read_record(store, handler, {"task": "handler"})
        after = now_ms()
    finally:
        finish.set()
        for thread in threads:
            thread.join(timeout=WAIT)
    assert results == {name: name for name in names}
    expected = {"a": 111_111, "b": 222_222, "none": 600_000, "handler": 333_333}
    for name, record in records.items():
        assert record is not None
        assert record.in_progress_expiry_timestamp is not None
        assert (
            before + expected[name] <= record.in_progress_expiry_timestamp <= after + expected[name]
        ), name


def test_handler_shim_claim_uses_the_context_argument() -> None:
    store = InMemoryPersistenceLayer()
    claimed = threading.Event()
    finish = threading.Event()

    @idempotent(persistence_store=store)
    def handler(event: dict[str, Any], context: Any) -> str:
        claimed.set()
        assert finish.wait(timeout=WAIT)
        return "ok"

    results: list[str] = []
    thread = threading.Thread(
        target=lambda: results.append(handler({"id": 1}, FakeLambdaContext(remaining_ms=0))),
        daemon=True,
    )
    before = now_ms()
    thread.start()
    try:
        assert claimed.wait(timeout=WAIT)
        record = read_record(store, handler, {"id": 1})
        after = now_ms()
    finally:
        finish.set()
        thread.join(timeout=WAIT)
    assert results == ["ok"]
    assert record is not None
    assert record.in_progress_expiry_timestamp is not None
    assert before <= record.in_progress_expiry_timestamp <= after


# -- misuse, nesting, timeouts -----------------------------------------------------------------


async def test_sync_decorators_work_inside_a_running_loop_on_a_sync_capable_store() -> None:
    """The in-memory store has a native sync twin: no loop is involved, so a sync
    idempotent function may be called from async code (it blocks like any def)."""
    store = InMemoryPersistenceLayer()
    runs: list[int] = []

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, Any]) -> int:
        runs.append(1)
        return 1

    assert place(order={"id": 1}) == 1
    assert place(order={"id": 1}) == 1
    assert runs == [1]
    assert len(store) == 1


def test_nested_sync_idempotent_calls_do_not_deadlock() -> None:
    store = WrapperStore()
    runs: collections.Counter[str] = collections.Counter()

    @idempotent_function(data_keyword_argument="item", persistence_store=store)
    def reserve(item: str) -> str:
        runs["reserve"] += 1
        return f"reserved {item}"

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(order: dict[str, Any]) -> list[str]:
        runs["place"] += 1
        return [reserve(item=item) for item in order["items"]]

    @idempotent(persistence_store=store)
    def handler(event: dict[str, Any], context: Any) -> list[str]:
        runs["handler"] += 1
        return place(order=event) + place(order=event)  # the second one replays

    results: list[Any] = []

    def call() -> None:
        results.append(handler({"items": ["a", "b", "a"]}, FakeLambdaContext()))
        results.append(handler({"items": ["a", "b", "a"]}, FakeLambdaContext()))

    run_threads([call])
    expected = ["reserved a", "reserved b", "reserved a"] * 2
    assert results == [expected, expected]
    assert runs == {"handler": 1, "place": 1, "reserve": 2}
    assert len({id(c.loop) for c in store.calls}) == 1


class _HangingStore(InMemoryPersistenceLayer):
    """A store whose claim never answers (a dead connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.claim_cancelled = threading.Event()

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.claim_cancelled.set()
            raise
        raise AssertionError("unreachable")


def test_a_store_that_never_answers_times_out() -> None:
    store = _HangingStore()
    engine = SyncIdempotencyEngine(BridgedStore(store, timeout=0.2), key_prefix="hang")
    runs: list[int] = []

    def work() -> int:
        runs.append(1)
        return 1

    with pytest.raises(IdempotencyPersistenceConnectionError, match="did not answer"):
        engine.run({"id": 1}, work)
    assert runs == []
    assert store.claim_cancelled.wait(timeout=WAIT)  # the engine call was cancelled


# -- fork --------------------------------------------------------------------------------------

_FORK_STORE = WrapperStore()
_FORK_RUNS: list[int] = []


@idempotent_function(data_keyword_argument="order", persistence_store=_FORK_STORE)
def _fork_place(order: dict[str, Any]) -> dict[str, Any]:
    _FORK_RUNS.append(order["id"])
    return {"placed": order["id"], "by": multiprocessing.current_process().name}


def _fork_child(connection: Any, parent_loop_id: int, parent_native_id: int) -> None:
    try:
        seen = len(_FORK_STORE.calls)
        replayed = _fork_place(order={"id": 1})  # completed in the parent: a replay
        fresh = _fork_place(order={"id": 2})
        again = _fork_place(order={"id": 2})
        calls = _FORK_STORE.calls[seen:]
        connection.send(
            {
                "replayed": replayed,
                "fresh": fresh,
                "again": again,
                "runs": list(_FORK_RUNS),
                "loops": sorted({id(call.loop) for call in calls}),
                "parent_loop_seen": any(id(call.loop) == parent_loop_id for call in calls),
                "native_ids": sorted({call.native_thread_id for call in calls}),
                "parent_native_id": parent_native_id,
                "store_calls": len(calls),
            }
        )
    except BaseException as exc:
        connection.send({"error": repr(exc)})
    finally:
        connection.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads (3.12+)
def test_forked_child_gets_a_fresh_loop() -> None:
    assert _fork_place(order={"id": 1})["placed"] == 1
    parent_calls = list(_FORK_STORE.calls)
    parent_loop = parent_calls[-1].loop
    parent_native_id = parent_calls[-1].native_thread_id
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(
        target=_fork_child, args=(sender, id(parent_loop), parent_native_id), name="forked-child"
    )
    child.start()
    sender.close()
    try:
        assert receiver.poll(timeout=WAIT * 3), "the forked child hung"
        report = receiver.recv()
    finally:
        child.join(timeout=WAIT)
        if child.is_alive():
            child.kill()
            child.join(timeout=WAIT)
    assert "error" not in report, report
    assert child.exitcode == 0
    assert report["replayed"] == {"placed": 1, "by": "MainProcess"}
    assert report["fresh"] == {"placed": 2, "by": "forked-child"}
    assert report["again"] == report["fresh"]
    assert report["runs"] == [1, 2]  # the child ran only the new payload
    assert report["store_calls"] >= 4
    assert len(report["loops"]) == 1
    assert not report["parent_loop_seen"]
    assert report["parent_native_id"] not in report["native_ids"]
    # the parent's loop is untouched and still serves the parent
    assert _fork_place(order={"id": 3})["placed"] == 3
    assert _FORK_STORE.calls[-1].loop is parent_loop
    assert _FORK_RUNS == [1, 3]


# -- closing at exit ---------------------------------------------------------------------------

_EXIT_SCRIPT = """
import atexit, asyncio, json, sys, warnings
warnings.simplefilter("always", ResourceWarning)
sessions = []

def report_open_sessions():
    # registered before aioidempotency is imported: runs after its exit hook
    still_open = sum(not session.closed for session in sessions)
    sys.stderr.write(f"open sessions at exit: {still_open}\\n")

atexit.register(report_open_sessions)

from aioidempotency import idempotent, idempotent_function
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._sync.bridge import background_loop

from aiobotocore.session import AioSession

table, endpoint = sys.argv[1], sys.argv[2]
# an aiobotocore session: sync calls go through the bridge (a boto3 one would not)
store = DynamoDBPersistenceLayer(table, endpoint_url=endpoint, session=AioSession())
runs = []

@idempotent(persistence_store=store)
def handler(event, context):
    runs.append(event["id"])
    return {"paid": event["id"]}

@idempotent_function(data_keyword_argument="order", persistence_store=store)
def place(order):
    runs.append(order["id"])
    return order["id"]

results = [handler({"id": 1}, None), handler({"id": 1}, None), place(order={"id": 2})]
client = asyncio.run_coroutine_threadsafe(store.client(), background_loop.loop()).result(10)
sessions.extend(client._endpoint.http_session._sessions.values())
print(json.dumps({"results": results, "runs": runs, "sessions": len(sessions)}))
"""


@pytest.mark.parametrize("exit_kind", ["return", "sys.exit"])
def test_the_background_loop_closes_its_stores_clients_at_exit(
    moto_server: Any, exit_kind: str
) -> None:
    """No "Unclosed client session" at exit: the DynamoDB layer's own client, opened on
    the shims' loop, is closed there before the interpreter ends."""
    import json
    import os
    import subprocess
    import sys

    from tests.backends.dynamodb import new_table_name

    table = new_table_name()
    layer = DynamoDBPersistenceLayer(table, endpoint_url=moto_server.endpoint_url)
    on_background_loop(layer.create_table(exist_ok=False))
    script = _EXIT_SCRIPT + ("\nsys.exit(0)\n" if exit_kind == "sys.exit" else "")
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, table, moto_server.endpoint_url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    finally:
        on_background_loop(layer.aclose())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "results": [{"paid": 1}, {"paid": 1}, 2],
        "runs": [1, 2],
        "sessions": 1,
    }
    assert "open sessions at exit: 0" in done.stderr, done.stderr
    assert "Unclosed" not in done.stderr, done.stderr
    assert "Task was destroyed" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


class _SlowToCloseStore(WrapperStore):
    """Closing takes `delay` seconds (a store whose server stopped answering)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.closed = threading.Event()

    async def aclose(self) -> None:
        await asyncio.sleep(self.delay)
        self.closed.set()


@pytest.mark.parametrize(("delay", "finished"), [(0.0, True), (3600.0, False)])
def test_closing_the_background_loop_is_bounded(delay: float, finished: bool) -> None:
    from aioidempotency._sync.bridge import BackgroundLoop

    background = BackgroundLoop()
    loop = background.loop()
    store = _SlowToCloseStore(delay)
    background.remember(store)
    started = time.monotonic()
    assert background.close(timeout=0.5) is finished
    assert time.monotonic() - started < WAIT
    assert store.closed.is_set() is finished
    assert loop.is_closed()
    assert background.thread is None
    assert background.loop() is not loop  # a later call gets a new loop
    assert background.close(timeout=0.5)


class _DurableContext:
    """A durable-execution context: the Lambda context inside, and the execution's
    checkpointed operations (one on its first invocation)."""

    def __init__(self, operations: int) -> None:
        self.lambda_context = FakeLambdaContext()
        self.state = type("State", (), {"operations": list(range(operations))})()


def test_a_sync_durable_replay_completes_its_own_in_progress_claim() -> None:
    store = InMemoryPersistenceLayer()
    suspended = threading.Event()
    resume = threading.Event()
    runs: list[int] = []

    @idempotent(persistence_store=store)
    def handler(event: dict[str, Any], context: _DurableContext) -> str:
        runs.append(len(context.state.operations))
        if len(context.state.operations) == 1:
            suspended.set()
            assert resume.wait(WAIT)
            raise RuntimeError("the first invocation was suspended")
        return f"shipped {event['order']}"

    errors: list[BaseException] = []

    def first() -> None:
        try:
            handler({"order": "o-1"}, _DurableContext(operations=1))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert suspended.wait(WAIT)
        # A new execution with the same payload is a duplicate: refused.
        with pytest.raises(IdempotencyAlreadyInProgressError):
            handler({"order": "o-1"}, _DurableContext(operations=1))
        # The replay of the suspended execution runs and completes its claim.
        assert handler({"order": "o-1"}, _DurableContext(operations=3)) == "shipped o-1"
    finally:
        resume.set()
        thread.join(WAIT)
    assert [type(e) for e in errors] == [RuntimeError]
    # The first invocation's release left the completed record alone.
    assert handler({"order": "o-1"}, _DurableContext(operations=1)) == "shipped o-1"
    assert runs == [1, 3]
