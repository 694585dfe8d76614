"""Engine behaviour (docs/state-machine.md), run against every store backend.

tools/unasync.py generates the sync engine's twin of this module, tests/sync/test_engine.py:
what differs by nature comes from ``.concurrency`` and ``.helpers`` (tests/ here,
tests/sync/ there), and the tests of cancellation are async-only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
import uuid
import warnings
from collections import Counter
from typing import Any

import pytest

from aioidempotency import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyConfig,
    IdempotencyDisabledWarning,
    IdempotencyEngine,
    IdempotencyInconsistentStateError,
    IdempotencyKeyError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceLayerError,
    IdempotencyResultTooLargeError,
    IdempotencySerializationError,
    IdempotencyValidationError,
    InMemoryPersistenceLayer,
)
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.persistence import PersistenceLayer
from aioidempotency.testing import FakeClock

from .concurrency import Event, gather, sleep, spawn, wait_set
from .helpers import FakeLambdaContext, VanishingStore, WrapperStore

PAYMENT = {"payment_id": "p-1", "amount": 100, "currency": "EUR"}


class Calls:
    """A function that counts its executions and returns a chosen result."""

    def __init__(self, result: Any = None) -> None:
        self.result = result
        self.count = 0

    async def __call__(self) -> Any:
        self.count += 1
        return self.result


class Gate:
    """A function that blocks until released, to hold a claim open."""

    def __init__(self, result: Any = "done") -> None:
        self.started = Event()
        self.release = Event()
        self.result = result
        self.count = 0

    async def __call__(self) -> Any:
        self.count += 1
        self.started.set()
        await wait_set(self.release)
        return self.result


class Joins:
    """Counts the calls that join a running call of `engine` (in-process duplicates);
    `joined` is set once `expected` of them did."""

    def __init__(self, engine: IdempotencyEngine, expected: int) -> None:
        self.joined = Event()
        counter = itertools.count(1)
        join = engine._flights.join

        async def counted(flight: Any, timeout: float) -> Any:
            if next(counter) == expected:
                self.joined.set()
            return await join(flight, timeout)

        engine._flights.join = counted  # type: ignore[method-assign]


def engine_for(
    store: PersistenceLayer, *, clock: FakeClock | None = None, **config: Any
) -> IdempotencyEngine:
    if clock is None:  # the engine's default clock
        return IdempotencyEngine(store, IdempotencyConfig(**config), key_prefix="test-engine")
    return IdempotencyEngine(
        store, IdempotencyConfig(**config), key_prefix="test-engine", clock=clock
    )


async def plant(
    store: PersistenceLayer,
    key: str,
    *,
    status: RecordStatus = RecordStatus.INPROGRESS,
    expiry: int | None = None,
    in_progress_ms: int | None = None,
    data: Any = None,
    payload_hash: str | None = None,
) -> str:
    """Write a record as another (possibly crashed) caller would; returns its owner."""
    now = time.time()
    owner = uuid.uuid4().hex
    claim = DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(now) + 3600 if expiry is None else expiry,
        in_progress_expiry_timestamp=in_progress_ms,
        payload_hash=payload_hash,
        owner=owner,
    )
    result = await store.claim(claim, now=now)
    assert result.claimed
    if status is RecordStatus.COMPLETED:
        completed = DataRecord(
            idempotency_key=key,
            status=RecordStatus.COMPLETED,
            expiry_timestamp=claim.expiry_timestamp,
            response_data=json.dumps(data),
            payload_hash=payload_hash,
        )
        await store.complete(completed, owner=owner)
    return owner


# -- replay ----------------------------------------------------------------------------


async def test_first_call_runs_and_duplicates_replay(store: PersistenceLayer) -> None:
    engine = engine_for(store)
    fn = Calls({"status": "paid", "amount": 100})
    first = await engine.run(PAYMENT, fn)
    second = await engine.run(dict(PAYMENT), fn)
    third = await engine_for(store).run(PAYMENT, fn)  # another "process"
    assert fn.count == 1
    assert first == second == third == {"status": "paid", "amount": 100}
    assert second is not first  # a replay is a fresh copy, never the shared object


async def test_stored_record_is_completed_with_reference_layout(store: PersistenceLayer) -> None:
    engine = engine_for(store, payload_validation_jmespath="amount")
    await engine.run(PAYMENT, Calls({"b": 1, "a": [1, 2]}))
    key = engine.idempotency_key(PAYMENT)
    record = await store.get(key)
    assert record is not None
    assert record.status is RecordStatus.COMPLETED
    assert record.response_data == '{"a": [1, 2], "b": 1}'
    assert record.payload_hash is not None  # kept on completion, for validating replays
    assert record.expiry_timestamp >= int(time.time()) + 3600 - 5


@pytest.mark.parametrize("result", [0, "", [], {}, False, None, 0.0])
async def test_falsy_results_replay_as_themselves(store: PersistenceLayer, result: Any) -> None:
    engine = engine_for(store)
    fn = Calls(result)
    assert await engine.run(PAYMENT, fn) == result
    replayed = await engine.run(PAYMENT, fn)
    assert fn.count == 1
    assert replayed == result
    assert type(replayed) is type(result)


async def test_event_key_jmespath_selects_the_key(store: PersistenceLayer) -> None:
    engine = engine_for(store, event_key_jmespath="payment_id")
    fn = Calls("ok")
    await engine.run({"payment_id": "a", "noise": 1}, fn)
    await engine.run({"payment_id": "a", "noise": 2}, fn)
    await engine.run({"payment_id": "b", "noise": 1}, fn)
    assert fn.count == 2


# -- in progress -----------------------------------------------------------------------


async def test_concurrent_duplicate_from_another_process_is_refused(
    store: PersistenceLayer,
) -> None:
    gate = Gate()
    first = spawn(engine_for(store).run, PAYMENT, gate)
    await wait_set(gate.started)
    with pytest.raises(IdempotencyAlreadyInProgressError, match="already in progress"):
        await engine_for(store).run(PAYMENT, Calls())
    gate.release.set()
    assert await first.result() == "done"
    assert gate.count == 1


async def test_concurrent_duplicate_in_process_is_refused_without_store_traffic(
    store: PersistenceLayer,
) -> None:
    counting = WrapperStore(store)
    engine = engine_for(counting)
    gate = Gate()
    first = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    before = counting.total
    with pytest.raises(IdempotencyAlreadyInProgressError):
        await engine.run(PAYMENT, Calls())
    assert counting.total == before
    gate.release.set()
    await first.result()


async def test_thousand_concurrent_calls_over_fifty_payloads_execute_each_once(
    store: PersistenceLayer,
) -> None:
    # 1000 calls share one GIL with the suite's in-process moto server: alone this takes
    # 12-17 s, but in a full run (the sync twin's threads, coverage's tracer) up to 42 s
    # was seen, and waiters bounded at 30 s gave up. The bound is a hang guard, not a time.
    engine = engine_for(store, wait_for_in_progress_seconds=120)
    executions: list[int] = []  # appended to, so no thread loses a count

    async def call(i: int) -> int:
        async def pay() -> int:
            executions.append(i)
            await sleep(0)
            return i * 10

        return await engine.run({"payment": i}, pay)

    results = await gather(*(spawn(call, n % 50) for n in range(1000)), timeout=150)
    assert Counter(executions) == Counter({i: 1 for i in range(50)})
    assert results == [(n % 50) * 10 for n in range(1000)]


async def test_concurrent_duplicates_without_waiting_execute_once(
    store: PersistenceLayer,
) -> None:
    engine = engine_for(store)
    executions: list[int] = []  # appended to, so no thread loses a count

    async def call(i: int) -> Any:
        async def pay() -> int:
            executions.append(i)
            await sleep(0)
            return i

        try:
            return await engine.run({"payment": i}, pay)
        except IdempotencyAlreadyInProgressError as exc:
            return exc

    results = await gather(*(spawn(call, n % 20) for n in range(200)))
    assert Counter(executions) == Counter({i: 1 for i in range(20)})
    refused = [r for r in results if isinstance(r, IdempotencyAlreadyInProgressError)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert len(refused) + len(answered) == 200
    assert all(r == n % 20 for n, r in enumerate(results) if not isinstance(r, Exception))


# -- waiting for a running duplicate ---------------------------------------------------


async def test_waiting_duplicate_gets_the_result(store: PersistenceLayer) -> None:
    gate = Gate({"receipt": 7})
    first = spawn(engine_for(store).run, PAYMENT, gate)
    await wait_set(gate.started)
    waiter_engine = engine_for(
        store, wait_for_in_progress_seconds=20, wait_poll_interval_seconds=0.01
    )
    waiter = spawn(waiter_engine.run, PAYMENT, Calls("never"))
    gate.release.set()
    assert await waiter.result() == {"receipt": 7}
    assert await first.result() == {"receipt": 7}
    assert gate.count == 1


async def test_waiting_duplicate_claims_a_released_key(store: PersistenceLayer) -> None:
    class Boom(Exception):
        pass

    started = Event()
    release = Event()

    async def failing() -> None:
        started.set()
        await wait_set(release)
        raise Boom

    first = spawn(engine_for(store).run, PAYMENT, failing)
    await wait_set(started)
    waiter_engine = engine_for(
        store, wait_for_in_progress_seconds=20, wait_poll_interval_seconds=0.01
    )
    second = Calls("second")
    waiter = spawn(waiter_engine.run, PAYMENT, second)
    release.set()
    with pytest.raises(Boom):
        await first.result()
    assert await waiter.result() == "second"
    assert second.count == 1


async def test_waiting_gives_up_after_the_bound(store: PersistenceLayer) -> None:
    gate = Gate()
    first = spawn(engine_for(store).run, PAYMENT, gate)
    await wait_set(gate.started)
    waiter_engine = engine_for(
        store, wait_for_in_progress_seconds=0.05, wait_poll_interval_seconds=0.01
    )
    with pytest.raises(IdempotencyAlreadyInProgressError):
        await waiter_engine.run(PAYMENT, Calls())
    gate.release.set()
    await first.result()


async def test_in_process_waiters_share_one_execution_without_polling(
    store: PersistenceLayer,
) -> None:
    counting = WrapperStore(store)
    engine = engine_for(counting, wait_for_in_progress_seconds=20)
    gate = Gate({"ok": True})
    first = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    joins = Joins(engine, 10)
    waiters = [spawn(engine.run, PAYMENT, Calls()) for _ in range(10)]
    await wait_set(joins.joined)  # all ten share the running call before it ends
    gate.release.set()
    results = await gather(first, *waiters)
    assert results == [{"ok": True}] * 11
    assert gate.count == 1
    assert counting.counts["get"] == 0
    assert counting.counts["claim"] == 1


async def test_in_process_waiters_claim_the_key_when_the_running_call_fails(
    store: PersistenceLayer,
) -> None:
    class Boom(Exception):
        pass

    engine = engine_for(store, wait_for_in_progress_seconds=20)
    started, fail = Event(), Event()

    async def failing() -> None:
        started.set()
        await wait_set(fail)
        raise Boom

    first = spawn(engine.run, PAYMENT, failing)
    await wait_set(started)
    joins = Joins(engine, 1)
    second = Calls("second")
    waiter = spawn(engine.run, PAYMENT, second)
    await wait_set(joins.joined)  # it shares the running call, then that call fails
    fail.set()
    with pytest.raises(Boom):
        await first.result()
    assert await waiter.result() == "second"
    assert second.count == 1
    record = await store.get(engine.idempotency_key(PAYMENT))
    assert record is not None
    assert record.response_data == '"second"'


# -- validation ------------------------------------------------------------------------


async def test_payload_validation_mismatch_is_refused(store: PersistenceLayer) -> None:
    engine = engine_for(
        store, event_key_jmespath="payment_id", payload_validation_jmespath="amount"
    )
    fn = Calls("ok")
    await engine.run(PAYMENT, fn)
    assert await engine.run(dict(PAYMENT), fn) == "ok"
    with pytest.raises(IdempotencyValidationError):
        await engine.run({**PAYMENT, "amount": 999}, fn)
    with pytest.raises(IdempotencyValidationError):
        await engine_for(
            store, event_key_jmespath="payment_id", payload_validation_jmespath="amount"
        ).run({**PAYMENT, "amount": 999}, fn)
    assert fn.count == 1


async def test_validation_also_applies_to_a_call_in_progress(store: PersistenceLayer) -> None:
    config: dict[str, Any] = {
        "event_key_jmespath": "payment_id",
        "payload_validation_jmespath": "amount",
    }
    gate = Gate()
    engine = engine_for(store, **config)
    first = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    with pytest.raises(IdempotencyValidationError):
        await engine.run({**PAYMENT, "amount": 1}, Calls())
    with pytest.raises(IdempotencyValidationError):
        await engine_for(store, **config).run({**PAYMENT, "amount": 1}, Calls())
    gate.release.set()
    await first.result()


# -- failure, cancellation, bad results ------------------------------------------------


async def test_failure_releases_the_claim_and_reraises(store: PersistenceLayer) -> None:
    class Declined(Exception):
        pass

    async def declined() -> None:
        raise Declined("card declined")

    engine = engine_for(store)
    with pytest.raises(Declined, match="card declined"):
        await engine.run(PAYMENT, declined)
    assert await store.get(engine.idempotency_key(PAYMENT)) is None
    fn = Calls("retried")
    assert await engine.run(PAYMENT, fn) == "retried"
    assert fn.count == 1


# begin async-only
# Nothing cancels a sync call from outside (a thread cannot be interrupted; Ctrl-C is
# the main thread's): the sync twin has no tests of cancellation or of asyncio.timeout.
async def test_cancellation_releases_the_claim(store: PersistenceLayer) -> None:
    engine = engine_for(store)
    gate = Gate()
    task = asyncio.create_task(engine.run(PAYMENT, gate))
    await asyncio.wait_for(gate.started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.get(engine.idempotency_key(PAYMENT)) is None
    fn = Calls("after cancel")
    assert await engine.run(PAYMENT, fn) == "after cancel"


async def test_timeout_releases_the_claim(store: PersistenceLayer) -> None:
    if sys.version_info < (3, 11):  # a check mypy reads (python_version is 3.10)
        pytest.skip("asyncio.timeout is new in 3.11")
    engine = engine_for(store)
    gate = Gate()
    scopes: list[Any] = []

    async def call() -> Any:
        async with asyncio.timeout(None) as scope:
            scopes.append(scope)
            return await engine.run(PAYMENT, gate)

    runner = asyncio.create_task(call())
    await asyncio.wait_for(gate.started.wait(), 10)
    scopes[0].reschedule(asyncio.get_running_loop().time())  # the deadline passes now
    with pytest.raises(TimeoutError):
        await runner
    assert gate.count == 1
    assert await store.get(engine.idempotency_key(PAYMENT)) is None
    assert await engine.run(PAYMENT, Calls("again")) == "again"


# end async-only


async def test_unserialisable_result_releases_the_key(store: PersistenceLayer) -> None:
    engine = engine_for(store)
    result = {"when": object()}
    with pytest.raises(IdempotencySerializationError) as caught:
        await engine.run(PAYMENT, Calls(result))
    assert caught.value.result is result
    assert await store.get(engine.idempotency_key(PAYMENT)) is None
    assert await engine.run(PAYMENT, Calls("fine")) == "fine"


# -- hooks, cache, missing keys, disabled ----------------------------------------------


async def test_response_hook_sees_every_replay_also_none(store: PersistenceLayer) -> None:
    seen: list[tuple[Any, str]] = []

    def hook(response: Any, record: DataRecord) -> Any:
        seen.append((response, record.status.value))
        return {"replayed": response}

    engine = engine_for(store, response_hook=hook)
    assert await engine.run({"n": 1}, Calls({"a": 1})) == {"a": 1}
    assert await engine.run({"n": 1}, Calls()) == {"replayed": {"a": 1}}
    assert await engine.run({"n": 2}, Calls(None)) is None
    assert await engine.run({"n": 2}, Calls()) == {"replayed": None}
    assert seen == [({"a": 1}, "COMPLETED"), (None, "COMPLETED")]


async def test_a_response_hook_that_raises_fails_the_replay(store: PersistenceLayer) -> None:
    def hook(response: Any, record: DataRecord) -> Any:
        raise LookupError(f"no receipt for {response}")

    engine = engine_for(store, response_hook=hook)
    fn = Calls("paid")
    assert await engine.run(PAYMENT, fn) == "paid"  # a first call is no replay
    with pytest.raises(LookupError, match="no receipt for paid"):
        await engine.run(PAYMENT, fn)
    assert fn.count == 1
    record = await store.get(engine.idempotency_key(PAYMENT))
    assert record is not None
    assert record.status is RecordStatus.COMPLETED  # the stored result is untouched


async def test_local_cache_replays_without_store_traffic(store: PersistenceLayer) -> None:
    counting = WrapperStore(store)
    engine = engine_for(counting, use_local_cache=True, local_cache_max_items=2)
    fn = Calls([1, 2])
    await engine.run(PAYMENT, fn)
    before = counting.total
    for _ in range(5):
        assert await engine.run(PAYMENT, fn) == [1, 2]
    assert counting.total == before
    assert fn.count == 1
    # Bounded: two other payloads push the first one out.
    await engine.run({"x": 1}, fn)
    await engine.run({"x": 2}, fn)
    await engine.run(PAYMENT, fn)
    assert counting.total > before
    assert fn.count == 3


async def test_missing_key_runs_without_persistence(store: PersistenceLayer) -> None:
    counting = WrapperStore(store)
    engine = engine_for(counting, event_key_jmespath="order_id")
    fn = Calls("ran")
    with pytest.warns(UserWarning, match="No idempotency key value found"):
        assert await engine.run({"other": 1}, fn) == "ran"
    with pytest.warns(UserWarning, match="No idempotency key value found"):
        assert await engine.run({"other": 1}, fn) == "ran"
    assert fn.count == 2
    assert counting.total == 0


async def test_missing_key_raises_when_asked(store: PersistenceLayer) -> None:
    engine = engine_for(store, event_key_jmespath="order_id", raise_on_no_idempotency_key=True)
    fn = Calls()
    with pytest.raises(IdempotencyKeyError):
        await engine.run({"other": 1}, fn)
    assert fn.count == 0


@pytest.mark.parametrize("value", ["1", "true", "Yes", "on", "t", "y"])
async def test_disabled_by_environment(
    store: PersistenceLayer, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("POWERTOOLS_IDEMPOTENCY_DISABLED", value)
    counting = WrapperStore(store)
    engine = engine_for(counting)
    fn = Calls("x")
    with pytest.warns(IdempotencyDisabledWarning):
        await engine.run(PAYMENT, fn)
    with pytest.warns(IdempotencyDisabledWarning):
        await engine.run(PAYMENT, fn)
    assert fn.count == 2
    assert counting.total == 0


async def test_not_disabled_by_false_values(
    store: PersistenceLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_IDEMPOTENCY_DISABLED", "false")
    fn = Calls("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await engine_for(store).run(PAYMENT, fn)
        await engine_for(store).run(PAYMENT, fn)
    assert fn.count == 1


# -- orphans, expiry, ownership --------------------------------------------------------


async def test_orphaned_claim_is_taken_over(store: PersistenceLayer) -> None:
    engine = engine_for(store)
    key = engine.idempotency_key(PAYMENT)
    await plant(store, key, in_progress_ms=int(time.time() * 1000) - 1000)
    fn = Calls("taken over")
    assert await engine.run(PAYMENT, fn) == "taken over"
    assert fn.count == 1


async def test_expired_record_runs_again(store: PersistenceLayer) -> None:
    engine = engine_for(store)
    key = engine.idempotency_key(PAYMENT)
    await plant(store, key, status=RecordStatus.COMPLETED, expiry=int(time.time()) - 10, data=1)
    fn = Calls("fresh")
    assert await engine.run(PAYMENT, fn) == "fresh"
    assert fn.count == 1


async def test_live_claim_without_lease_is_in_progress(store: PersistenceLayer) -> None:
    engine = engine_for(store)
    await plant(store, engine.idempotency_key(PAYMENT))
    with pytest.raises(IdempotencyAlreadyInProgressError):
        await engine.run(PAYMENT, Calls())


async def test_late_completion_after_takeover_is_refused(store: PersistenceLayer) -> None:
    """Every store refuses it: a bare cache client reads before it writes."""
    engine = engine_for(store)
    key = engine.idempotency_key(PAYMENT)
    stale_owner = await plant(store, key, in_progress_ms=int(time.time() * 1000) - 1000)
    assert await engine.run(PAYMENT, Calls("new owner")) == "new owner"
    late = DataRecord(
        idempotency_key=key,
        status=RecordStatus.COMPLETED,
        expiry_timestamp=int(time.time()) + 3600,
        response_data='"stale"',
    )
    with pytest.raises(IdempotencyClaimLostError):
        await store.complete(late, owner=stale_owner)
    await store.release(key, owner=stale_owner)
    record = await store.get(key)
    assert record is not None
    assert record.response_data == '"new owner"'


async def test_running_call_whose_claim_was_taken_over_gets_an_error(
    store: PersistenceLayer,
) -> None:
    engine = engine_for(store, in_progress_lease_seconds=None)
    key = engine.idempotency_key(PAYMENT)
    started = Event()
    proceed = Event()

    async def slow() -> str:
        started.set()
        await wait_set(proceed)
        return "late"

    first = spawn(engine.run, PAYMENT, slow)
    await wait_set(started)
    # Another worker deletes the stuck record (an operator) and a new call claims it.
    assert await store.delete(key)
    assert await engine_for(store).run(PAYMENT, Calls("winner")) == "winner"
    proceed.set()
    with pytest.raises(IdempotencyClaimLostError) as caught:
        await first.result()
    assert caught.value.result == "late"
    record = await store.get(key)
    assert record is not None
    assert record.response_data == '"winner"'


# -- leases ----------------------------------------------------------------------------


async def test_lease_is_set_and_renewed_while_running(store: PersistenceLayer) -> None:
    # The engine's clock moves only when the test says: a renewal falls due when the
    # test advances it, and each lease is checked against it, however slow the store.
    counting = WrapperStore(store)
    clock = FakeClock()
    engine = engine_for(counting, clock=clock, in_progress_lease_seconds=0.3)
    key = engine.idempotency_key(PAYMENT)
    gate = Gate()
    task = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    record = await store.get(key)
    assert record is not None
    assert record.in_progress_expiry_timestamp == int((clock() + 0.3) * 1000)
    for renewals in (1, 2):
        clock.advance(0.1)  # a third of the lease: the claim falls due
        await counting.wait_returned("renew", renewals)
        renewed = await store.get(key)
        assert renewed is not None
        assert renewed.in_progress_expiry_timestamp == int((clock() + 0.3) * 1000)
        assert not renewed.is_orphaned(clock())
    assert counting.counts["renew"] == 2  # none while the clock stands still
    gate.release.set()
    assert await task.result() == "done"


async def test_a_failed_renewal_is_retried(store: PersistenceLayer) -> None:
    counting = WrapperStore(store)
    failures = iter([ConnectionError("blip")])
    counting.fail["renew"] = lambda: next(failures, None)
    clock = FakeClock()
    engine = engine_for(counting, clock=clock, in_progress_lease_seconds=1.0)
    gate = Gate()
    task = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    clock.advance(0.4)  # past a third of the lease: the claim falls due
    await counting.wait_returned("renew", 1)
    assert counting.counts["renew"] == 2  # the failed attempt, then the one that landed
    record = await store.get(engine.idempotency_key(PAYMENT))
    assert record is not None
    assert record.in_progress_expiry_timestamp == int((clock() + 1.0) * 1000)
    assert not record.is_orphaned(clock())
    gate.release.set()
    assert await task.result() == "done"


async def test_no_lease_keeps_the_reference_behaviour(store: PersistenceLayer) -> None:
    engine = engine_for(store, in_progress_lease_seconds=None)
    gate = Gate()
    task = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    record = await store.get(engine.idempotency_key(PAYMENT))
    assert record is not None
    assert record.in_progress_expiry_timestamp is None
    gate.release.set()
    await task.result()


@pytest.mark.parametrize("remaining_ms", [0, 5000])
async def test_lambda_context_bounds_the_claim(store: PersistenceLayer, remaining_ms: int) -> None:
    engine = engine_for(store)
    gate = Gate()
    before = int(time.time() * 1000)
    task = spawn(engine.run, PAYMENT, gate, lambda_context=FakeLambdaContext(remaining_ms))
    await wait_set(gate.started)
    record = await store.get(engine.idempotency_key(PAYMENT))
    assert record is not None
    assert record.in_progress_expiry_timestamp is not None
    assert before + remaining_ms <= record.in_progress_expiry_timestamp
    assert record.in_progress_expiry_timestamp <= int(time.time() * 1000) + remaining_ms
    gate.release.set()
    await task.result()


# -- engine-only rules (no store differences) ------------------------------------------


async def test_inconsistent_state_is_retried_then_raised() -> None:
    store = VanishingStore(InMemoryPersistenceLayer())
    fn = Calls()
    with pytest.raises(IdempotencyInconsistentStateError):
        await engine_for(store).run(PAYMENT, fn)
    assert store.counts["claim"] == 3
    assert fn.count == 0


async def test_two_functions_on_one_store_never_share_records() -> None:
    store = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(store)

    async def charge() -> str:
        return "charge"

    async def refund() -> str:
        return "refund"

    assert await engine.run(PAYMENT, charge) == "charge"
    assert await engine.run(PAYMENT, refund) == "refund"
    assert await engine.run(PAYMENT, charge) == "charge"
    assert len(store) == 2


async def test_lambdas_and_partials_need_a_prefix() -> None:
    import functools

    engine = IdempotencyEngine(InMemoryPersistenceLayer())

    async def pay(amount: int) -> int:
        return amount

    with pytest.raises(IdempotencyPersistenceConfigError, match="key_prefix"):
        await engine.run(PAYMENT, functools.partial(pay, 1))
    with pytest.raises(IdempotencyPersistenceConfigError, match="key_prefix"):
        await engine.run(PAYMENT, lambda: pay(1))
    named = IdempotencyEngine(InMemoryPersistenceLayer(), key_prefix="payments")
    assert await named.run(PAYMENT, lambda: pay(3)) == 3


async def test_a_failed_release_after_an_error_is_a_persistence_error() -> None:
    inner = InMemoryPersistenceLayer()
    store = WrapperStore(inner)
    store.fail["release"] = lambda: ConnectionError("store went away")

    async def declined() -> None:
        raise ValueError("declined")

    engine = engine_for(store)
    with pytest.raises(IdempotencyPersistenceLayerError) as caught:
        await engine.run(PAYMENT, declined)
    assert isinstance(caught.value.__cause__, ConnectionError)
    # The release is retried in the background until the store answers (and then no
    # retry outlives the test, logging into the next ones).
    await store.wait_calls("release", 2)
    del store.fail["release"]
    assert await engine.drain(timeout=10)
    assert len(inner) == 0


# begin async-only
# Cancellation (see test_cancellation_releases_the_claim).
async def test_a_cancellation_stays_a_cancellation_when_the_release_fails() -> None:
    inner = InMemoryPersistenceLayer()
    store = WrapperStore(inner)
    store.fail["release"] = lambda: ConnectionError("store went away")
    gate = Gate()
    engine = engine_for(store)
    task = asyncio.create_task(engine.run(PAYMENT, gate))
    await asyncio.wait_for(gate.started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The release is retried in the background until the store answers.
    await store.wait_calls("release", 2)
    assert len(inner) == 1
    del store.fail["release"]
    assert await engine.drain(timeout=10)
    assert len(inner) == 0


class SlowReleaseStore(WrapperStore):
    """Holds every release until `proceed` is set."""

    def __init__(self, inner: PersistenceLayer) -> None:
        super().__init__(inner)
        self.releasing = asyncio.Event()
        self.proceed = asyncio.Event()

    async def release(self, key: str, *, owner: str) -> None:
        self.releasing.set()
        await asyncio.wait_for(self.proceed.wait(), 10)
        await super().release(key, owner=owner)


async def test_the_release_survives_a_second_cancellation() -> None:
    inner = InMemoryPersistenceLayer()
    store = SlowReleaseStore(inner)
    engine = engine_for(store)
    gate = Gate()
    task = asyncio.create_task(engine.run(PAYMENT, gate))
    await asyncio.wait_for(gate.started.wait(), 10)
    task.cancel()
    await asyncio.wait_for(store.releasing.wait(), 10)
    task.cancel()  # cancelled again while the release is in flight
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(inner) == 1  # the release is still held
    store.proceed.set()
    await store.wait_calls("release", 1)
    assert len(inner) == 0


# end async-only


class SwallowingRenewStore(WrapperStore):
    """A renewal that swallows its cancellation, as redis-py can on Python 3.11 (in the
    sync twin: a renewal that hangs, as a sync client call cannot be interrupted)."""

    def __init__(self, inner: PersistenceLayer) -> None:
        super().__init__(inner)
        self.renewing = Event()
        self.let_go = Event()
        self.returned = Event()

    async def renew(self, record: DataRecord) -> None:
        self._record("renew", record.idempotency_key)
        self.renewing.set()
        # begin async-only
        try:
            await asyncio.wait_for(asyncio.Event().wait(), 10)
        except asyncio.CancelledError:
            await wait_set(self.let_go)  # the cancellation is lost
        # end async-only
        # sync-only: wait_set(self.let_go)  # hangs until the test lets it go
        self.returned.set()


async def test_a_renewer_that_ignores_cancellation_cannot_hang_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aioidempotency._async.lease

    monkeypatch.setattr(aioidempotency._async.lease, "STOP_TIMEOUT", 0.05)
    store = SwallowingRenewStore(InMemoryPersistenceLayer())
    engine = engine_for(store, in_progress_lease_seconds=0.03)
    gate = Gate("finished")
    task = spawn(engine.run, PAYMENT, gate)
    await wait_set(store.renewing)
    gate.release.set()
    assert await task.result(10) == "finished"
    store.let_go.set()
    await wait_set(store.returned)
    assert store.counts["renew"] == 1  # a stopped renewer does not schedule another


class HangingRenewStore(WrapperStore):
    """Holds the renewals of `key` until `let_go` is set (a request that never answers);
    the renewals of other keys go through, and are recorded."""

    def __init__(self, inner: PersistenceLayer) -> None:
        super().__init__(inner)
        self.key = ""
        self.hanging = Event()
        self.let_go = Event()

    async def renew(self, record: DataRecord) -> None:
        if record.idempotency_key == self.key:
            self.hanging.set()
            await wait_set(self.let_go)
        await super().renew(record)


async def test_a_hung_renewal_holds_up_no_other_claim() -> None:
    """Each claim is renewed on its own: while one renewal hangs, the other claims of
    the engine are still renewed (else their leases would lapse and a duplicate run)."""
    inner = InMemoryPersistenceLayer()
    store = HangingRenewStore(inner)
    clock = FakeClock()
    engine = engine_for(store, clock=clock, in_progress_lease_seconds=0.3)
    store.key = engine.idempotency_key({"n": "a"})
    first, second = Gate("a"), Gate("b")
    hung = spawn(engine.run, {"n": "a"}, first)
    await wait_set(first.started)
    clock.advance(0.1)  # the first claim falls due: its renewal hangs
    await wait_set(store.hanging)
    other = spawn(engine.run, {"n": "b"}, second)
    await wait_set(second.started)
    for renewals in (1, 2):  # the second claim, renewed twice: past its first lease
        clock.advance(0.2)
        await store.wait_returned("renew", renewals)
    record = await inner.get(engine.idempotency_key({"n": "b"}))
    assert record is not None
    assert not record.is_orphaned(clock())
    assert {call.key for call in store.calls if call.method == "renew"} == {
        engine.idempotency_key({"n": "b"})
    }
    second.release.set()
    assert await other.result() == "b"
    store.let_go.set()
    first.release.set()
    assert await hung.result() == "a"


async def test_a_result_over_the_store_limit_is_refused_and_released() -> None:
    store = InMemoryPersistenceLayer(max_result_bytes=64)
    engine = engine_for(store)
    big = {"blob": "x" * 100}
    with pytest.raises(IdempotencyResultTooLargeError) as caught:
        await engine.run(PAYMENT, Calls(big))
    assert caught.value.result is big
    assert caught.value.limit == 64
    assert caught.value.size > 64
    assert len(store) == 0
    assert await engine.run(PAYMENT, Calls("small")) == "small"


async def test_every_concurrent_claim_is_renewed(store: PersistenceLayer) -> None:
    counting = WrapperStore(store)
    clock = FakeClock()
    engine = engine_for(counting, clock=clock, in_progress_lease_seconds=1.0)
    gates = [Gate(n) for n in range(10)]
    tasks = [spawn(engine.run, {"n": n}, gate) for n, gate in enumerate(gates)]
    for gate in gates:
        await wait_set(gate.started)
    keys = [engine.idempotency_key({"n": n}) for n in range(10)]
    first = [await store.get(key) for key in keys]
    clock.advance(0.4)  # past a third of the lease: every claim falls due at once
    await counting.wait_returned("renew", 10)
    assert {call.key for call in counting.calls if call.method == "renew"} == set(keys)
    assert counting.counts["renew"] == 10
    for key, record in zip(keys, first, strict=True):
        now = await store.get(key)
        assert record is not None
        history = [call.method for call in counting.calls if call.key == key]
        assert now is not None, f"{key} vanished after {record!r}; its calls: {history}"
        assert record.in_progress_expiry_timestamp == int((clock() - 0.4 + 1.0) * 1000)
        assert now.in_progress_expiry_timestamp == int((clock() + 1.0) * 1000)
    for gate in gates:
        gate.release.set()
    assert await gather(*tasks) == list(range(10))
