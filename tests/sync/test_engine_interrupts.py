"""The sync engine and Ctrl-C: a `KeyboardInterrupt` is the sync world's cancellation
(`aioidempotency._sync.concurrency.Cancelled`). It stays what it is, is reported as a
cancellation, and the claim it may leave behind is released in the background.

The interrupts are injected where they would arrive: in the store while a claim is in
flight, in the function while a release cannot reach the store. The async engine's
tests of cancellation (tests/test_engine.py, tests/test_events.py) are the twins.
"""

from __future__ import annotations

from typing import Any

import pytest

from aioidempotency import (
    IdempotencyConfig,
    SyncIdempotencyEngine,
    SyncInMemoryPersistenceLayer,
)
from aioidempotency._records import DataRecord
from aioidempotency._sync.engine import _CONFIRM_RELEASE_DELAYS
from aioidempotency.events import CallOutcome, EventKind, IdempotencyEvent
from aioidempotency.persistence import ClaimResult, SyncPersistenceLayer
from tests.sync.helpers import WrapperStore

PAYMENT = {"payment_id": "p-interrupted", "amount": 3}


def engine_for(
    store: SyncPersistenceLayer, events: list[IdempotencyEvent]
) -> SyncIdempotencyEngine:
    return SyncIdempotencyEngine(
        store, IdempotencyConfig(on_event=events.append), key_prefix="test-interrupts"
    )


class InterruptedClaimStore(WrapperStore):
    """Lands the claim, then Ctrl-C arrives before its reply is read."""

    def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        super().claim(record, now=now)
        raise KeyboardInterrupt


def test_an_interrupt_during_the_claim_is_a_cancellation_and_the_claim_is_released() -> None:
    inner = SyncInMemoryPersistenceLayer()
    store = InterruptedClaimStore(inner)
    events: list[IdempotencyEvent] = []
    engine = engine_for(store, events)
    ran: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        engine.run(PAYMENT, lambda: ran.append(1))
    assert ran == []
    assert [(e.kind, e.outcome, e.error, e.round_trips) for e in events] == [
        (EventKind.CANCELLED, CallOutcome.CANCELLED, "KeyboardInterrupt", 1)
    ]  # reported once, though the claim and the call both saw it
    assert engine.drain(timeout=20)  # released, and released again in case it landed late
    assert store.counts["release"] == 1 + len(_CONFIRM_RELEASE_DELAYS)
    assert len(inner) == 0


def test_an_interrupt_stays_an_interrupt_when_the_release_fails() -> None:
    inner = SyncInMemoryPersistenceLayer()
    store = WrapperStore(inner)
    store.fail["release"] = lambda: ConnectionError("store went away")
    events: list[IdempotencyEvent] = []
    engine = engine_for(store, events)

    def interrupted() -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.run(PAYMENT, interrupted)
    failed = next(e for e in events if e.kind is EventKind.STORE_ERROR)
    assert (failed.outcome, failed.error) == (
        CallOutcome.CANCELLED,
        "IdempotencyPersistenceLayerError",
    )
    # The release is retried in the background until the store answers.
    store.wait_calls("release", 2)
    assert len(inner) == 1
    del store.fail["release"]
    assert engine.drain(timeout=20)
    assert len(inner) == 0
