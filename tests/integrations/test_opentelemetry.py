"""OpenTelemetry spans and metrics from the engine's events, with the SDK's in-memory
exporters, on the in-memory store and on a real Valkey server.

`SECRET` is in every payload, result and exception message: it must never appear in a
span, a span event or a metric point.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from aioidempotency import (
    IdempotencyAlreadyInProgressError,
    IdempotencyConfig,
    IdempotencyEngine,
    IdempotencyPersistenceLayerError,
)
from aioidempotency.events import CallOutcome, EventKind, IdempotencyEvent, RoundTrip
from aioidempotency.integrations.opentelemetry import (
    _MAX_ENDED_CALLS,
    _MAX_OPEN_CALLS,
    DURATION_BUCKETS,
    STORE_DURATION_BUCKETS,
    _Recorder,
    instrument,
)
from aioidempotency.persistence import PersistenceLayer
from tests.concurrency import Event, spawn, wait_set
from tests.helpers import WrapperStore

SECRET = "otel-s3cr3t-7319-pii"
PAYMENT = {"payment_id": "p-1", "amount": 100, "card": SECRET}
RESULT = {"status": "paid", "card": SECRET}
PREFIX = "test-otel"

# The in-memory store and one real network store (Valkey through valkey-glide).
STORES = pytest.mark.parametrize(
    ("store", "kind"),
    [("memory", "memory"), ("valkey_glide_atomic", "glide")],
    indirect=["store"],
)


class Clock:
    """The engine's clock: real time when the test starts, moved only by `advance`."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Telemetry:
    """A tracer provider and a meter provider writing to in-memory exporters."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("tests")

    def finished(self) -> list[ReadableSpan]:
        """The idempotency spans ended so far (not the test's own)."""
        return [
            span for span in self.spans.get_finished_spans() if span.name.startswith("idempotency ")
        ]

    def points(self, name: str) -> list[Any]:
        """The data points of the metric `name`, from a collection now."""
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def store_durations(self) -> dict[tuple[str, str | None], tuple[int, float]]:
        """``idempotency.store.duration`` by (operation, error type): (count, sum)."""
        found: dict[tuple[str, str | None], tuple[int, float]] = {}
        for point in self.points("idempotency.store.duration"):
            assert isinstance(point, HistogramDataPoint)
            attributes = dict(point.attributes or {})
            assert tuple(point.explicit_bounds) == STORE_DURATION_BUCKETS
            assert attributes["idempotency.key.prefix"] == PREFIX
            error = attributes.get("error.type")
            label = (
                str(attributes["idempotency.store.operation"]),
                None if error is None else str(error),
            )
            count, total = found.get(label, (0, 0.0))
            found[label] = (count + point.count, total + point.sum)
        return found

    def calls(self) -> dict[tuple[str, str], int]:
        """``idempotency.calls`` by (outcome, store kind)."""
        counts: dict[tuple[str, str], int] = {}
        for point in self.points("idempotency.calls"):
            assert isinstance(point, NumberDataPoint)
            assert point.attributes is not None
            label = (
                str(point.attributes["idempotency.outcome"]),
                str(point.attributes["idempotency.store.kind"]),
            )
            counts[label] = counts.get(label, 0) + int(point.value)
        return counts


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """`Telemetry`, instrumented for the test and uninstrumented after it."""
    recording = Telemetry()
    uninstrument = instrument(recording.tracer_provider, recording.meter_provider)
    try:
        yield recording
    finally:
        uninstrument()
        recording.tracer_provider.shutdown()
        recording.meter_provider.shutdown()


class Calls:
    """A function that counts its executions, moves the clock, and returns `RESULT`."""

    def __init__(self, clock: Clock, takes: float = 0.25) -> None:
        self.clock = clock
        self.takes = takes
        self.count = 0

    async def __call__(self) -> Any:
        self.count += 1
        self.clock.advance(self.takes)
        return RESULT


class Declined(Exception):
    """What the function raises; its message holds the secret."""


def engine_for(store: PersistenceLayer, clock: Clock) -> IdempotencyEngine:
    return IdempotencyEngine(store, IdempotencyConfig(), key_prefix=PREFIX, clock=clock)


def assert_no_secret(telemetry: Telemetry) -> None:
    """No span, span event or metric point holds `SECRET`."""
    for span in telemetry.spans.get_finished_spans():
        assert SECRET not in span.to_json()
    data = telemetry.reader.get_metrics_data()
    assert data is not None
    assert SECRET not in data.to_json()


def event_names(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events]


@STORES
async def test_a_first_execution_is_a_child_span_with_its_decisions(
    store: PersistenceLayer, kind: str, telemetry: Telemetry
) -> None:
    clock = Clock()
    engine = engine_for(store, clock)
    key = engine.idempotency_key(PAYMENT)
    with telemetry.tracer.start_as_current_span("request") as parent:
        assert await engine.run(PAYMENT, Calls(clock)) == RESULT
    [span] = telemetry.finished()
    assert span.name == f"idempotency {PREFIX}"
    assert span.kind is SpanKind.INTERNAL
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.context is not None
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert dict(span.attributes or {}) == {
        "idempotency.outcome": "executed",
        "idempotency.key.prefix": PREFIX,
        "idempotency.key.hash": key.rpartition("#")[2],
        "idempotency.store.kind": kind,
        "idempotency.store.round_trips": 2,
    }
    trip = "idempotency.store.round_trip"
    assert event_names(span) == [trip, "claimed", trip, "completed"]
    assert [dict(event.attributes or {}) for event in span.events] == [
        {"idempotency.store.operation": "claim", "idempotency.store.duration": 0.0},
        {"idempotency.store.round_trips": 1},
        {"idempotency.store.operation": "complete", "idempotency.store.duration": 0.0},
        {"idempotency.store.round_trips": 2},
    ]
    # The span covers the call by the engine's clock: 0.25 s, the decisions in it.
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.end_time - span.start_time == 250_000_000
    assert [event.timestamp for event in span.events] == [span.start_time] * 2 + [span.end_time] * 2
    assert span.status.status_code is StatusCode.UNSET
    # The store answered in no time by the engine's clock (the test's).
    assert telemetry.store_durations() == {("claim", None): (1, 0.0), ("complete", None): (1, 0.0)}

    assert telemetry.calls() == {("executed", kind): 1}
    [duration] = telemetry.points("idempotency.call.duration")
    assert isinstance(duration, HistogramDataPoint)
    assert duration.count == 1
    assert duration.sum == pytest.approx(0.25)
    assert tuple(duration.explicit_bounds) == DURATION_BUCKETS
    assert dict(duration.attributes or {}) == {
        "idempotency.outcome": "executed",
        "idempotency.store.kind": kind,
        "idempotency.key.prefix": PREFIX,
    }
    assert_no_secret(telemetry)


@STORES
async def test_a_replay_is_a_span_with_one_decision(
    store: PersistenceLayer, kind: str, telemetry: Telemetry
) -> None:
    clock = Clock()
    calls = Calls(clock)
    await engine_for(store, clock).run(PAYMENT, calls)
    with telemetry.tracer.start_as_current_span("retry") as parent:
        assert await engine_for(store, clock).run(PAYMENT, calls) == RESULT
    assert calls.count == 1
    first, replay = telemetry.finished()
    assert first.parent is None  # no span was current
    assert replay.parent is not None
    assert replay.parent.span_id == parent.get_span_context().span_id
    assert replay.attributes is not None
    assert first.attributes is not None
    assert replay.attributes["idempotency.outcome"] == "replayed"
    assert replay.attributes["idempotency.store.round_trips"] == 1
    assert replay.attributes["idempotency.key.hash"] == first.attributes["idempotency.key.hash"]
    assert event_names(replay) == ["idempotency.store.round_trip", "replayed"]
    assert telemetry.calls() == {("executed", kind): 1, ("replayed", kind): 1}
    [duration] = [
        point
        for point in telemetry.points("idempotency.call.duration")
        if (point.attributes or {}).get("idempotency.outcome") == "replayed"
    ]
    assert isinstance(duration, HistogramDataPoint)
    assert (duration.count, duration.sum) == (1, 0.0)
    assert_no_secret(telemetry)


@STORES
async def test_a_failure_is_an_error_span(
    store: PersistenceLayer, kind: str, telemetry: Telemetry
) -> None:
    clock = Clock()

    async def declines() -> Any:
        clock.advance(0.5)
        raise Declined(f"card {SECRET} declined")

    with telemetry.tracer.start_as_current_span("request") as parent, pytest.raises(Declined):
        await engine_for(store, clock).run(PAYMENT, declines)
    [span] = telemetry.finished()
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes is not None
    assert span.attributes["idempotency.outcome"] == "failed"
    assert span.attributes["error.type"] == "Declined"
    assert span.attributes["idempotency.store.round_trips"] == 2
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "Declined"
    assert event_names(span)[1::2] == ["claimed", "released"]
    assert dict(span.events[3].attributes or {}) == {
        "idempotency.store.round_trips": 2,
        "error.type": "Declined",
    }
    assert telemetry.calls() == {("failed", kind): 1}
    assert_no_secret(telemetry)


class Gate:
    """A function that blocks until released, to hold a claim open."""

    def __init__(self) -> None:
        self.started = Event()
        self.release = Event()

    async def __call__(self) -> Any:
        self.started.set()
        await wait_set(self.release)
        return RESULT


@STORES
async def test_an_in_progress_refusal_is_a_span_of_its_own(
    store: PersistenceLayer, kind: str, telemetry: Telemetry
) -> None:
    clock = Clock()
    gate = Gate()
    first = spawn(engine_for(store, clock).run, PAYMENT, gate)
    await wait_set(gate.started)
    duplicate = telemetry.tracer.start_as_current_span("duplicate")
    with duplicate as parent, pytest.raises(IdempotencyAlreadyInProgressError):
        await engine_for(store, clock).run(PAYMENT, Calls(clock))
    [refused] = telemetry.finished()
    gate.release.set()
    assert await first.result() == RESULT
    assert refused.parent is not None
    assert refused.parent.span_id == parent.get_span_context().span_id
    assert refused.attributes is not None
    assert refused.attributes["idempotency.outcome"] == "refused"
    assert refused.attributes["idempotency.store.round_trips"] == 1
    assert event_names(refused) == ["idempotency.store.round_trip", "in_progress"]
    assert refused.status.status_code is StatusCode.UNSET
    # The first call's span ends with it, under no parent: spans do not mix calls.
    refused_again, executed = telemetry.finished()
    assert refused_again is refused
    assert executed.parent is None
    assert event_names(executed)[1::2] == ["claimed", "completed"]
    assert telemetry.calls() == {("refused", kind): 1, ("executed", kind): 1}
    assert_no_secret(telemetry)


class SlowStore(WrapperStore):
    """Operations take `takes[method]` seconds of the test's clock; a get fails."""

    def __init__(self, inner: PersistenceLayer, clock: Clock, **takes: float) -> None:
        super().__init__(inner)
        self.clock = clock
        self.takes = takes

    def _record(self, method: str, key: str) -> None:
        self.clock.advance(self.takes.get(method, 0.0))
        super()._record(method, key)


@STORES
async def test_store_round_trips_are_timed_span_events_and_a_histogram(
    store: PersistenceLayer, kind: str, telemetry: Telemetry
) -> None:
    clock = Clock()
    slow = SlowStore(store, clock, claim=0.002, get=0.004, complete=0.003)
    config = IdempotencyConfig(wait_for_in_progress_seconds=30, wait_poll_interval_seconds=0.01)
    gate = Gate()
    first = spawn(engine_for(store, clock).run, PAYMENT, gate)
    await wait_set(gate.started)
    slow.fail["get"] = lambda: ConnectionError(f"reset {SECRET}")
    waiter = IdempotencyEngine(slow, config, key_prefix=PREFIX, clock=clock)
    with pytest.raises(IdempotencyPersistenceLayerError):
        await waiter.run(PAYMENT, Calls(clock))  # its claim is refused, its poll fails
    gate.release.set()
    assert await first.result() == RESULT
    failed, executed = telemetry.finished()
    assert failed.attributes is not None
    assert failed.attributes["idempotency.outcome"] == "error"
    assert event_names(failed) == [
        "idempotency.store.round_trip",
        "idempotency.store.round_trip",
        "store_error",
    ]
    claim, poll = (dict(event.attributes or {}) for event in failed.events[:2])
    assert claim == {
        "idempotency.store.operation": "claim",
        "idempotency.store.duration": pytest.approx(0.002, abs=1e-6),  # epoch floats
    }
    assert poll["idempotency.store.operation"] == "get"
    assert poll["error.type"] == "ConnectionError"  # the store's, not the caller's
    assert poll["idempotency.store.duration"] == pytest.approx(0.004, abs=1e-6)
    assert failed.start_time is not None
    assert failed.events[1].timestamp - failed.start_time == pytest.approx(
        2_000_000, abs=1000
    )  # the poll was sent after the claim's 2 ms
    durations = telemetry.store_durations()
    assert durations[("claim", None)][0] == 2  # the waiter's and the first call's
    assert durations[("claim", None)][1] == pytest.approx(0.002, abs=1e-6)
    assert durations[("get", "ConnectionError")][0] == 1
    assert durations[("get", "ConnectionError")][1] == pytest.approx(0.004, abs=1e-6)
    assert durations[("complete", None)][0] == 1
    points = telemetry.points("idempotency.store.duration")
    assert {dict(point.attributes)["idempotency.store.kind"] for point in points} == {kind}
    assert event_names(executed)[1::2] == ["claimed", "completed"]
    assert await waiter.drain()
    assert_no_secret(telemetry)


async def test_uninstrument_stops_recording() -> None:
    from aioidempotency import InMemoryPersistenceLayer

    recording = Telemetry()
    uninstrument = instrument(recording.tracer_provider, recording.meter_provider)
    clock = Clock()
    engine = engine_for(InMemoryPersistenceLayer(), clock)
    await engine.run({"payment_id": "p-1"}, Calls(clock))
    assert len(recording.finished()) == 1
    uninstrument()
    uninstrument()  # a second call does nothing
    await engine.run({"payment_id": "p-2"}, Calls(clock))
    assert len(recording.finished()) == 1
    assert recording.calls() == {("executed", "memory"): 1}


def test_importing_the_package_does_not_import_opentelemetry() -> None:
    script = (
        "import sys, aioidempotency, aioidempotency.events, aioidempotency.integrations\n"
        "assert not any(m == 'opentelemetry' or m.startswith('opentelemetry.') "
        "for m in sys.modules), sorted(m for m in sys.modules if 'opentelemetry' in m)\n"
        "import aioidempotency.integrations.opentelemetry\n"
        "assert 'opentelemetry.trace' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


# -- the listener's edges, fed events directly -------------------------------------------


def event(
    kind: EventKind,
    call_id: int | None,
    outcome: CallOutcome | None = None,
    duration: float | None = 0.0,
    trips: tuple[RoundTrip, ...] = (),
) -> IdempotencyEvent:
    round_trips = None if duration is None else 1
    return IdempotencyEvent(
        kind,
        f"{PREFIX}#abc",
        PREFIX,
        "memory",
        duration,
        round_trips,
        outcome,
        None,
        call_id,
        trips,
    )


def test_decisions_after_a_calls_end_are_not_recorded() -> None:
    recording = Telemetry()
    recorder = _Recorder(recording.tracer_provider, recording.meter_provider)
    recorder(event(EventKind.CLAIMED, 7))
    recorder(event(EventKind.RELEASED, 7, CallOutcome.NOT_STORED, 0.5))
    late = RoundTrip("complete", 0.6, 0.125)
    recorder(event(EventKind.COMPLETED, 7, duration=0.75, trips=(late,)))  # a background retry
    recorder(event(EventKind.CLAIMED, 8))
    recorder(event(EventKind.COMPLETED, 8, CallOutcome.EXECUTED, 0.5))
    first, second = recording.finished()
    assert event_names(first) == ["claimed", "released"]
    assert event_names(second) == ["claimed", "completed"]
    assert recording.calls() == {("not_stored", "memory"): 1, ("executed", "memory"): 1}
    # The late round trip is no span event, but a store latency all the same.
    assert recording.store_durations() == {("complete", None): (1, 0.125)}


def test_unfinished_calls_keep_a_bounded_number_of_decisions() -> None:
    recording = Telemetry()
    recorder = _Recorder(recording.tracer_provider, recording.meter_provider)
    for call_id in range(1, _MAX_OPEN_CALLS + 2):  # one more than the bound
        recorder(event(EventKind.CLAIMED, call_id))
    recorder(event(EventKind.COMPLETED, 1, CallOutcome.EXECUTED))  # the oldest: dropped
    recorder(event(EventKind.COMPLETED, 2, CallOutcome.EXECUTED))
    oldest, kept = recording.finished()
    assert event_names(oldest) == ["completed"]
    assert event_names(kept) == ["claimed", "completed"]
    for call_id in range(3, _MAX_ENDED_CALLS + 4):  # ends more calls than it remembers
        recorder(event(EventKind.COMPLETED, call_id, CallOutcome.EXECUTED))
    recorder(event(EventKind.LEASE_RENEWED, 1))  # call 1 is forgotten: opens anew
    recorder(event(EventKind.LEASE_RENEWED, _MAX_ENDED_CALLS + 3))  # remembered: dropped
    recorder(event(EventKind.COMPLETED, 1, CallOutcome.EXECUTED))
    assert event_names(recording.finished()[-1]) == ["lease_renewed", "completed"]


def test_an_event_of_an_unwatched_call_is_a_span_without_duration() -> None:
    recording = Telemetry()
    recorder = _Recorder(recording.tracer_provider, recording.meter_provider)
    recorder(event(EventKind.STORE_ERROR, None, duration=None))  # no outcome, no id: dropped
    recorder(event(EventKind.STORE_ERROR, None, CallOutcome.ERROR, duration=None))
    [span] = recording.finished()
    assert span.start_time == span.end_time
    assert event_names(span) == ["store_error"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert "idempotency.store.round_trips" not in span.attributes
    assert recording.calls() == {("error", "memory"): 1}
    assert recording.points("idempotency.call.duration") == []
