"""The asyncio lease keeper (`_async/lease.py`), through `Leases.keep` and `Lease.stop`.

The keeper decides on the clock it is given (`Clock`, which only the test moves) and
looks at its claims on the loop's real timer, every half interval: a test never sleeps
to let it run, it waits (bounded) for what the store records. `RenewalsSeen` is an
in-memory store that records each renewal and, for fault injection, fails, hangs or
swallows a cancellation on the keys a test names. `Keeper.sweep` proves a pass of the
keeper at the clock's current time: a witness claim, due at that time, is renewed in
the same pass that looks at every other claim, so a claim the pass did not renew was
not due.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aioidempotency._async import lease as lease_module
from aioidempotency._async.lease import Lease, Leases
from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._records import DataRecord, RecordStatus, new_owner_token
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyPersistenceConnectionError,
)

LEASE = 0.3  # seconds: the keeper looks at its claims every LEASE / 6 of real time
INTERVAL = LEASE / 3  # a claim is due this long after it was kept or last renewed
T0 = 1_700_000_000.0  # the clock's start (epoch seconds)
WAIT = 10.0  # seconds: bound on every wait for the keeper
EPSILON = 0.001  # seconds on the test's clock: just before or after a boundary


class Clock:
    """The keeper's clock: epoch seconds that move only when the test sets `now`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Renewal:
    """One renewal that reached the store: the record sent, the task that sent it, when
    (monotonic seconds), and how it ended ("in flight" until it does)."""

    record: DataRecord
    task: asyncio.Task[Any]
    at: float
    outcome: str = "in flight"


class RenewalsSeen(InMemoryPersistenceLayer):
    """An in-memory store that records every renewal; `faults`, `hangs` and `stubborn`
    inject failures on the keys they name."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.renewals: list[Renewal] = []
        self.faults: dict[str, list[Exception]] = {}  # raised in order, one per renewal
        self.hangs: dict[str, asyncio.Event] = {}  # renewals wait until it is set
        self.stubborn: set[str] = set()  # hung renewals that swallow a cancellation
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Return once `predicate()` holds, checked after each change; fail after WAIT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not predicate():
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"not within {WAIT} s: {what}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def renew(self, record: DataRecord) -> None:
        task = asyncio.current_task()
        assert task is not None
        entry = Renewal(record, task, time.monotonic())
        self.renewals.append(entry)
        self._notify()
        key = record.idempotency_key
        try:
            hang = self.hangs.get(key)
            if hang is not None:
                await self._hang(hang, key)
            faults = self.faults.get(key)
            if faults:
                raise faults.pop(0)
            await super().renew(record)
        except IdempotencyClaimLostError:
            entry.outcome = "lost"
            raise
        except asyncio.CancelledError:
            # a client tidying up on its way out: the renewal ends a few loop turns later
            for _ in range(5):
                await asyncio.sleep(0)
            entry.outcome = "cancelled"
            raise
        except Exception:
            entry.outcome = "failed"
            raise
        else:
            entry.outcome = "renewed"
        finally:
            self._notify()

    async def _hang(self, release: asyncio.Event, key: str) -> None:
        for _ in range(3):  # a stubborn client swallows up to two cancellations
            try:
                await release.wait()
                return
            except asyncio.CancelledError:
                if key not in self.stubborn:
                    raise
        raise AssertionError(f"the renewal of {key} was cancelled three times")


class Keeper:
    """A `Leases` on a `Clock` and a `RenewalsSeen` store, with the test's helpers."""

    def __init__(self, lease: float = LEASE) -> None:
        self.lease = lease
        self.clock = Clock(T0)
        self.store = RenewalsSeen(self.clock)
        self.leases = Leases(self.store, lease=lease, clock=self.clock)
        self.kept: list[Lease] = []

    async def claim(self) -> DataRecord:
        """A new claim, written to the store at the clock's time."""
        now = self.clock.now
        record = DataRecord(
            f"fn#{new_owner_token()}",
            RecordStatus.INPROGRESS,
            int(now) + 600,
            in_progress_expiry_timestamp=int((now + self.lease) * 1000),
            payload_hash="5d41402abc4b2a76b9719d911017c592",
            owner=new_owner_token(),
        )
        assert (await self.store.claim(record, now=now)).claimed
        return record

    async def keep(self) -> tuple[DataRecord, Lease]:
        """A new claim, kept from the clock's time on."""
        record = await self.claim()
        lease = self.leases.keep(record)
        self.kept.append(lease)
        return record, lease

    def renewals(self, claim: DataRecord) -> list[Renewal]:
        return [r for r in self.store.renewals if r.record.idempotency_key == claim.idempotency_key]

    async def settled(self, claim: DataRecord, count: int) -> Renewal:
        """The `count`-th renewal of `claim`, once the store answered it."""
        await self.store.until(
            lambda: (
                len(self.renewals(claim)) >= count
                and self.renewals(claim)[count - 1].outcome != "in flight"
            ),
            f"renewal {count} of {claim.idempotency_key} ended",
        )
        return self.renewals(claim)[count - 1]

    async def ended(self, claim: DataRecord, count: int) -> Renewal:
        """The `count`-th renewal of `claim`, once answered and its task finished (a task
        retrying a failed renewal finishes when a retry succeeds)."""
        entry = await self.settled(claim, count)
        done, _ = await asyncio.wait({entry.task}, timeout=WAIT)
        assert done, f"the task of renewal {count} did not finish within {WAIT} s"
        return entry

    async def sweep(self) -> None:
        """Return after a pass of the keeper that looked at every claim at the clock's
        current time: a witness claim kept a lease ago (so due now) was renewed in it."""
        now = self.clock.now
        witness = await self.claim()
        self.clock.now = now - self.lease  # no await until the clock is back: no pass runs
        lease = self.leases.keep(witness)
        self.clock.now = now
        await self.ended(witness, 1)
        assert self.renewals(witness)[0].outcome == "renewed"
        await lease.stop()

    async def close(self) -> None:
        for release in self.store.hangs.values():
            release.set()
        for lease in self.kept:
            await asyncio.wait_for(lease.stop(), WAIT)
        tasks = {entry.task for entry in self.store.renewals}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=WAIT)
            assert not pending, "renewals still running after the test"


@pytest.fixture
async def keeper() -> AsyncIterator[Keeper]:
    kept = Keeper()
    try:
        yield kept
    finally:
        await kept.close()


async def test_no_renewal_before_a_third_of_the_lease(keeper: Keeper) -> None:
    claim, lease = await keeper.keep()
    for now in (T0, T0 + INTERVAL / 2, T0 + INTERVAL - EPSILON):
        keeper.clock.now = now
        await keeper.sweep()
        assert keeper.renewals(claim) == [], now
    keeper.clock.now = T0 + INTERVAL + EPSILON
    assert (await keeper.ended(claim, 1)).outcome == "renewed"
    assert not lease.lost


async def test_a_renewal_writes_a_later_in_progress_expiry_under_the_same_owner(
    keeper: Keeper,
) -> None:
    claim, lease = await keeper.keep()
    first = T0 + INTERVAL + EPSILON
    keeper.clock.now = first
    renewal = await keeper.ended(claim, 1)
    expected = dataclasses.replace(claim, in_progress_expiry_timestamp=int((first + LEASE) * 1000))
    assert renewal.record == expected  # a copy of the claim: owner, hash, expiry kept
    assert renewal.record.owner == claim.owner
    assert renewal.outcome == "renewed"
    assert claim.in_progress_expiry_timestamp is not None
    assert expected.in_progress_expiry_timestamp is not None
    assert expected.in_progress_expiry_timestamp > claim.in_progress_expiry_timestamp
    assert await keeper.store.get(claim.idempotency_key, now=first) == expected

    # The next renewal is due an interval after the one before, and carries on from it.
    keeper.clock.now = first + INTERVAL - 2 * EPSILON
    await keeper.sweep()
    assert len(keeper.renewals(claim)) == 1
    second = first + INTERVAL + EPSILON
    keeper.clock.now = second
    renewal = await keeper.ended(claim, 2)
    assert renewal.record == dataclasses.replace(
        claim, in_progress_expiry_timestamp=int((second + LEASE) * 1000)
    )
    assert await keeper.store.get(claim.idempotency_key, now=second) == renewal.record
    assert not lease.lost


async def test_a_claim_that_finishes_within_a_third_of_its_lease_never_renews(
    keeper: Keeper,
) -> None:
    claim, lease = await keeper.keep()
    keeper.clock.now = T0 + INTERVAL - EPSILON
    await lease.stop()
    keeper.clock.now = T0 + 10 * LEASE
    await keeper.sweep()
    assert keeper.renewals(claim) == []
    assert not lease.lost


async def test_a_failed_renewal_is_retried_with_backoff_and_the_claim_kept() -> None:
    # A longer lease, so the pause doubles twice before it reaches its cap (a third).
    keeper = Keeper(lease=0.6)
    interval = keeper.lease / 3
    try:
        claim, lease = await keeper.keep()
        down = IdempotencyPersistenceConnectionError("the store is down")
        keeper.store.faults[claim.idempotency_key] = [down] * 4
        due = T0 + interval + EPSILON
        keeper.clock.now = due
        await keeper.settled(claim, 2)
        # The outage outlasts the lease: the renewal goes on all the same.
        late = T0 + 5 * keeper.lease
        keeper.clock.now = late
        last = await keeper.ended(claim, 5)
        renewals = keeper.renewals(claim)
        assert [r.outcome for r in renewals] == ["failed"] * 4 + ["renewed"]
        assert all(r.record.owner == claim.owner for r in renewals)
        assert renewals[0].record.in_progress_expiry_timestamp == int((due + 0.6) * 1000)
        assert last.record.in_progress_expiry_timestamp == int((late + 0.6) * 1000)
        pauses = [b.at - a.at for a, b in itertools.pairwise(renewals)]
        first = lease_module.RETRY_DELAY
        expected = [first, 2 * first, min(4 * first, interval), min(8 * first, interval)]
        assert expected[2] > expected[1]  # the pause grew twice before its cap
        for pause, floor in zip(pauses, expected, strict=True):
            assert pause >= 0.9 * floor, (pauses, expected)
        assert not lease.lost
        assert await keeper.store.get(claim.idempotency_key, now=late) == last.record

        # Kept: the next renewal comes an interval later, and succeeds at once.
        keeper.clock.now = late + interval + EPSILON
        assert (await keeper.ended(claim, 6)).outcome == "renewed"
    finally:
        await keeper.close()


@pytest.mark.parametrize("loss", ["taken_over", "deleted"])
async def test_a_lost_claim_marks_the_lease_lost_and_stops_renewing(
    keeper: Keeper, loss: str
) -> None:
    claim, lease = await keeper.keep()
    _, other = await keeper.keep()  # another claim of the same keeper, still held
    assert claim.in_progress_expiry_timestamp is not None
    orphaned = claim.in_progress_expiry_timestamp / 1000 + EPSILON
    if loss == "taken_over":
        # Another call takes the claim over once it looks orphaned.
        successor = dataclasses.replace(claim, owner=new_owner_token())
        assert (await keeper.store.claim(successor, now=orphaned)).claimed
    else:
        assert await keeper.store.delete(claim.idempotency_key)
    keeper.clock.now = orphaned
    renewal = await keeper.ended(claim, 1)
    assert renewal.outcome == "lost"
    assert lease.lost
    stored = await keeper.store.get(claim.idempotency_key, now=orphaned)
    if loss == "taken_over":
        assert stored == successor  # the renewal wrote nothing over the successor
    else:
        assert stored is None  # nor brought the claim back

    # No renewal after the loss, however long the call runs; the other claim renews.
    for step in range(1, 4):
        keeper.clock.now = orphaned + step * LEASE
        await keeper.sweep()
    assert len(keeper.renewals(claim)) == 1
    assert not other.lost
    await lease.stop()  # stopping a lost lease is harmless
    assert lease.lost


async def test_stop_ends_the_renewals(keeper: Keeper) -> None:
    claim, lease = await keeper.keep()
    keeper.clock.now = T0 + INTERVAL + EPSILON
    await keeper.ended(claim, 1)
    await lease.stop()
    await lease.stop()  # twice is harmless
    for step in range(1, 4):
        keeper.clock.now = T0 + step * LEASE
        await keeper.sweep()
    assert len(keeper.renewals(claim)) == 1
    assert not lease.lost


async def test_stop_waits_for_a_renewal_in_flight(keeper: Keeper) -> None:
    claim, lease = await keeper.keep()
    keeper.store.hangs[claim.idempotency_key] = asyncio.Event()  # never set before stop
    keeper.clock.now = T0 + INTERVAL + EPSILON
    await keeper.store.until(lambda: len(keeper.renewals(claim)) == 1, "a renewal in flight")
    renewal = keeper.renewals(claim)[0]
    assert renewal.outcome == "in flight"
    await lease.stop()  # bounded by the keeper's STOP_TIMEOUT
    # stop() returned once the renewal was over (cancelled), not before
    assert renewal.outcome == "cancelled"
    assert renewal.task.done()
    assert not lease.lost
    keeper.clock.now = T0 + 2 * LEASE
    await keeper.sweep()
    assert len(keeper.renewals(claim)) == 1


async def test_stop_gives_up_on_a_renewal_that_ignores_its_cancellation(
    keeper: Keeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_module, "STOP_TIMEOUT", 0.2)
    claim, lease = await keeper.keep()
    release = keeper.store.hangs[claim.idempotency_key] = asyncio.Event()
    keeper.store.stubborn.add(claim.idempotency_key)
    keeper.clock.now = T0 + INTERVAL + EPSILON
    await keeper.store.until(lambda: len(keeper.renewals(claim)) == 1, "a renewal in flight")
    started = time.monotonic()
    await asyncio.wait_for(lease.stop(), WAIT)
    assert time.monotonic() - started >= 0.9 * 0.2  # it did wait, for STOP_TIMEOUT
    renewal = keeper.renewals(claim)[0]
    assert renewal.outcome == "in flight"  # stop() returned without it
    release.set()
    assert (await keeper.ended(claim, 1)).outcome == "renewed"
    keeper.clock.now = T0 + 2 * LEASE
    await keeper.sweep()
    assert len(keeper.renewals(claim)) == 1  # and it was the last


async def test_a_hung_renewal_holds_up_its_own_claim_only(keeper: Keeper) -> None:
    hung, hung_lease = await keeper.keep()
    free, free_lease = await keeper.keep()
    release = keeper.store.hangs[hung.idempotency_key] = asyncio.Event()
    now = T0 + INTERVAL + EPSILON
    keeper.clock.now = now
    assert (await keeper.ended(free, 1)).outcome == "renewed"
    for count in (2, 3, 4):
        now += INTERVAL + EPSILON
        keeper.clock.now = now
        assert (await keeper.ended(free, count)).outcome == "renewed"
    # One renewal in flight per claim: the hung claim, due at every pass, got no other.
    hung_renewals = keeper.renewals(hung)
    assert [r.outcome for r in hung_renewals] == ["in flight"]
    release.set()
    assert (await keeper.ended(hung, 1)).outcome == "renewed"
    # Released, it renews again when next due.
    now += INTERVAL + EPSILON
    keeper.clock.now = now
    assert (await keeper.ended(hung, 2)).outcome == "renewed"
    assert not hung_lease.lost
    assert not free_lease.lost


async def test_many_claims_renew_independently(keeper: Keeper) -> None:
    early = [await keeper.keep() for _ in range(20)]
    keeper.clock.now = T0 + INTERVAL / 2
    late = [await keeper.keep() for _ in range(20)]
    keeper.clock.now = T0 + INTERVAL + EPSILON  # the early claims are due, not the late
    for claim, _ in early:
        assert (await keeper.ended(claim, 1)).outcome == "renewed"
    await keeper.sweep()
    assert all(keeper.renewals(claim) == [] for claim, _ in late)
    for _, lease in early[:10]:
        await lease.stop()
    keeper.clock.now = T0 + INTERVAL * 1.5 + EPSILON
    for claim, _ in late:
        assert (await keeper.ended(claim, 1)).outcome == "renewed"
    keeper.clock.now = T0 + 2 * INTERVAL + 2 * EPSILON
    for claim, _ in early[10:]:
        assert (await keeper.ended(claim, 2)).outcome == "renewed"
    await keeper.sweep()
    assert all(len(keeper.renewals(claim)) == 1 for claim, _ in early[:10])
    assert not any(lease.lost for _, lease in early + late)
