"""The sync decorators on a store with no sync twin (an async `PersistenceLayer` of the
user's, a DynamoDB store on an aiobotocore session): its calls run on the bridge's
background loop, one loop for every call and thread of the process (none for a cache hit),
nested calls do not deadlock on it, a store that never answers times out, a forked child
gets a loop of its own, and the loop closes its stores at exit, in bounded time.

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
    IdempotencyConfig,
    IdempotencyPersistenceConnectionError,
    InMemoryPersistenceLayer,
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

T = TypeVar("T")


def on_background_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a store coroutine on the bridge's loop from this (sync) test."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop.loop()).result(timeout=WAIT)


def run_threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"


# -- the background loop -----------------------------------------------------------------------


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


# -- nesting, timeouts -------------------------------------------------------------------------


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
    the bridge's loop, is closed there before the interpreter ends."""
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
