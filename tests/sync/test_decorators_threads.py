"""The sync decorators called from threads: each call runs in its caller's thread, and
many threads with one payload run it once; and what only plain functions meet: base
exceptions, a call from a running event loop, a durable replay while the first
invocation's thread still runs.

What both decorator kinds do is tested once, in tests/test_decorators.py, whose generated
twin (tests/sync/test_decorators.py) runs it on the sync decorators. Every wait across
threads is bounded by `WAIT`.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

import pytest

from aioidempotency import (
    IdempotencyAlreadyInProgressError,
    IdempotencyConfig,
    InMemoryPersistenceLayer,
    idempotent,
    idempotent_function,
)
from aioidempotency._records import DataRecord
from aioidempotency._twins import as_sync_store
from tests.helpers import FakeLambdaContext, WrapperStore

WAIT = 10.0
THREADS = 16


def read_record(store: InMemoryPersistenceLayer, wrapper: Any, payload: Any) -> DataRecord | None:
    """The record of `payload`, read through the store's sync twin (as the decorators do)."""
    key = wrapper.engine.idempotency_key(payload, key_source=wrapper.__wrapped__)
    return as_sync_store(store).get(key)


def run_threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"


# -- base exceptions ---------------------------------------------------------------------------


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


# -- threads -----------------------------------------------------------------------------------


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


# -- a running event loop, durable replays -----------------------------------------------------


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
