"""OpenTelemetry spans of two more kinds of calls: a long call whose lease is renewed
(every decision of the call is an event of its one span) and a call without a key (a
span that names no key)."""

from __future__ import annotations

import pytest

from aioidempotency import IdempotencyConfig, IdempotencyEngine, InMemoryPersistenceLayer
from aioidempotency.events import CallOutcome, EventKind
from aioidempotency.integrations.opentelemetry import _Recorder
from tests.integrations.test_opentelemetry import (
    PREFIX,
    Telemetry,
    event,
    event_names,
    telemetry,
)

__all__ = ["telemetry"]  # the fixture, for the tests below


def test_a_renewed_lease_is_an_event_of_the_calls_span() -> None:
    recording = Telemetry()
    recorder = _Recorder(recording.tracer_provider, recording.meter_provider)
    recorder(event(EventKind.CLAIMED, 3))
    recorder(event(EventKind.LEASE_RENEWED, 3, duration=10.0))
    recorder(event(EventKind.LEASE_RENEWED, 3, duration=20.0))
    recorder(event(EventKind.COMPLETED, 3, CallOutcome.EXECUTED, 25.0))
    [span] = recording.finished()
    assert event_names(span) == ["claimed", "lease_renewed", "lease_renewed", "completed"]
    assert recording.calls() == {("executed", "memory"): 1}


async def test_a_call_without_a_key_is_a_span_naming_no_key(telemetry: Telemetry) -> None:
    engine = IdempotencyEngine(
        InMemoryPersistenceLayer(), IdempotencyConfig(event_key_jmespath="id"), key_prefix=PREFIX
    )

    async def charge() -> str:
        return "paid"

    with pytest.warns(UserWarning, match="No idempotency key value found"):
        assert await engine.run({"other": 1}, charge) == "paid"
    [span] = telemetry.finished()
    assert event_names(span) == ["no_key"]
    assert span.attributes is not None
    assert "idempotency.key.hash" not in span.attributes
    assert span.attributes["idempotency.key.prefix"] == PREFIX
    assert telemetry.calls() == {("unprotected", "memory"): 1}
