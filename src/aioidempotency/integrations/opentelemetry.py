"""OpenTelemetry traces and metrics from the engine's events (the ``otel`` extra).

`instrument` registers one process-wide events listener (`aioidempotency.events.listen`)
that records, for every idempotent call:

- a span named ``idempotency <prefix>``, a child of the span current in the call's task
  or thread when the call ended. The span is built at the call's last event (the one
  with an outcome): its start time is that moment minus the call's ``duration``, so it
  covers the call. Its attributes: ``idempotency.outcome``, ``idempotency.key.prefix``,
  ``idempotency.key.hash`` (the key's digest, never the payload),
  ``idempotency.store.kind``, ``idempotency.store.round_trips``, and ``error.type``
  when an exception was involved; its status is ERROR for the outcomes ``error`` and
  ``failed``. Each decision of the call is a span event named after its kind
  (``claimed``, ``completed``, ...), at its time in the call, with
  ``idempotency.store.round_trips`` and ``error.type``; each store round trip is a
  span event ``idempotency.store.round_trip`` at the time it was sent, with
  ``idempotency.store.operation``, ``idempotency.store.duration`` (seconds) and
  ``error.type`` (the store's exception) if it failed.
- ``idempotency.calls`` (counter, ``{call}``): calls, by ``idempotency.outcome``,
  ``idempotency.store.kind`` and ``idempotency.key.prefix``.
- ``idempotency.call.duration`` (histogram, ``s``): the duration of a call through the
  engine, from its start to its last event, with the counter's attributes (the
  function's run time included for an executed call). Its buckets are
  `DURATION_BUCKETS`.
- ``idempotency.store.duration`` (histogram, ``s``): the duration of each store round
  trip (`aioidempotency.events.RoundTrip`) by the engine's clock, by
  ``idempotency.store.operation`` (``claim``, ``get``, ``complete``, ``release``,
  ``renew``), ``idempotency.store.kind``, ``idempotency.key.prefix`` and ``error.type``
  when it failed. Its buckets are `STORE_DURATION_BUCKETS`.

Decisions reported after a call's end (a release or completion retried in the
background, a lease renewal racing the end) are not added to spans; their round trips
are still recorded in ``idempotency.store.duration``. Importing
``aioidempotency`` never imports this module or OpenTelemetry; uninstrumented, the
engine pays nothing for it. See docs/observability.md.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from aioidempotency import __version__
from aioidempotency.events import CallOutcome, IdempotencyEvent, RoundTrip, listen

__all__ = ["DURATION_BUCKETS", "STORE_DURATION_BUCKETS", "instrument"]

_SCOPE = "aioidempotency"

DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
"""The bucket boundaries ``idempotency.call.duration`` advises (opentelemetry-api 1.30
and later; a View overrides them). A replay from Redis takes well under a millisecond:
the SDK's default boundaries (0, 5, 10, ... 10000), made for milliseconds, would put
nearly every call in one bucket."""

STORE_DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0
)  # fmt: skip
"""The bucket boundaries ``idempotency.store.duration`` advises: a round trip to a
Redis or Valkey server on the same host takes 0.1 to 0.3 ms, one to DynamoDB a few
milliseconds, a client's timeout seconds."""

_ROUND_TRIP = "idempotency.store.round_trip"
"""The name of a round trip's span event."""

_MAX_OPEN_CALLS = 4096
"""How many unfinished calls keep their decisions; beyond it the oldest are dropped."""

_MAX_ENDED_CALLS = 4096
"""How many ended calls are remembered, to drop their late decisions."""

_FAILING = (CallOutcome.ERROR, CallOutcome.FAILED)

# (kind, seconds since the call started, round trips, error type, the round trips that
# ended since the call's previous decision) of one decision.
_Decision = tuple[str, float, int | None, str | None, tuple[RoundTrip, ...]]


class _Recorder:
    """The listener `instrument` registers: spans at each call's end, and metrics."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        self._tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        self._calls = meter.create_counter(
            "idempotency.calls",
            unit="{call}",
            description="Idempotent calls, by outcome.",
        )
        self._duration = _histogram(
            meter,
            "idempotency.call.duration",
            "Duration of idempotent calls, from their start to their outcome.",
            DURATION_BUCKETS,
        )
        self._store_duration = _histogram(
            meter,
            "idempotency.store.duration",
            "Duration of the store round trips of idempotent calls (claim, get, complete, "
            "release, renew).",
            STORE_DURATION_BUCKETS,
        )
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[int, list[_Decision]] = collections.OrderedDict()
        self._ended: collections.OrderedDict[int, None] = collections.OrderedDict()

    def __call__(self, event: IdempotencyEvent) -> None:
        call_id = event.call_id
        if event.trips:
            self._record_trips(event)
        decision: _Decision = (
            event.kind.value,
            event.duration or 0.0,
            event.round_trips,
            event.error,
            event.trips,
        )
        if event.outcome is None:
            if call_id is None:
                return
            with self._lock:
                if call_id in self._ended:
                    return
                decisions = self._open.get(call_id)
                if decisions is None:
                    decisions = self._open[call_id] = []
                    if len(self._open) > _MAX_OPEN_CALLS:
                        self._open.popitem(last=False)
                decisions.append(decision)
            return
        earlier: list[_Decision] = []
        if call_id is not None:
            with self._lock:
                earlier = self._open.pop(call_id, earlier)
                self._ended[call_id] = None
                if len(self._ended) > _MAX_ENDED_CALLS:
                    self._ended.popitem(last=False)
        self._end(event, [*earlier, decision])

    def _record_trips(self, event: IdempotencyEvent) -> None:
        for trip in event.trips:
            labels: dict[str, AttributeValue] = {
                "idempotency.store.operation": trip.operation,
                "idempotency.store.kind": event.store,
                "idempotency.key.prefix": event.prefix,
            }
            if trip.error is not None:
                labels["error.type"] = trip.error
            self._store_duration.record(trip.duration, labels)

    def _end(self, event: IdempotencyEvent, decisions: list[_Decision]) -> None:
        assert event.outcome is not None
        outcome = event.outcome.value
        labels: dict[str, AttributeValue] = {
            "idempotency.outcome": outcome,
            "idempotency.store.kind": event.store,
            "idempotency.key.prefix": event.prefix,
        }
        self._calls.add(1, labels)
        if event.duration is not None:
            self._duration.record(event.duration, labels)

        end = time.time_ns()
        start = end - int((event.duration or 0.0) * 1e9)
        attributes = dict(labels)
        if event.key is not None:
            attributes["idempotency.key.hash"] = event.key.rpartition("#")[2]
        if event.round_trips is not None:
            attributes["idempotency.store.round_trips"] = event.round_trips
        if event.error is not None:
            attributes["error.type"] = event.error
        span = self._tracer.start_span(
            f"idempotency {event.prefix}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=start,
        )
        # Span events in the order of their times: a round trip at the moment it was sent,
        # before the decision that followed it.
        for kind, since_start, round_trips, error, trips in decisions:
            for trip in trips:
                sent: dict[str, AttributeValue] = {
                    "idempotency.store.operation": trip.operation,
                    "idempotency.store.duration": trip.duration,
                }
                if trip.error is not None:
                    sent["error.type"] = trip.error
                at = min(end, start + int(trip.start * 1e9))
                span.add_event(_ROUND_TRIP, sent, timestamp=at)
            details: dict[str, AttributeValue] = {}
            if round_trips is not None:
                details["idempotency.store.round_trips"] = round_trips
            if error is not None:
                details["error.type"] = error
            at = min(end, start + int(since_start * 1e9))
            span.add_event(kind, details, timestamp=at)
        if event.outcome in _FAILING:
            span.set_status(Status(StatusCode.ERROR, event.error))
        span.end(end_time=end)


def _histogram(
    meter: metrics.Meter, name: str, description: str, buckets: tuple[float, ...]
) -> metrics.Histogram:
    """A histogram in seconds advising `buckets` (opentelemetry-api 1.30 and later)."""
    try:
        return meter.create_histogram(
            name, "s", description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:  # pragma: no cover - opentelemetry-api < 1.30: the SDK's buckets
        return meter.create_histogram(name, "s", description)


def instrument(
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> Callable[[], None]:
    """Record a span and metrics for every idempotent call of this process.

    Uses the global tracer and meter providers unless given others. Returns a function
    that stops recording (calling it again does nothing). Each call registers one more
    listener: instrument once per process.
    """
    return listen(_Recorder(tracer_provider, meter_provider))
