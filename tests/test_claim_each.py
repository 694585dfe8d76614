"""Claims sent ahead together: `IdempotencyEngine.claim_each` and `run_prepared(claim=)`.

A batch sends the first claims of its records in one store operation, and each call goes
on from its answer exactly as from a claim of its own. These tests hold the engine to
that, on the in-memory store, and to what happens when the claims fail or are
cancelled as a whole: every claim that may have landed is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from aioidempotency import IdempotencyConfig, InMemoryPersistenceLayer
from aioidempotency._async.engine import IdempotencyEngine, PreparedCall
from aioidempotency._async.store import ClaimResult
from aioidempotency._records import DataRecord
from aioidempotency.events import EventKind, IdempotencyEvent
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)

BOUND = 10.0


def _engine(
    store: InMemoryPersistenceLayer, on_event: Callable[[IdempotencyEvent], None] | None = None
) -> IdempotencyEngine:
    return IdempotencyEngine(store, IdempotencyConfig(on_event=on_event), key_prefix="claim-each")


def _calls(engine: IdempotencyEngine, names: Sequence[str]) -> list[PreparedCall]:
    calls = [engine.prepare_call(name, key_source=_calls) for name in names]
    assert all(call is not None for call in calls)
    return [call for call in calls if call is not None]


async def test_each_call_goes_on_from_its_claims_answer() -> None:
    store = InMemoryPersistenceLayer()
    engine = _engine(store)
    # "done" completed before; "busy" held by a call that is still running
    assert await engine.run("done", _result, "stored") == "stored"
    [held] = await engine.claim_each(_calls(engine, ["busy"]))  # never run: it holds
    assert held.outcome == ClaimResult(claimed=True)
    runs: list[str] = []

    async def run(name: str) -> str:
        runs.append(name)
        return f"ran {name}"

    calls = _calls(engine, ["new", "done", "busy"])
    claims = await engine.claim_each(calls)
    assert [claim.outcome.claimed for claim in claims] == [True, False, False]  # type: ignore[union-attr]
    assert await engine.run_prepared(calls[0], lambda: run("new"), claim=claims[0]) == "ran new"
    assert await engine.run_prepared(calls[1], lambda: run("done"), claim=claims[1]) == "stored"
    with pytest.raises(IdempotencyAlreadyInProgressError):
        await engine.run_prepared(calls[2], lambda: run("busy"), claim=claims[2])
    assert runs == ["new"]  # the replay and the refusal ran nothing
    assert all(claim.taken for claim in claims)
    stored = await store.get(calls[0].key)
    assert stored is not None
    assert stored.response_json() == "ran new"


async def _result(value: str) -> str:
    return value


class CountingStore(InMemoryPersistenceLayer):
    """Counts single claims and claims sent together; `block` holds `claim_each` after
    its claims landed (as a reply lost on the way back), until cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.single = 0
        self.together: list[int] = []
        self.block = False
        self.landed = asyncio.Event()
        self.fail: Exception | None = None

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self.single += 1
        return await super().claim(record, now=now)

    async def claim_each(
        self, records: Sequence[DataRecord], *, now: float
    ) -> list[ClaimResult | Exception]:
        self.together.append(len(records))
        if self.fail is not None:
            for record in records:  # they landed, but the reply is lost
                await super().claim(record, now=now)
            raise self.fail
        answers: list[ClaimResult | Exception] = []
        for record in records:
            answers.append(await super().claim(record, now=now))
        if self.block:
            self.landed.set()
            await asyncio.Event().wait()
        return answers


async def test_claims_that_failed_as_a_whole_fail_each_call_and_are_released() -> None:
    store = CountingStore()
    store.fail = IdempotencyPersistenceConnectionError("reply lost (injected)")
    engine = _engine(store)
    calls = _calls(engine, ["a", "b", "c"])
    claims = await engine.claim_each(calls)
    assert store.together == [3]
    ran: list[str] = []
    for call, claim in zip(calls, claims, strict=True):
        with pytest.raises(IdempotencyPersistenceLayerError):
            await engine.run_prepared(call, lambda: _ran(ran), claim=claim)
    assert ran == []
    # Each claim may have landed: the engine released each in the background.
    assert await engine.drain(BOUND)
    assert all([await store.get(call.key) is None for call in calls])
    assert store.single == 0  # no call claimed again on its own


async def _ran(ran: list[str]) -> str:
    ran.append("ran")
    return "ok"


async def test_cancelled_claims_are_released_and_reported() -> None:
    events: list[IdempotencyEvent] = []
    store = CountingStore()
    store.block = True
    engine = _engine(store, on_event=events.append)
    calls = _calls(engine, ["a", "b"])
    task = asyncio.ensure_future(engine.claim_each(calls))
    await asyncio.wait_for(store.landed.wait(), BOUND)
    assert all([await store.get(call.key) is not None for call in calls])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await engine.drain(BOUND)
    assert all([await store.get(call.key) is None for call in calls])
    cancelled = [e for e in events if e.kind is EventKind.CANCELLED]
    assert sorted(e.key or "" for e in cancelled) == sorted(call.key for call in calls)
    assert all([t.error for t in e.trips] == ["CancelledError"] for e in cancelled)


async def test_abandoned_claims_are_released_and_taken_ones_left() -> None:
    store = InMemoryPersistenceLayer()
    engine = _engine(store)
    calls = _calls(engine, ["kept", "dropped"])
    claims = await engine.claim_each(calls)
    assert await engine.run_prepared(calls[0], lambda: _result("kept"), claim=claims[0]) == "kept"
    await engine.abandon(claims)  # "dropped" never ran
    assert await engine.drain(BOUND)
    assert await store.get(calls[1].key) is None
    done = await store.get(calls[0].key)
    assert done is not None
    assert done.response_json() == "kept"


async def test_a_claim_sent_ahead_is_reported_as_the_calls_claim() -> None:
    events: list[IdempotencyEvent] = []
    store = InMemoryPersistenceLayer()
    engine = _engine(store, on_event=events.append)
    calls = _calls(engine, ["a"])
    claims = await engine.claim_each(calls)
    assert await engine.run_prepared(calls[0], lambda: _result("a"), claim=claims[0]) == "a"
    assert [event.kind for event in events] == [EventKind.CLAIMED, EventKind.COMPLETED]
    # the claim sent ahead is the call's first round trip, the completion its second
    assert [[t.operation for t in event.trips] for event in events] == [["claim"], ["complete"]]
    assert [event.round_trips for event in events] == [1, 2]


class ShortStore(InMemoryPersistenceLayer):
    """A store of one's own whose `claim_each` writes every claim and answers one."""

    async def claim_each(
        self, records: Sequence[DataRecord], *, now: float
    ) -> list[ClaimResult | Exception]:
        answers = await super().claim_each(records, now=now)
        return answers[:1]


async def test_claims_answered_in_part_fail_each_call_and_are_released() -> None:
    store = ShortStore()
    engine = _engine(store)
    calls = _calls(engine, ["a", "b"])
    claims = await engine.claim_each(calls)
    for call, claim in zip(calls, claims, strict=True):
        with pytest.raises(IdempotencyPersistenceLayerError, match="answered 1 of 2"):
            await engine.run_prepared(call, lambda: _result("ran"), claim=claim)
    assert await engine.drain(BOUND)
    assert all([await store.get(call.key) is None for call in calls])
