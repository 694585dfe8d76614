"""Events and log lines: one per decision of the engine, run against every store backend.

tools/unasync.py generates the sync engine's twin of this module, tests/sync/test_events.py
(see tests/test_engine.py for how). Every test asserts the event kinds, keys and round
trips of a decision, and the log record that goes with each one. The engine runs on a
clock of the test's (`Clock`): durations are exact and nothing sleeps to let time pass;
a `SlowStore` moves that clock during each store operation, so round trips have exact
durations too.

`SECRET` is in every payload, result and exception message of the tests: it must never
appear in an event or a log record.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import pytest

from aioidempotency import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyCompletionError,
    IdempotencyConfig,
    IdempotencyEngine,
    IdempotencyKeyError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceLayerError,
    IdempotencySerializationError,
    IdempotencyValidationError,
)
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.events import (
    LOG_FIELDS,
    CallOutcome,
    EventKind,
    EventListener,
    IdempotencyEvent,
    RoundTrip,
    listen,
)
from aioidempotency.persistence import ClaimResult, PersistenceLayer

from .concurrency import Event, spawn, wait_set
from .helpers import WrapperStore

SECRET = "s3cr3t-4242-pii"
PAYMENT = {"payment_id": "p-1", "amount": 100, "card": SECRET}
RESULT = {"status": "paid", "card": SECRET}
PREFIX = "test-events"


class Clock:
    """The engine's clock: real time when the test starts, moved only by `advance`."""

    def __init__(self) -> None:
        self.now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class Recorder:
    """An event listener keeping every event; `arrived(kind)` is set once one came."""

    def __init__(self) -> None:
        self.events: list[IdempotencyEvent] = []  # appended to: safe from any thread
        self._arrived: dict[EventKind, Any] = {kind: Event() for kind in EventKind}

    def __call__(self, event: IdempotencyEvent) -> None:
        self.events.append(event)
        self._arrived[event.kind].set()

    def arrived(self, kind: EventKind) -> Any:
        return self._arrived[kind]

    def kinds(self, key: str | None = None) -> list[EventKind]:
        return [e.kind for e in self.events if key is None or e.key == key]

    def one(self, kind: EventKind) -> IdempotencyEvent:
        [event] = [e for e in self.events if e.kind is kind]
        return event


class Calls:
    """A function that counts its executions, moves the clock, and returns `result`."""

    def __init__(self, clock: Clock, result: Any = RESULT, takes: float = 0.25) -> None:
        self.clock = clock
        self.result = result
        self.takes = takes
        self.count = 0

    async def __call__(self) -> Any:
        self.count += 1
        self.clock.advance(self.takes)
        return self.result


class Gate:
    """A function that blocks until released, to hold a claim open."""

    def __init__(self, result: Any = RESULT) -> None:
        self.started = Event()
        self.release = Event()
        self.result = result

    async def __call__(self) -> Any:
        self.started.set()
        await wait_set(self.release)
        return self.result


class Declined(Exception):
    """What the function raises; its message holds the secret."""


def engine_for(
    store: PersistenceLayer, clock: Clock, listener: EventListener | None = None, **config: Any
) -> IdempotencyEngine:
    return IdempotencyEngine(
        store, IdempotencyConfig(on_event=listener, **config), key_prefix=PREFIX, clock=clock
    )


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The `IdempotencyEvent.store` the backend of the `store` fixture reports."""
    backend: str = request.node.callspec.params["store"]
    if backend == "memory":
        return "memory"
    if backend.startswith("dynamodb"):
        return "dynamodb"
    return "glide" if "glide" in backend else "redis"


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """`caplog` with DEBUG on for aioidempotency's loggers."""
    caplog.set_level(logging.DEBUG, logger="aioidempotency")
    return caplog


def field(record: logging.LogRecord, name: str) -> Any:
    """An ``extra`` attribute of `record`."""
    return getattr(record, name)


def decisions(caplog: pytest.LogCaptureFixture, key: str | None = None) -> list[logging.LogRecord]:
    """The log records of decisions (about `key`, if given), in order."""
    return [
        r
        for r in caplog.records
        if hasattr(r, "idempotency_decision")
        and (key is None or field(r, "idempotency_key") == key)
    ]


def assert_logged(
    record: logging.LogRecord,
    event: IdempotencyEvent,
    *,
    level: int = logging.DEBUG,
    logger: str = "aioidempotency.engine",
) -> None:
    """`record` is `event`'s line: its level, logger, message and extra fields."""
    assert record.name == logger
    assert record.levelno == level
    assert record.getMessage().startswith(f"{event.kind.value} {event.key}")
    fields = {name: getattr(record, name) for name in LOG_FIELDS}
    assert fields == {
        "idempotency_decision": event.kind.value,
        "idempotency_key": event.key,
        "idempotency_prefix": event.prefix,
        "duration_ms": None if event.duration is None else round(event.duration * 1000, 3),
        "idempotency_outcome": None if event.outcome is None else event.outcome.value,
        "idempotency_store": event.store,
        "idempotency_round_trips": event.round_trips,
        "idempotency_error": event.error,
        "idempotency_call_id": event.call_id,
    }


def assert_no_secret(recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    """Neither an event nor a log record (message or extra field) holds `SECRET`."""
    for event in recorder.events:
        assert SECRET not in repr(event)
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(vars(record)), record.getMessage()
    assert SECRET not in caplog.text  # tracebacks included


class SlowStore(WrapperStore):
    """A store whose operations take `takes[method]` seconds of the test's clock."""

    def __init__(self, inner: PersistenceLayer, clock: Clock, **takes: float) -> None:
        super().__init__(inner)
        self.clock = clock
        self.takes = takes

    def _record(self, method: str, key: str) -> None:
        self.clock.advance(self.takes.get(method, 0.0))
        super()._record(method, key)


def trips_of(events: list[IdempotencyEvent]) -> list[RoundTrip]:
    """Every round trip of `events`, in order."""
    return [trip for event in events for trip in event.trips]


def assert_trip(
    trip: RoundTrip, operation: str, start: float, duration: float, error: str | None = None
) -> None:
    assert trip.operation == operation
    assert trip.start == pytest.approx(start, abs=1e-6)
    assert trip.duration == pytest.approx(duration, abs=1e-6)
    assert trip.error == error


# -- a first call, a replay, a cache hit -----------------------------------------------


async def test_a_first_call_is_claimed_then_completed(
    store: PersistenceLayer, store_kind: str, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder)
    key = engine.idempotency_key(PAYMENT)
    assert await engine.run(PAYMENT, Calls(clock)) == RESULT
    claimed, completed = recorder.events
    assert (claimed.kind, completed.kind) == (EventKind.CLAIMED, EventKind.COMPLETED)
    assert {claimed.key, completed.key} == {key}
    assert {claimed.prefix, completed.prefix} == {PREFIX}
    assert {claimed.store, completed.store} == {store_kind}
    assert (claimed.round_trips, completed.round_trips) == (1, 2)
    assert (claimed.outcome, completed.outcome) == (None, CallOutcome.EXECUTED)
    assert claimed.duration == 0.0
    assert completed.duration == pytest.approx(0.25)
    assert claimed.call_id == completed.call_id is not None
    assert not claimed.final
    assert completed.final
    logged = decisions(caplog_debug, key)
    assert len(logged) == 2
    assert_logged(logged[0], claimed)
    assert_logged(logged[1], completed)
    assert "executed" in logged[1].getMessage()
    assert [trip.operation for trip in claimed.trips] == ["claim"]
    assert [trip.operation for trip in completed.trips] == ["complete"]
    assert_no_secret(recorder, caplog_debug)


async def test_each_round_trip_is_timed_on_the_next_event(store: PersistenceLayer) -> None:
    clock, recorder = Clock(), Recorder()
    slow = SlowStore(store, clock, claim=0.003, complete=0.005)
    engine = engine_for(slow, clock, recorder)
    assert await engine.run(PAYMENT, Calls(clock)) == RESULT
    claimed, completed = recorder.events
    [claim] = claimed.trips
    assert_trip(claim, "claim", 0.0, 0.003)
    assert claimed.duration == pytest.approx(0.003, abs=1e-6)  # epoch floats: 1e-7 apart
    [complete] = completed.trips
    assert_trip(complete, "complete", 0.003 + 0.25, 0.005)  # after the function's 0.25 s
    assert completed.duration == pytest.approx(0.258, abs=1e-6)
    assert len(trips_of(recorder.events)) == completed.round_trips == 2
    with pytest.raises(AttributeError):
        claim.duration = 0.0  # type: ignore[misc]
    # A replay from the store: one claim, answered with the completed record.
    recorder.events.clear()
    assert await engine_for(slow, clock, recorder).run(PAYMENT, Calls(clock)) == RESULT
    [replayed] = recorder.events
    [claim] = replayed.trips
    assert_trip(claim, "claim", 0.0, 0.003)


async def test_a_failed_round_trip_names_the_stores_exception(store: PersistenceLayer) -> None:
    clock, recorder = Clock(), Recorder()
    failing = SlowStore(store, clock, claim=0.002)
    failing.fail["claim"] = lambda: ConnectionError(f"refused {SECRET}")
    engine = engine_for(failing, clock, recorder)
    with pytest.raises(IdempotencyPersistenceLayerError):
        await engine.run(PAYMENT, Calls(clock))
    [failed] = recorder.events
    assert failed.error == "IdempotencyPersistenceLayerError"  # what the caller sees
    [claim] = failed.trips
    assert_trip(claim, "claim", 0.0, 0.002, "ConnectionError")  # what the store raised
    assert await engine.drain()
    assert SECRET not in repr(failed)


async def test_a_duplicate_replays_from_the_store(
    store: PersistenceLayer, store_kind: str, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    await engine_for(store, clock).run(PAYMENT, Calls(clock))
    engine = engine_for(store, clock, recorder)  # another process
    caplog_debug.clear()
    assert await engine.run(PAYMENT, Calls(clock)) == RESULT
    [replayed] = recorder.events
    assert replayed.kind is EventKind.REPLAYED
    assert replayed.key == engine.idempotency_key(PAYMENT)
    assert replayed.store == store_kind
    assert replayed.round_trips == 1
    assert replayed.outcome is CallOutcome.REPLAYED
    assert replayed.duration == 0.0
    [logged] = decisions(caplog_debug)
    assert_logged(logged, replayed)
    assert_no_secret(recorder, caplog_debug)


async def test_a_cache_hit_costs_no_round_trip(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder, use_local_cache=True)
    await engine.run(PAYMENT, Calls(clock))
    caplog_debug.clear()
    assert await engine.run(PAYMENT, Calls(clock)) == RESULT
    hit = recorder.events[-1]
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.COMPLETED, EventKind.CACHE_HIT]
    assert hit.round_trips == 0
    assert hit.trips == ()
    assert hit.outcome is CallOutcome.REPLAYED
    assert hit.key == engine.idempotency_key(PAYMENT)
    [logged] = decisions(caplog_debug)
    assert_logged(logged, hit)


# -- refusals --------------------------------------------------------------------------


async def test_a_duplicate_in_progress_elsewhere_is_refused(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    gate = Gate()
    first = spawn(engine_for(store, clock).run, PAYMENT, gate)
    await wait_set(gate.started)
    engine = engine_for(store, clock, recorder)
    with pytest.raises(IdempotencyAlreadyInProgressError):
        await engine.run(PAYMENT, Calls(clock))
    [refused] = recorder.events
    assert refused.kind is EventKind.IN_PROGRESS
    assert refused.key == engine.idempotency_key(PAYMENT)
    assert refused.outcome is CallOutcome.REFUSED
    assert refused.round_trips == 1
    logged = [
        r for r in decisions(caplog_debug) if field(r, "idempotency_decision") == "in_progress"
    ]
    assert len(logged) == 1
    assert_logged(logged[0], refused)
    assert "another call holds the key" in logged[0].getMessage()
    gate.release.set()
    assert await first.result() == RESULT
    assert_no_secret(recorder, caplog_debug)


async def test_a_duplicate_in_process_is_refused_without_a_round_trip(
    store: PersistenceLayer,
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder)
    gate = Gate()
    first = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    with pytest.raises(IdempotencyAlreadyInProgressError):
        await engine.run(PAYMENT, Calls(clock))
    gate.release.set()
    await first.result()
    refused = recorder.one(EventKind.IN_PROGRESS)
    assert refused.key == engine.idempotency_key(PAYMENT)
    assert refused.round_trips == 0
    assert refused.outcome is CallOutcome.REFUSED
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.IN_PROGRESS, EventKind.COMPLETED]


async def test_another_payload_under_the_key_is_a_mismatch(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    config: dict[str, Any] = {
        "event_key_jmespath": "payment_id",
        "payload_validation_jmespath": "amount",
    }
    await engine_for(store, clock, **config).run(PAYMENT, Calls(clock))
    engine = engine_for(store, clock, recorder, **config)
    caplog_debug.clear()
    with pytest.raises(IdempotencyValidationError):
        await engine.run({**PAYMENT, "amount": 1}, Calls(clock))
    [mismatch] = recorder.events
    assert mismatch.kind is EventKind.PAYLOAD_MISMATCH
    assert mismatch.outcome is CallOutcome.REFUSED
    assert mismatch.error == "IdempotencyValidationError"
    assert mismatch.round_trips == 1
    [logged] = decisions(caplog_debug)
    assert_logged(logged, mismatch)
    assert_no_secret(recorder, caplog_debug)


# -- waiting ---------------------------------------------------------------------------


async def test_a_waiting_duplicate_in_process_shares_the_result(store: PersistenceLayer) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder, wait_for_in_progress_seconds=30)
    gate = Gate()
    first = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    joined = spawn(engine.run, PAYMENT, Calls(clock))
    await wait_set(recorder.arrived(EventKind.CLAIMED))
    gate.release.set()
    assert await joined.result() == await first.result() == RESULT
    waited = recorder.one(EventKind.WAITED)
    assert waited.outcome is CallOutcome.REPLAYED
    assert waited.round_trips == 0
    assert sorted(e.kind.value for e in recorder.events) == ["claimed", "completed", "waited"]


async def test_a_waiting_duplicate_elsewhere_polls_then_replays(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    gate = Gate()
    first = spawn(engine_for(store, clock).run, PAYMENT, gate)
    await wait_set(gate.started)
    counting = WrapperStore(store)
    engine = engine_for(
        counting, clock, recorder, wait_for_in_progress_seconds=30, wait_poll_interval_seconds=0.01
    )
    waiter = spawn(engine.run, PAYMENT, Calls(clock))
    await counting.wait_calls("get", 1)  # it polls
    gate.release.set()
    assert await waiter.result() == RESULT
    await first.result()
    [waited] = [e for e in recorder.events]
    assert waited.kind is EventKind.WAITED
    assert waited.outcome is CallOutcome.REPLAYED
    assert waited.round_trips == counting.total  # a claim and every poll
    assert waited.round_trips >= 2
    operations = [trip.operation for trip in waited.trips]
    assert operations == ["claim"] + ["get"] * counting.counts["get"]
    assert [trip.error for trip in waited.trips] == [None] * len(operations)
    [logged] = [r for r in decisions(caplog_debug) if field(r, "idempotency_decision") == "waited"]
    assert_logged(logged, waited)


class AdvancingStore(WrapperStore):
    """Moves `clock` by `seconds` after the first claim it answers (time passing
    between a refused claim and what the engine does next)."""

    def __init__(self, inner: PersistenceLayer, clock: Clock, seconds: float) -> None:
        super().__init__(inner)
        self.clock = clock
        self.seconds = seconds

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        result = await super().claim(record, now=now)
        if self.counts["claim"] == 1:
            self.clock.advance(self.seconds)
        return result


async def plant(
    store: PersistenceLayer, key: str, clock: Clock, *, status: RecordStatus, lasts: float
) -> None:
    """A record of another caller: in progress until `lasts` seconds from now, or
    completed and expiring then."""
    now = clock()
    owner = uuid.uuid4().hex
    claim = DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(now) + (3600 if status is RecordStatus.INPROGRESS else int(lasts)),
        in_progress_expiry_timestamp=int((now + lasts) * 1000),
        owner=owner,
    )
    assert (await store.claim(claim, now=now)).claimed
    if status is RecordStatus.COMPLETED:
        done = DataRecord(
            idempotency_key=key,
            status=RecordStatus.COMPLETED,
            expiry_timestamp=claim.expiry_timestamp,
            response_data='"old"',
        )
        await store.complete(done, owner=owner)


@pytest.mark.parametrize(
    ("status", "level", "detail"),
    [
        (RecordStatus.INPROGRESS, logging.WARNING, "the claim was orphaned"),
        (RecordStatus.COMPLETED, logging.DEBUG, "the record had expired"),
    ],
    ids=["orphaned", "expired"],
)
async def test_a_claim_over_a_record_seen_free_is_a_takeover(
    store: PersistenceLayer,
    caplog_debug: pytest.LogCaptureFixture,
    status: RecordStatus,
    level: int,
    detail: str,
) -> None:
    clock, recorder = Clock(), Recorder()
    advancing = AdvancingStore(store, clock, 20)  # past the planted record's end
    engine = engine_for(
        advancing, clock, recorder, wait_for_in_progress_seconds=60, wait_poll_interval_seconds=0.01
    )
    key = engine.idempotency_key(PAYMENT)
    await plant(store, key, clock, status=status, lasts=10)
    assert await engine.run(PAYMENT, Calls(clock, "fresh")) == "fresh"
    kinds = recorder.kinds()
    assert kinds[-2:] == [EventKind.TAKEN_OVER, EventKind.COMPLETED]
    taken = recorder.one(EventKind.TAKEN_OVER)
    assert taken.outcome is None
    assert taken.round_trips == advancing.counts["claim"] + advancing.counts["get"]
    [logged] = [
        r for r in decisions(caplog_debug) if field(r, "idempotency_decision") == "taken_over"
    ]
    assert_logged(logged, taken, level=level)
    assert detail in logged.getMessage()


async def test_a_durable_replay_resumes_its_own_claim(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder)
    key = engine.idempotency_key(PAYMENT)
    await plant(store, key, clock, status=RecordStatus.INPROGRESS, lasts=60)  # its first run
    fn = Calls(clock)
    assert await engine.run_for(PAYMENT, fn, key_source=fn, durable_replay=True) == RESULT
    assert recorder.kinds() == [EventKind.RESUMED, EventKind.COMPLETED]
    resumed = recorder.events[0]
    assert resumed.key == key
    assert resumed.round_trips == 1
    assert resumed.outcome is None
    logged = decisions(caplog_debug, key)
    assert [field(r, "idempotency_decision") for r in logged] == ["resumed", "completed"]
    assert_logged(logged[0], resumed)


def joined(engine: IdempotencyEngine) -> Any:
    """An event set once a call of `engine` joins a running call of this process."""
    done = Event()
    join = engine._flights.join

    async def joining(flight: Any, timeout: float) -> Any:
        done.set()
        return await join(flight, timeout)

    engine._flights.join = joining  # type: ignore[method-assign]
    return done


async def test_a_duplicate_in_process_claims_the_key_its_running_call_released(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder, wait_for_in_progress_seconds=30)
    started, fail = Event(), Event()

    async def declined() -> None:
        started.set()
        await wait_set(fail)
        raise Declined(f"card {SECRET} declined")

    first = spawn(engine.run, PAYMENT, declined)
    await wait_set(started)
    joining = joined(engine)
    second = spawn(engine.run, PAYMENT, Calls(clock, "second"))
    await wait_set(joining)
    fail.set()
    with pytest.raises(Declined):
        await first.result()
    assert await second.result() == "second"
    assert recorder.kinds() == [
        EventKind.CLAIMED,
        EventKind.RELEASED,
        EventKind.WAITED,
        EventKind.CLAIMED,
        EventKind.COMPLETED,
    ]
    waited = recorder.events[2]
    assert waited.outcome is None  # the call goes on: it claims the key
    assert waited.round_trips == 0
    assert waited.call_id == recorder.events[-1].call_id != recorder.events[0].call_id
    [logged] = [r for r in decisions(caplog_debug) if field(r, "idempotency_decision") == "waited"]
    assert_logged(logged, waited)
    assert "the running call released it" in logged.getMessage()
    assert_no_secret(recorder, caplog_debug)


class LateReads(WrapperStore):
    """Moves `clock` by `seconds` after the first read that finds a record of `status`
    (time passing between a waiter's read and its look at the record)."""

    def __init__(
        self, inner: PersistenceLayer, clock: Clock, status: RecordStatus, seconds: float
    ) -> None:
        super().__init__(inner)
        self.clock = clock
        self.status = status
        self.seconds = seconds
        self.moved = False

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        record = await super().get(key, now=now)
        if not self.moved and record is not None and record.status is self.status:
            self.moved = True
            self.clock.advance(self.seconds)
        return record


def waiter_for(store: PersistenceLayer, clock: Clock, recorder: Recorder) -> IdempotencyEngine:
    return engine_for(
        store, clock, recorder, wait_for_in_progress_seconds=60, wait_poll_interval_seconds=0.01
    )


def assert_waited_then_claimed(
    recorder: Recorder, caplog: pytest.LogCaptureFixture, claimed: EventKind, detail: str
) -> None:
    """The waiter's events: a wait that ended with the key free (`detail` logged), then
    its own claim (`claimed`) and completion."""
    assert recorder.kinds() == [EventKind.WAITED, claimed, EventKind.COMPLETED]
    waited = recorder.events[0]
    assert waited.outcome is None
    assert [trip.operation for trip in waited.trips][:2] == ["claim", "get"]
    [logged] = [r for r in decisions(caplog) if field(r, "idempotency_decision") == "waited"]
    assert_logged(logged, waited)
    assert f": {detail} (" in logged.getMessage()


async def test_a_waiting_duplicate_elsewhere_claims_a_released_key(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    started, fail = Event(), Event()

    async def declined() -> None:
        started.set()
        await wait_set(fail)
        raise Declined("declined")

    first = spawn(engine_for(store, clock).run, PAYMENT, declined)
    await wait_set(started)
    counting = WrapperStore(store)
    waiter = spawn(waiter_for(counting, clock, recorder).run, PAYMENT, Calls(clock, "second"))
    await counting.wait_calls("get", 1)  # it polls
    fail.set()
    with pytest.raises(Declined):
        await first.result()
    assert await waiter.result() == "second"
    assert_waited_then_claimed(recorder, caplog_debug, EventKind.CLAIMED, "the key was released")


async def test_a_waiting_duplicate_elsewhere_takes_over_a_claim_orphaned_meanwhile(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    late = LateReads(store, clock, RecordStatus.INPROGRESS, 20)  # past the claim's lease
    engine = waiter_for(late, clock, recorder)
    await plant(
        store, engine.idempotency_key(PAYMENT), clock, status=RecordStatus.INPROGRESS, lasts=10
    )
    assert await engine.run(PAYMENT, Calls(clock, "fresh")) == "fresh"
    assert_waited_then_claimed(
        recorder, caplog_debug, EventKind.TAKEN_OVER, "the claim was orphaned"
    )


async def test_a_waiting_duplicate_elsewhere_takes_over_a_result_that_expired_meanwhile(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    gate = Gate()
    first = spawn(engine_for(store, clock, expires_after_seconds=10).run, PAYMENT, gate)
    await wait_set(gate.started)
    late = LateReads(store, clock, RecordStatus.COMPLETED, 20)  # past the result's expiry
    waiter = spawn(waiter_for(late, clock, recorder).run, PAYMENT, Calls(clock, "fresh"))
    await late.wait_calls("get", 1)  # it polls
    gate.release.set()
    assert await first.result() == RESULT
    assert await waiter.result() == "fresh"
    assert_waited_then_claimed(recorder, caplog_debug, EventKind.TAKEN_OVER, "the record expired")


class HeldReads(WrapperStore):
    """Holds every read until `proceed` is set (a reply that comes late); `reading` is
    set once a read is held."""

    def __init__(self, inner: PersistenceLayer) -> None:
        super().__init__(inner)
        self.reading = Event()
        self.proceed = Event()

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        self.reading.set()
        await wait_set(self.proceed)
        return await super().get(key, now=now)


async def test_a_waiter_whose_wait_ran_out_is_refused_by_a_call_of_this_process(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    """The key passed from a call elsewhere to a call of this process while the waiter's
    read was in flight, and the wait ran out meanwhile: it does not join the new call."""
    clock, recorder = Clock(), Recorder()
    started, fail = Event(), Event()

    async def declined() -> None:
        started.set()
        await wait_set(fail)
        raise Declined("declined")

    elsewhere = spawn(engine_for(store, clock).run, PAYMENT, declined)
    await wait_set(started)
    held = HeldReads(store)
    engine = engine_for(
        held, clock, recorder, wait_for_in_progress_seconds=30, wait_poll_interval_seconds=0.01
    )
    waiter = spawn(engine.run, PAYMENT, Calls(clock, "never"))
    await wait_set(held.reading)
    fail.set()
    with pytest.raises(Declined):
        await elsewhere.result()
    gate = Gate()
    local = spawn(engine.run, PAYMENT, gate)  # claims the freed key
    await wait_set(gate.started)
    clock.advance(31)  # past the waiter's bound
    held.proceed.set()
    with pytest.raises(IdempotencyAlreadyInProgressError):
        await waiter.result()
    refused = recorder.one(EventKind.IN_PROGRESS)
    assert refused.outcome is CallOutcome.REFUSED
    [logged] = [
        r for r in decisions(caplog_debug) if field(r, "idempotency_decision") == "in_progress"
    ]
    assert_logged(logged, refused)
    assert "a call of this process still holds the key" in logged.getMessage()
    gate.release.set()
    assert await local.result() == RESULT


async def test_a_replay_whose_response_hook_raises_is_a_failed_replay(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()

    def hook(response: Any, record: DataRecord) -> Any:
        raise LookupError(f"no receipt for {SECRET}")

    engine = engine_for(store, clock, recorder, response_hook=hook)
    fn = Calls(clock)
    assert await engine.run(PAYMENT, fn) == RESULT  # a first call is no replay
    with pytest.raises(LookupError, match="no receipt"):
        await engine.run(PAYMENT, fn)
    assert fn.count == 1
    replayed = recorder.events[-1]
    assert replayed.kind is EventKind.REPLAYED
    assert replayed.outcome is CallOutcome.ERROR
    assert replayed.error == "LookupError"
    assert replayed.round_trips == 1
    assert_logged(decisions(caplog_debug)[-1], replayed)
    assert_no_secret(recorder, caplog_debug)


# -- failures ----------------------------------------------------------------------------


async def test_a_function_that_raises_releases_the_claim(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder)

    async def declined() -> None:
        clock.advance(0.5)
        raise Declined(f"card {SECRET} declined")

    with pytest.raises(Declined):
        await engine.run(PAYMENT, declined)
    claimed, released = recorder.events
    assert claimed.kind is EventKind.CLAIMED
    assert released.kind is EventKind.RELEASED
    assert released.outcome is CallOutcome.FAILED
    assert released.error == "Declined"
    assert released.round_trips == 2
    assert released.duration == pytest.approx(0.5)
    assert_logged(decisions(caplog_debug)[-1], released)
    assert_no_secret(recorder, caplog_debug)


async def test_a_result_that_cannot_be_stored_releases_the_claim(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder)
    with pytest.raises(IdempotencySerializationError):
        await engine.run(PAYMENT, Calls(clock, {"card": SECRET, "at": object()}))
    released = recorder.events[-1]
    assert released.kind is EventKind.RELEASED
    assert released.outcome is CallOutcome.NOT_STORED
    assert released.error == "IdempotencySerializationError"
    assert_logged(decisions(caplog_debug)[-1], released)
    assert_no_secret(recorder, caplog_debug)


async def test_a_claim_taken_over_while_running_is_lost(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder, in_progress_lease_seconds=None)
    key = engine.idempotency_key(PAYMENT)
    gate = Gate()
    first = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    assert await store.delete(key)  # an operator frees the stuck key; another call claims it
    assert await engine_for(store, clock).run(PAYMENT, Calls(clock, "winner")) == "winner"
    gate.release.set()
    with pytest.raises(IdempotencyClaimLostError):
        await first.result()
    lost = recorder.events[-1]
    assert lost.kind is EventKind.CLAIM_LOST
    assert lost.outcome is CallOutcome.NOT_STORED
    assert lost.error == "IdempotencyClaimLostError"
    assert lost.round_trips == 2
    [logged] = [r for r in decisions(caplog_debug, key) if r.levelno == logging.WARNING]
    assert_logged(logged, lost, level=logging.WARNING)
    assert_no_secret(recorder, caplog_debug)


async def test_a_store_error_is_a_warning(
    store: PersistenceLayer, caplog: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    failing = WrapperStore(store)
    failing.fail["claim"] = lambda: ConnectionError("connection refused")
    engine = engine_for(failing, clock, recorder)
    with (
        caplog.at_level(logging.WARNING, logger="aioidempotency"),
        pytest.raises(IdempotencyPersistenceLayerError),
    ):
        await engine.run(PAYMENT, Calls(clock))
    [failed] = recorder.events
    assert failed.kind is EventKind.STORE_ERROR
    assert failed.outcome is CallOutcome.ERROR
    assert failed.error == "IdempotencyPersistenceLayerError"
    assert failed.round_trips == 1
    [logged] = decisions(caplog)
    assert_logged(logged, failed, level=logging.WARNING)
    assert "the claim failed" in logged.getMessage()
    assert "connection refused" in logged.getMessage()  # the store's own words
    await engine.drain()  # the release sent in case the claim landed
    assert_no_secret(recorder, caplog)


async def test_a_failed_completion_is_stored_in_the_background(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    failing = WrapperStore(store)
    failures = iter([ConnectionError("connection reset")])
    failing.fail["complete"] = lambda: next(failures, None)
    engine = engine_for(failing, clock, recorder)
    with pytest.raises(IdempotencyCompletionError):
        await engine.run(PAYMENT, Calls(clock))
    assert await engine.drain(10)
    kinds = recorder.kinds()
    assert kinds == [EventKind.CLAIMED, EventKind.STORE_ERROR, EventKind.COMPLETED]
    failed, late = recorder.events[1:]
    assert failed.outcome is CallOutcome.NOT_STORED
    assert failed.error == "IdempotencyCompletionError"
    assert late.outcome is None  # after the call's end
    assert late.round_trips == 3
    assert late.call_id == failed.call_id
    assert [(t.operation, t.error) for t in failed.trips] == [("complete", "ConnectionError")]
    assert [(t.operation, t.error) for t in late.trips] == [("complete", None)]
    logged = decisions(caplog_debug)
    assert [r.levelno for r in logged] == [logging.DEBUG, logging.WARNING, logging.DEBUG]
    assert_logged(logged[1], failed, level=logging.WARNING)
    assert_logged(logged[2], late)
    assert "stored in the background" in logged[2].getMessage()


async def test_a_failed_release_is_retried_in_the_background_and_reported(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    failing = WrapperStore(store)
    failures = iter([ConnectionError("connection reset")])
    failing.fail["release"] = lambda: next(failures, None)
    engine = engine_for(failing, clock, recorder)

    async def declined() -> None:
        raise Declined(f"card {SECRET} declined")

    with pytest.raises(IdempotencyPersistenceLayerError):  # the release failed
        await engine.run(PAYMENT, declined)
    assert await engine.drain(10)
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.STORE_ERROR, EventKind.RELEASED]
    failed, late = recorder.events[1:]
    assert failed.outcome is CallOutcome.FAILED
    assert late.outcome is None  # after the call's end
    assert late.call_id == failed.call_id
    assert [(t.operation, t.error) for t in failed.trips] == [("release", "ConnectionError")]
    assert [(t.operation, t.error) for t in late.trips] == [("release", None)]
    logged = decisions(caplog_debug)
    assert [r.levelno for r in logged] == [logging.DEBUG, logging.WARNING, logging.DEBUG]
    assert_logged(logged[2], late)
    assert "released in the background" in logged[2].getMessage()
    assert_no_secret(recorder, caplog_debug)
    # the key is free again: the next call runs
    calls = Calls(clock)
    assert await engine.run(PAYMENT, calls) == RESULT
    assert calls.count == 1


# -- leases ----------------------------------------------------------------------------


async def test_a_lease_renewal_is_a_decision_of_the_call(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder, in_progress_lease_seconds=0.3)
    gate = Gate()
    task = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    clock.advance(0.2)  # past a third of the lease: due
    await wait_set(recorder.arrived(EventKind.LEASE_RENEWED))
    gate.release.set()
    assert await task.result() == RESULT
    renewed = recorder.events[1]
    assert renewed.kind is EventKind.LEASE_RENEWED
    assert renewed.round_trips == 2
    assert renewed.outcome is None
    assert renewed.duration == pytest.approx(0.2)
    [renewal] = renewed.trips  # timed in the lease keeper's task or thread
    assert_trip(renewal, "renew", 0.2, 0.0)
    assert recorder.events[-1].kind is EventKind.COMPLETED
    assert [trip.operation for trip in recorder.events[-1].trips] == ["complete"]
    [logged] = [
        r for r in decisions(caplog_debug) if field(r, "idempotency_decision") == "lease_renewed"
    ]
    assert_logged(logged, renewed, logger="aioidempotency.lease")


async def test_a_lease_lost_is_a_warning_and_the_result_is_not_stored(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder, in_progress_lease_seconds=0.3)
    key = engine.idempotency_key(PAYMENT)
    gate = Gate()
    task = spawn(engine.run, PAYMENT, gate)
    await wait_set(gate.started)
    assert await store.delete(key)  # then another caller claims it
    assert await engine_for(store, clock).run(PAYMENT, Calls(clock, "winner")) == "winner"
    clock.advance(0.2)
    await wait_set(recorder.arrived(EventKind.LEASE_LOST))
    gate.release.set()
    with pytest.raises(IdempotencyClaimLostError):
        await task.result()
    assert recorder.kinds(key) == [
        EventKind.CLAIMED,
        EventKind.LEASE_LOST,
        EventKind.CLAIM_LOST,
    ]
    lost = recorder.one(EventKind.LEASE_LOST)
    assert lost.error == "IdempotencyClaimLostError"
    assert lost.round_trips == 2
    warnings = [r for r in decisions(caplog_debug, key) if r.levelno == logging.WARNING]
    assert [field(r, "idempotency_decision") for r in warnings] == ["lease_lost", "claim_lost"]
    assert_logged(warnings[0], lost, level=logging.WARNING, logger="aioidempotency.lease")


# -- no key, disabled --------------------------------------------------------------------


async def test_a_payload_without_a_key_runs_unprotected(
    store: PersistenceLayer, caplog_debug: pytest.LogCaptureFixture
) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder, event_key_jmespath="order_id")
    with pytest.warns(UserWarning, match="No idempotency key value found"):
        assert await engine.run(PAYMENT, Calls(clock)) == RESULT
    [skipped] = recorder.events
    assert skipped.kind is EventKind.NO_KEY
    assert skipped.key is None
    assert skipped.prefix == PREFIX
    assert skipped.outcome is CallOutcome.UNPROTECTED
    assert skipped.round_trips == 0
    [logged] = decisions(caplog_debug)
    assert logged.getMessage().startswith(f"no_key {PREFIX} (no key)")
    assert field(logged, "idempotency_key") is None
    assert field(logged, "idempotency_decision") == "no_key"
    strict = engine_for(
        store, clock, recorder, event_key_jmespath="order_id", raise_on_no_idempotency_key=True
    )
    with pytest.raises(IdempotencyKeyError):
        await strict.run(PAYMENT, Calls(clock))
    refused = recorder.events[-1]
    assert (refused.kind, refused.outcome) == (EventKind.NO_KEY, CallOutcome.REFUSED)
    assert refused.error == "IdempotencyKeyError"
    assert_no_secret(recorder, caplog_debug)


async def test_disabled_idempotency_is_reported(
    store: PersistenceLayer,
    monkeypatch: pytest.MonkeyPatch,
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("POWERTOOLS_IDEMPOTENCY_DISABLED", "1")
    clock, recorder = Clock(), Recorder()
    with pytest.warns(UserWarning, match="intended for development environments only"):
        await engine_for(store, clock, recorder).run(PAYMENT, Calls(clock))
    [disabled] = recorder.events
    assert disabled.kind is EventKind.DISABLED
    assert disabled.outcome is CallOutcome.UNPROTECTED
    assert disabled.key is None
    assert disabled.round_trips == 0
    [logged] = decisions(caplog_debug)
    assert logged.levelno == logging.DEBUG
    assert logged.getMessage().startswith(f"disabled {PREFIX} (no key)")
    assert field(logged, "idempotency_outcome") == "unprotected"


# -- listeners ---------------------------------------------------------------------------


async def test_a_listener_that_raises_is_logged_once_and_the_call_goes_on(
    store: PersistenceLayer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    calls: list[EventKind] = []

    def broken(event: IdempotencyEvent) -> None:
        calls.append(event.kind)
        raise RuntimeError(f"listener bug {SECRET}")

    engine = engine_for(store, clock, broken)
    with caplog.at_level(logging.WARNING, logger="aioidempotency"):
        assert await engine.run(PAYMENT, Calls(clock)) == RESULT
        assert await engine.run(PAYMENT, Calls(clock)) == RESULT
    assert calls == [EventKind.CLAIMED, EventKind.COMPLETED, EventKind.REPLAYED]
    [warning] = [r for r in caplog.records if r.name == "aioidempotency.events"]
    assert warning.levelno == logging.WARNING
    assert "raised on a claimed event" in warning.getMessage()


async def test_process_wide_listeners_see_every_engine_until_unsubscribed(
    store: PersistenceLayer,
) -> None:
    clock, config_listener, everywhere = Clock(), Recorder(), Recorder()
    order: list[str] = []
    unsubscribe = listen(everywhere)
    unsubscribe_order = listen(lambda event: order.append("process"))
    try:

        def first(event: IdempotencyEvent) -> None:
            config_listener(event)
            order.append("config")

        engine = engine_for(store, clock, first)
        await engine.run(PAYMENT, Calls(clock))
        await engine_for(store, clock).run(PAYMENT, Calls(clock))  # no listener of its own
    finally:
        unsubscribe()
        unsubscribe_order()
    unsubscribe()  # again: nothing happens
    assert config_listener.kinds() == [EventKind.CLAIMED, EventKind.COMPLETED]
    assert everywhere.kinds() == [EventKind.CLAIMED, EventKind.COMPLETED, EventKind.REPLAYED]
    assert order[:2] == ["config", "process"]  # the config's listener first
    await engine_for(store, clock).run({"other": 1}, Calls(clock))
    assert len(everywhere.events) == 3


async def test_nothing_listens_and_no_debug_no_watch(store: PersistenceLayer) -> None:
    """With no listener and DEBUG off, a call carries no watch (no event is built)."""
    clock = Clock()
    logging.getLogger("aioidempotency.engine").setLevel(logging.INFO)
    try:
        engine = engine_for(store, clock)
        call = engine.prepare_call(PAYMENT, key_source=Calls)
        assert call is not None
        assert call.watch is None
    finally:
        logging.getLogger("aioidempotency.engine").setLevel(logging.NOTSET)


# begin async-only
# The config and the event type are the same for both engines: tested once; and nothing
# cancels a sync call from outside (see tests/test_engine.py).
def test_on_event_is_keyword_only_and_checked() -> None:
    positional: list[Any] = ["", "", None, False, 3600, False, 256, "md5", None, 60.0, 0.0]
    positional += [0.05, print]  # on_event is not the thirteenth positional argument
    with pytest.raises(TypeError):
        IdempotencyConfig(*positional)
    with pytest.raises(IdempotencyPersistenceConfigError, match="on_event must be callable"):
        IdempotencyConfig(on_event="print")  # type: ignore[arg-type]
    config = IdempotencyConfig(on_event=print)
    with pytest.raises(AttributeError):
        config.on_event = None  # type: ignore[misc]


def test_an_event_is_immutable() -> None:
    event = IdempotencyEvent(EventKind.CLAIMED, "k", "p", "memory", 0.0, 1)
    with pytest.raises(AttributeError):
        event.key = "other"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")
    assert event.trips == ()
    trip = RoundTrip("claim", 0.0, 0.001)
    assert trip.error is None
    assert not hasattr(trip, "__dict__")


async def test_a_call_cancelled_while_waiting_is_reported(store: PersistenceLayer) -> None:
    clock, recorder = Clock(), Recorder()
    gate = Gate()
    first = spawn(engine_for(store, clock).run, PAYMENT, gate)
    await wait_set(gate.started)
    counting = WrapperStore(store)
    engine = engine_for(
        counting, clock, recorder, wait_for_in_progress_seconds=60, wait_poll_interval_seconds=0.01
    )
    waiter = asyncio.create_task(engine.run(PAYMENT, Calls(clock)))
    await counting.wait_calls("get", 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    [cancelled] = recorder.events
    assert cancelled.kind is EventKind.CANCELLED
    assert cancelled.outcome is CallOutcome.CANCELLED
    assert cancelled.error == "CancelledError"
    gate.release.set()
    await first.result()


async def test_a_call_cancelled_while_running_is_released(store: PersistenceLayer) -> None:
    clock, recorder = Clock(), Recorder()
    engine = engine_for(store, clock, recorder)
    gate = Gate()
    task = asyncio.create_task(engine.run(PAYMENT, gate))
    await wait_set(gate.started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recorder.kinds() == [EventKind.CLAIMED, EventKind.RELEASED]
    released = recorder.events[-1]
    assert released.outcome is CallOutcome.CANCELLED
    assert released.error == "CancelledError"


# end async-only
