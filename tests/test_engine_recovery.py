"""How the engine recovers from lost replies, lost leases and interrupted completions.

Each store operation must be safe to repeat for its owner (a client may resend it
after losing the reply); the engine relies on that to recognise its own claim and to
finish an interrupted completion in the background instead of releasing a key whose
function already ran. These tests run on every backend of the suite.

tools/unasync.py generates the sync engine's twin of this module,
tests/sync/test_engine_recovery.py (see tests/test_engine.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from aioidempotency import (
    IdempotencyClaimLostError,
    IdempotencyCompletionError,
    IdempotencyConfig,
    IdempotencyEngine,
    IdempotencyInvalidRecordError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
    InMemoryPersistenceLayer,
)
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.persistence import ClaimResult, PersistenceLayer

from .concurrency import Event, gather, spawn, wait_set
from .helpers import WrapperStore

PAYMENT = {"payment_id": "p-recovery", "amount": 5}


def engine_for(store: PersistenceLayer, **config: Any) -> IdempotencyEngine:
    return IdempotencyEngine(store, IdempotencyConfig(**config), key_prefix="test-recovery")


class Counted:
    """A function that counts its executions."""

    def __init__(self, result: Any = "paid") -> None:
        self.result = result
        self.count = 0

    async def __call__(self) -> Any:
        self.count += 1
        return self.result


class ResendingStore(WrapperStore):
    """Sends every claim and completion twice, as a client that lost the first reply
    and retried would: the first one lands, the caller sees the second's answer."""

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        await super().claim(record, now=now)
        return await super().claim(record, now=now)

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        await super().complete(record, owner=owner)
        await super().complete(record, owner=owner)


async def test_a_resent_claim_and_completion_are_recognised_as_our_own(
    store: PersistenceLayer,
) -> None:
    resending = ResendingStore(store)
    engine = engine_for(resending)
    fn = Counted()
    assert await engine.run(PAYMENT, fn) == "paid"
    assert fn.count == 1
    assert resending.counts["claim"] == 2
    assert resending.counts["complete"] == 2
    # The record is the completed one: a duplicate replays it, without running.
    assert await engine_for(store).run(PAYMENT, fn) == "paid"
    assert fn.count == 1


class OwnerRecordingStore(WrapperStore):
    """Remembers the owner token of every claim."""

    def __init__(self, inner: PersistenceLayer) -> None:
        super().__init__(inner)
        self.owners: list[str] = []

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        assert record.owner is not None
        self.owners.append(record.owner)
        return await super().claim(record, now=now)


async def test_a_late_release_by_the_owner_never_deletes_its_result(
    store: PersistenceLayer,
) -> None:
    recording = OwnerRecordingStore(store)
    engine = engine_for(recording)
    fn = Counted()
    assert await engine.run(PAYMENT, fn) == "paid"
    key = engine.idempotency_key(PAYMENT)
    # The owner's release arriving after its completion (a retried or delayed request)
    # must leave the completed record alone.
    await store.release(key, owner=recording.owners[0])
    record = await store.get(key)
    assert record is not None
    assert record.status is RecordStatus.COMPLETED
    assert await engine.run(PAYMENT, fn) == "paid"
    assert fn.count == 1


class LosingLeaseStore(WrapperStore):
    """Reports every renewal as lost: another call took the key over."""

    def __init__(self, inner: PersistenceLayer) -> None:
        super().__init__(inner)
        self.renewed = Event()

    async def renew(self, record: DataRecord) -> None:
        self._record("renew", record.idempotency_key)
        self.renewed.set()
        raise IdempotencyClaimLostError("taken over", key=record.idempotency_key)


async def test_a_lost_lease_refuses_the_late_completion_without_writing() -> None:
    store = LosingLeaseStore(InMemoryPersistenceLayer())
    engine = engine_for(store, in_progress_lease_seconds=0.06)

    async def slow() -> str:
        await wait_set(store.renewed)
        return "late"

    with pytest.raises(IdempotencyClaimLostError) as raised:
        await engine.run(PAYMENT, slow)
    assert raised.value.result == "late"
    assert store.counts["complete"] == 0


class FlakyCompletionStore(WrapperStore):
    """Fails the first `failures` completions with a connection error."""

    def __init__(self, inner: PersistenceLayer, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        self._record("complete", record.idempotency_key)
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("connection reset during completion")
        await self.inner.complete(record, owner=owner)


async def test_a_failed_completion_is_stored_in_the_background_not_released(
    store: PersistenceLayer,
) -> None:
    flaky = FlakyCompletionStore(store, failures=2)
    engine = engine_for(flaky)
    fn = Counted()
    with pytest.raises(IdempotencyCompletionError) as raised:
        await engine.run(PAYMENT, fn)
    assert raised.value.result == "paid"
    assert raised.value.__cause__ is not None
    assert await engine.drain(timeout=20)
    assert flaky.counts["complete"] == 3
    assert flaky.counts["release"] == 0
    # The function ran once; its result is stored, so a retry replays it.
    assert await engine_for(store).run(PAYMENT, fn) == "paid"
    assert fn.count == 1


async def test_a_background_completion_gives_up_after_its_attempts_and_leaves_the_claim(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import aioidempotency._async.engine

    monkeypatch.setattr(aioidempotency._async.engine, "_CLEANUP_FIRST_DELAY", 0.001)
    inner = InMemoryPersistenceLayer()
    flaky = FlakyCompletionStore(inner, failures=100)  # the store never takes it
    engine = engine_for(flaky, in_progress_lease_seconds=30)
    with pytest.raises(IdempotencyCompletionError):
        await engine.run(PAYMENT, Counted())
    assert await engine.drain(timeout=20)
    attempts = aioidempotency._async.engine._CLEANUP_ATTEMPTS
    assert flaky.counts["complete"] == 1 + attempts
    assert flaky.counts["release"] == 0  # the function ran: its claim is never traded away
    record = await inner.get(engine.idempotency_key(PAYMENT))
    assert record is not None
    assert record.status is RecordStatus.INPROGRESS  # the lease frees the key at worst
    gave_up = [r for r in caplog.records if "gave up the background" in r.getMessage()]
    assert [r.levelno for r in gave_up] == [logging.WARNING]
    assert (
        gave_up[0]
        .getMessage()
        .endswith(
            f": gave up the background completion after {attempts} attempts (ConnectionError)"
        )
    )


# begin async-only
# Nothing cancels a sync call from outside (see tests/test_engine.py).
class HeldCompletionStore(WrapperStore):
    """Holds the first completion until `proceed` is set."""

    def __init__(self, inner: PersistenceLayer) -> None:
        super().__init__(inner)
        self.completing = asyncio.Event()
        self.proceed = asyncio.Event()

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        first = not self.completing.is_set()
        self.completing.set()
        if first:
            await asyncio.wait_for(self.proceed.wait(), 10)
        await super().complete(record, owner=owner)


async def test_a_completion_cancelled_mid_flight_still_stores_the_result(
    store: PersistenceLayer,
) -> None:
    held = HeldCompletionStore(store)
    engine = engine_for(held)
    fn = Counted()
    task = asyncio.create_task(engine.run(PAYMENT, fn))
    await asyncio.wait_for(held.completing.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    held.proceed.set()
    assert await engine.drain(timeout=20)
    assert held.counts["release"] == 0
    assert await engine_for(store).run(PAYMENT, fn) == "paid"
    assert fn.count == 1


# end async-only


class UnusableRecordStore(WrapperStore):
    """A store whose claims find a record that cannot be read."""

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self._record("claim", record.idempotency_key)
        raise IdempotencyInvalidStatusError("attribute 'expiration' is not a number: 'soon'")


async def test_an_unusable_record_is_a_typed_error_naming_the_key_and_the_fix() -> None:
    store = UnusableRecordStore(InMemoryPersistenceLayer())
    engine = engine_for(store)
    fn = Counted()
    with pytest.raises(IdempotencyInvalidRecordError) as raised:
        await engine.run(PAYMENT, fn)
    error = raised.value
    key = engine.idempotency_key(PAYMENT)
    assert error.key == key
    assert isinstance(error, IdempotencyPersistenceLayerError)
    assert isinstance(error.__cause__, IdempotencyInvalidStatusError)
    assert key in str(error)
    assert "expiration" in str(error)
    assert "python -m aioidempotency delete --store" in str(error)
    assert fn.count == 0
    assert await engine.drain(timeout=5)
    assert store.counts["release"] == 0  # nothing of ours was written


# begin async-only
# Nothing cancels a sync call from outside (see tests/test_engine.py).
class LandedClaimStore(WrapperStore):
    """Lets a claim land in the inner store, then holds its reply until `proceed`."""

    def __init__(self, inner: PersistenceLayer) -> None:
        super().__init__(inner)
        self.landed = asyncio.Event()
        self.proceed = asyncio.Event()

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        result = await super().claim(record, now=now)
        self.landed.set()
        await asyncio.wait_for(self.proceed.wait(), 10)
        return result


async def test_a_caller_cancelled_while_its_claim_is_in_flight_leaves_no_claim(
    store: PersistenceLayer,
) -> None:
    landing = LandedClaimStore(store)
    engine = engine_for(landing)
    fn = Counted()
    task = asyncio.create_task(engine.run(PAYMENT, fn))
    await asyncio.wait_for(landing.landed.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    key = engine.idempotency_key(PAYMENT)
    # The claim landed, its reply never reached the caller: the release follows.
    assert await engine.drain(timeout=20)
    assert await store.get(key) is None
    assert fn.count == 0
    assert await engine_for(store).run(PAYMENT, fn) == "paid"


# end async-only


async def test_the_lease_is_renewed_after_an_outage_longer_than_the_lease() -> None:
    inner = InMemoryPersistenceLayer()
    store = WrapperStore(inner)
    down = [True]
    store.fail["renew"] = lambda: ConnectionError("store unreachable") if down[0] else None
    engine = engine_for(store, in_progress_lease_seconds=0.3)
    key = engine.idempotency_key(PAYMENT)
    release = Event()

    async def slow() -> str:
        await wait_set(release, 20)
        return "paid"

    task = spawn(engine.run, PAYMENT, slow)
    # Renewals fail until the claim's in-progress expiry has passed.
    for renewals in range(1, 200):
        await store.wait_calls("renew", renewals)
        record = await inner.get(key)
        assert record is not None
        if record.is_orphaned(time.time()):
            break
    assert record is not None
    assert record.is_orphaned(time.time())
    down[0] = False  # the store is back, and nobody took the key over
    await store.wait_calls("renew", renewals + 1)
    renewed = await inner.get(key)
    assert renewed is not None
    assert not renewed.is_orphaned(time.time())
    release.set()
    assert await task.result() == "paid"
    stored = await inner.get(key)
    assert stored is not None
    assert stored.status is RecordStatus.COMPLETED


async def test_run_passes_positional_arguments_so_no_closure_binds_late() -> None:
    engine = engine_for(InMemoryPersistenceLayer())
    seen: list[str] = []

    async def process(record: dict[str, str]) -> str:
        seen.append(record["id"])
        return record["id"].upper()

    records = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    results = await gather(*(spawn(engine.run, r, process, r) for r in records))
    assert results == ["A", "B", "C"]
    assert sorted(seen) == ["a", "b", "c"]
    # The prefix comes from the function, not from the bound call.
    assert await engine.run(records[0], process, records[0]) == "A"
    assert seen.count("a") == 1


class UnreachableClaimStore(WrapperStore):
    """A store whose claims fail as our stores report an unreachable server."""

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self._record("claim", record.idempotency_key)
        try:
            raise ConnectionResetError("connection reset by peer")
        except ConnectionResetError as exc:
            raise IdempotencyPersistenceConnectionError("store unreachable", exc) from exc


async def test_a_store_error_keeps_the_clients_error_as_its_cause() -> None:
    engine = engine_for(UnreachableClaimStore(InMemoryPersistenceLayer()))
    with pytest.raises(IdempotencyPersistenceConnectionError) as raised:
        await engine.run(PAYMENT, Counted())
    # Powertools' text first; the store's error (its own message) is the cause, and the
    # client's error is the store error's cause.
    assert raised.value.args[0] == "Failed to save in progress record to idempotency store"
    assert isinstance(raised.value.__cause__, IdempotencyPersistenceConnectionError)
    assert isinstance(raised.value.__cause__.__cause__, ConnectionResetError)
    assert raised.value.transient is True
    assert await engine.drain(timeout=10)


async def test_a_completion_that_failed_on_a_connection_error_is_transient() -> None:
    engine = engine_for(FlakyCompletionStore(InMemoryPersistenceLayer(), failures=1))
    with pytest.raises(IdempotencyCompletionError) as raised:
        await engine.run(PAYMENT, Counted())
    assert raised.value.transient is True
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert await engine.drain(timeout=10)
