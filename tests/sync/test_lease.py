"""The sync lease keeper (`_sync/lease.py`, written by hand), through `Leases.keep` and
`Lease.stop`.

As in tests/test_lease.py: the keeper decides on a `Clock` that only the test moves, and
looks at its claims from its thread every half interval of real time; a test never
sleeps to let it run, it waits (bounded) for what `RenewalsSeen` records. Each renewal
runs in a thread of its own: the store records it, and a test joins it to know the
renewal is over. `Keeper.sweep` proves a pass of the keeper at the clock's time with a
witness claim due then. As in the asyncio keeper, a failed renewal is retried from its
own thread after a pause in real time, which `Lease.stop` cuts short.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest

from aioidempotency._records import DataRecord, RecordStatus, new_owner_token
from aioidempotency._sync import lease as lease_module
from aioidempotency._sync.lease import Lease, Leases
from aioidempotency._sync.memory import SyncInMemoryPersistenceLayer
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyPersistenceConnectionError,
)

LEASE = 0.3  # seconds: the keeper looks at its claims every LEASE / 6 of real time
INTERVAL = LEASE / 3  # a claim is due this long after it was kept or last renewed
T0 = 1_700_000_000.0  # the clock's start (epoch seconds)
WAIT = 10.0  # seconds: bound on every wait for another thread
EPSILON = 0.001  # seconds on the test's clock: just before or after a boundary


class Clock:
    """The keeper's clock: epoch seconds that move only when the test sets `now`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Renewal:
    """One renewal that reached the store: the record sent, the thread that sent it,
    when (monotonic seconds), and how it ended ("in flight" until it does)."""

    record: DataRecord
    thread: threading.Thread
    outcome: str = "in flight"
    at: float = dataclasses.field(default_factory=time.monotonic)


class RenewalsSeen(SyncInMemoryPersistenceLayer):
    """An in-memory store that records every renewal; `faults` and `hangs` inject
    failures on the keys they name."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.renewals: list[Renewal] = []
        self.faults: dict[str, list[Exception]] = {}  # raised in order, one per renewal
        self.hangs: dict[str, threading.Event] = {}  # renewals wait until it is set
        self.changed = threading.Condition()

    def _record(self, entry: Renewal, outcome: str | None = None) -> None:
        with self.changed:
            if outcome is None:
                self.renewals.append(entry)
            else:
                entry.outcome = outcome
            self.changed.notify_all()

    def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Return once `predicate()` holds, checked after each change; fail after WAIT."""
        with self.changed:
            assert self.changed.wait_for(predicate, WAIT), f"not within {WAIT} s: {what}"

    def renew(self, record: DataRecord) -> None:
        entry = Renewal(record, threading.current_thread())
        self._record(entry)
        key = record.idempotency_key
        outcome = "failed"
        try:
            hang = self.hangs.get(key)
            if hang is not None and not hang.wait(3 * WAIT):
                outcome = "hung too long"
                raise AssertionError(f"the renewal of {key} was never released")
            faults = self.faults.get(key)
            if faults:
                raise faults.pop(0)
            try:
                super().renew(record)
            except IdempotencyClaimLostError:
                outcome = "lost"
                raise
            outcome = "renewed"
        finally:
            self._record(entry, outcome)


class Keeper:
    """A `Leases` on a `Clock` and a `RenewalsSeen` store, with the test's helpers."""

    def __init__(self, lease: float = LEASE) -> None:
        self.lease = lease
        self.clock = Clock(T0)
        self.store = RenewalsSeen(self.clock)
        self.leases = Leases(self.store, lease=lease, clock=self.clock)
        self.kept: list[Lease] = []

    def claim(self) -> DataRecord:
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
        assert self.store.claim(record, now=now).claimed
        return record

    def keep(self) -> tuple[DataRecord, Lease]:
        """A new claim, kept from the clock's time on."""
        record = self.claim()
        lease = self.leases.keep(record)
        self.kept.append(lease)
        return record, lease

    def renewals(self, claim: DataRecord) -> list[Renewal]:
        with self.store.changed:
            return [
                r for r in self.store.renewals if r.record.idempotency_key == claim.idempotency_key
            ]

    def settled(self, claim: DataRecord, count: int) -> Renewal:
        """The `count`-th renewal of `claim`, once the store answered it."""
        self.store.until(
            lambda: (
                len(self.renewals(claim)) >= count
                and self.renewals(claim)[count - 1].outcome != "in flight"
            ),
            f"renewal {count} of {claim.idempotency_key} ended",
        )
        return self.renewals(claim)[count - 1]

    def ended(self, claim: DataRecord, count: int) -> Renewal:
        """The `count`-th renewal of `claim`, once answered and its thread finished."""
        entry = self.settled(claim, count)
        entry.thread.join(WAIT)
        assert not entry.thread.is_alive(), f"renewal {count} still running after {WAIT} s"
        return entry

    def sweep(self) -> None:
        """Return after a pass of the keeper that looked at every claim at the clock's
        current time: a witness claim kept a lease ago (so due now) was renewed in it.

        The keeper may read the clock while it is set back: it finds nothing due then (a
        claim due a lease ago was due now too). A test sweeps only when no renewal in
        flight has yet to read the clock."""
        now = self.clock.now
        witness = self.claim()
        self.clock.now = now - self.lease
        lease = self.leases.keep(witness)
        self.clock.now = now
        assert self.ended(witness, 1).outcome == "renewed"
        lease.stop()

    def close(self) -> None:
        for release in self.store.hangs.values():
            release.set()
        for lease in self.kept:
            lease.stop()
        for entry in self.store.renewals:
            entry.thread.join(WAIT)
            assert not entry.thread.is_alive(), "a renewal still running after the test"


@pytest.fixture
def keeper() -> Iterator[Keeper]:
    kept = Keeper()
    try:
        yield kept
    finally:
        kept.close()


def test_no_renewal_before_a_third_of_the_lease(keeper: Keeper) -> None:
    claim, lease = keeper.keep()
    for now in (T0, T0 + INTERVAL / 2, T0 + INTERVAL - EPSILON):
        keeper.clock.now = now
        keeper.sweep()
        assert keeper.renewals(claim) == [], now
    keeper.clock.now = T0 + INTERVAL + EPSILON
    assert keeper.ended(claim, 1).outcome == "renewed"
    assert not lease.lost


def test_a_renewal_writes_a_later_in_progress_expiry_under_the_same_owner(
    keeper: Keeper,
) -> None:
    claim, lease = keeper.keep()
    first = T0 + INTERVAL + EPSILON
    keeper.clock.now = first
    renewal = keeper.ended(claim, 1)
    expected = dataclasses.replace(claim, in_progress_expiry_timestamp=int((first + LEASE) * 1000))
    assert renewal.record == expected  # a copy of the claim: owner, hash, expiry kept
    assert renewal.record.owner == claim.owner
    assert renewal.outcome == "renewed"
    assert claim.in_progress_expiry_timestamp is not None
    assert expected.in_progress_expiry_timestamp is not None
    assert expected.in_progress_expiry_timestamp > claim.in_progress_expiry_timestamp
    assert keeper.store.get(claim.idempotency_key, now=first) == expected

    # The next renewal is due an interval after the one before, and carries on from it.
    keeper.clock.now = first + INTERVAL - 2 * EPSILON
    keeper.sweep()
    assert len(keeper.renewals(claim)) == 1
    second = first + INTERVAL + EPSILON
    keeper.clock.now = second
    renewal = keeper.ended(claim, 2)
    assert renewal.record == dataclasses.replace(
        claim, in_progress_expiry_timestamp=int((second + LEASE) * 1000)
    )
    assert keeper.store.get(claim.idempotency_key, now=second) == renewal.record
    assert not lease.lost


def test_a_claim_that_finishes_within_a_third_of_its_lease_never_renews(
    keeper: Keeper,
) -> None:
    claim, lease = keeper.keep()
    keeper.clock.now = T0 + INTERVAL - EPSILON
    lease.stop()
    keeper.clock.now = T0 + 10 * LEASE
    keeper.sweep()
    assert keeper.renewals(claim) == []
    assert not lease.lost


def test_a_failed_renewal_is_retried_with_backoff_and_the_claim_kept() -> None:
    # A longer lease, so the pause doubles twice before it reaches its cap (a third).
    keeper = Keeper(lease=0.6)
    interval = keeper.lease / 3
    try:
        claim, lease = keeper.keep()
        down = IdempotencyPersistenceConnectionError("the store is down")
        keeper.store.faults[claim.idempotency_key] = [down] * 4
        due = T0 + interval + EPSILON
        keeper.clock.now = due
        keeper.settled(claim, 2)
        # The outage outlasts the lease: the renewal goes on all the same, from its own
        # thread, pausing in real time (the test's clock does not move meanwhile).
        late = T0 + 5 * keeper.lease
        keeper.clock.now = late
        last = keeper.ended(claim, 5)
        renewals = keeper.renewals(claim)
        assert [r.outcome for r in renewals] == ["failed"] * 4 + ["renewed"]
        assert len({r.thread for r in renewals}) == 1  # one renewal, retried in its thread
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
        assert keeper.store.get(claim.idempotency_key, now=late) == last.record

        # Kept: the next renewal comes an interval later, and succeeds at once.
        keeper.clock.now = late + interval + EPSILON
        assert keeper.ended(claim, 6).outcome == "renewed"
    finally:
        keeper.close()


def test_stop_ends_a_pause_between_failed_renewals(
    keeper: Keeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_module, "RETRY_DELAY", 3600.0)  # far past any bound here
    claim, lease = keeper.keep()
    down = IdempotencyPersistenceConnectionError("the store is down")
    keeper.store.faults[claim.idempotency_key] = [down]
    keeper.clock.now = T0 + INTERVAL + EPSILON
    assert keeper.settled(claim, 1).outcome == "failed"
    deadline = time.monotonic() + WAIT
    while lease.wakeup is None:  # the renewal's thread is in its pause (bounded wait)
        assert time.monotonic() < deadline, "the failed renewal never paused"
        time.sleep(0.001)
    # It would pause for an hour; stop() ends the pause at once.
    started = time.monotonic()
    lease.stop()
    assert time.monotonic() - started < lease_module.STOP_TIMEOUT
    keeper.ended(claim, 1)  # its thread is over
    assert len(keeper.renewals(claim)) == 1  # and it did not try again
    assert not lease.lost


def test_a_renewal_that_fails_after_stop_is_not_retried(keeper: Keeper) -> None:
    claim, lease = keeper.keep()
    key = claim.idempotency_key
    release = keeper.store.hangs[key] = threading.Event()
    keeper.store.faults[key] = [IdempotencyPersistenceConnectionError("the store is down")]
    keeper.clock.now = T0 + INTERVAL + EPSILON
    keeper.store.until(lambda: len(keeper.renewals(claim)) == 1, "a renewal in flight")
    stopper = threading.Thread(target=lease.stop, name="stopper", daemon=True)
    stopper.start()
    deadline = time.monotonic() + WAIT
    while claim.owner in keeper.leases._leases:  # stop() forgot the lease (bounded wait)
        assert time.monotonic() < deadline, "stop() never forgot the lease"
        time.sleep(0.001)
    release.set()  # the renewal in flight now fails
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert keeper.ended(claim, 1).outcome == "failed"
    assert lease.wakeup is None  # it did not pause for another attempt
    assert len(keeper.renewals(claim)) == 1
    assert not lease.lost


@pytest.mark.parametrize("loss", ["taken_over", "deleted"])
def test_a_lost_claim_marks_the_lease_lost_and_stops_renewing(keeper: Keeper, loss: str) -> None:
    claim, lease = keeper.keep()
    _, other = keeper.keep()  # another claim of the same keeper, still held
    assert claim.in_progress_expiry_timestamp is not None
    orphaned = claim.in_progress_expiry_timestamp / 1000 + EPSILON
    if loss == "taken_over":
        # Another call takes the claim over once it looks orphaned.
        successor = dataclasses.replace(claim, owner=new_owner_token())
        assert keeper.store.claim(successor, now=orphaned).claimed
    else:
        assert keeper.store.delete(claim.idempotency_key)
    keeper.clock.now = orphaned
    renewal = keeper.ended(claim, 1)
    assert renewal.outcome == "lost"
    assert lease.lost
    stored = keeper.store.get(claim.idempotency_key, now=orphaned)
    if loss == "taken_over":
        assert stored == successor  # the renewal wrote nothing over the successor
    else:
        assert stored is None  # nor brought the claim back

    # No renewal after the loss, however long the call runs; the other claim renews.
    for step in range(1, 4):
        keeper.clock.now = orphaned + step * LEASE
        keeper.sweep()
    assert len(keeper.renewals(claim)) == 1
    assert not other.lost
    lease.stop()  # stopping a lost lease is harmless
    assert lease.lost


def test_stop_ends_the_renewals(keeper: Keeper) -> None:
    claim, lease = keeper.keep()
    keeper.clock.now = T0 + INTERVAL + EPSILON
    keeper.ended(claim, 1)
    lease.stop()
    lease.stop()  # twice is harmless
    for step in range(1, 4):
        keeper.clock.now = T0 + step * LEASE
        keeper.sweep()
    assert len(keeper.renewals(claim)) == 1
    assert not lease.lost


def test_stop_waits_for_a_renewal_in_flight(keeper: Keeper) -> None:
    claim, lease = keeper.keep()
    release = keeper.store.hangs[claim.idempotency_key] = threading.Event()
    keeper.clock.now = T0 + INTERVAL + EPSILON
    keeper.store.until(lambda: len(keeper.renewals(claim)) == 1, "a renewal in flight")
    renewal = keeper.renewals(claim)[0]
    seen_at_return: list[str] = []
    stopped = threading.Event()

    def stop() -> None:
        lease.stop()
        seen_at_return.append(renewal.outcome)
        stopped.set()

    stopper = threading.Thread(target=stop, name="stopper", daemon=True)
    stopper.start()
    # A check, not a synchronisation: stop() is still waiting while the renewal hangs.
    assert not stopped.wait(0.3), "stop() returned with a renewal in flight"
    assert renewal.outcome == "in flight"
    release.set()
    assert stopped.wait(WAIT)
    assert seen_at_return == ["renewed"]  # stop() returned after the renewal, not before
    stopper.join(WAIT)
    keeper.clock.now = T0 + 2 * LEASE
    keeper.sweep()
    assert len(keeper.renewals(claim)) == 1
    assert not lease.lost


def test_stop_gives_up_on_a_renewal_that_never_ends(
    keeper: Keeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_module, "STOP_TIMEOUT", 0.2)
    claim, lease = keeper.keep()
    release = keeper.store.hangs[claim.idempotency_key] = threading.Event()
    keeper.clock.now = T0 + INTERVAL + EPSILON
    keeper.store.until(lambda: len(keeper.renewals(claim)) == 1, "a renewal in flight")
    started = time.monotonic()
    lease.stop()
    assert time.monotonic() - started >= 0.9 * 0.2  # it did wait, for STOP_TIMEOUT
    renewal = keeper.renewals(claim)[0]
    assert renewal.outcome == "in flight"  # stop() returned without it
    release.set()
    assert keeper.ended(claim, 1).outcome == "renewed"
    keeper.clock.now = T0 + 2 * LEASE
    keeper.sweep()
    assert len(keeper.renewals(claim)) == 1  # and it was the last


def test_a_hung_renewal_holds_up_its_own_claim_only(keeper: Keeper) -> None:
    hung, hung_lease = keeper.keep()
    free, free_lease = keeper.keep()
    release = keeper.store.hangs[hung.idempotency_key] = threading.Event()
    now = T0 + INTERVAL + EPSILON
    keeper.clock.now = now
    assert keeper.ended(free, 1).outcome == "renewed"
    for count in (2, 3, 4):
        now += INTERVAL + EPSILON
        keeper.clock.now = now
        assert keeper.ended(free, count).outcome == "renewed"
    # One renewal in flight per claim: the hung claim, due at every pass, got no other.
    assert [r.outcome for r in keeper.renewals(hung)] == ["in flight"]
    release.set()
    assert keeper.ended(hung, 1).outcome == "renewed"
    # Released, it renews again when next due.
    now += INTERVAL + EPSILON
    keeper.clock.now = now
    assert keeper.ended(hung, 2).outcome == "renewed"
    assert not hung_lease.lost
    assert not free_lease.lost


def test_many_claims_renew_independently(keeper: Keeper) -> None:
    early = [keeper.keep() for _ in range(20)]
    keeper.clock.now = T0 + INTERVAL / 2
    late = [keeper.keep() for _ in range(20)]
    keeper.clock.now = T0 + INTERVAL + EPSILON  # the early claims are due, not the late
    for claim, _ in early:
        assert keeper.ended(claim, 1).outcome == "renewed"
    keeper.sweep()
    assert all(keeper.renewals(claim) == [] for claim, _ in late)
    for _, lease in early[:10]:
        lease.stop()
    keeper.clock.now = T0 + INTERVAL * 1.5 + EPSILON
    for claim, _ in late:
        assert keeper.ended(claim, 1).outcome == "renewed"
    keeper.clock.now = T0 + 2 * INTERVAL + 2 * EPSILON
    for claim, _ in early[10:]:
        assert keeper.ended(claim, 2).outcome == "renewed"
    keeper.sweep()
    assert all(len(keeper.renewals(claim)) == 1 for claim, _ in early[:10])
    assert not any(lease.lost for _, lease in early + late)


def test_claims_kept_from_many_threads_are_all_renewed(keeper: Keeper) -> None:
    claims = [keeper.claim() for _ in range(16)]
    leases: list[Lease] = []
    lock = threading.Lock()

    def keep(claim: DataRecord) -> None:
        lease = keeper.leases.keep(claim)
        with lock:
            leases.append(lease)

    threads = [threading.Thread(target=keep, args=(claim,), daemon=True) for claim in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    keeper.kept.extend(leases)
    keeper.clock.now = T0 + INTERVAL + EPSILON
    for claim in claims:
        assert keeper.ended(claim, 1).outcome == "renewed"
    assert len(keeper.store.renewals) == len(claims)


# -- a forked child ----------------------------------------------------------------------

CHILD_FAILED = 1


def in_child(check: Callable[[], bool]) -> int:
    """Fork, run `check` in the child; the child's exit code (0: it returned True). The
    end of file of a pipe says the child is exiting (no polling), within 3 * WAIT or it is
    killed."""
    reader, writer = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # threads of the test process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = CHILD_FAILED
        try:
            os.close(reader)
            code = 0 if check() else 2
        finally:
            os._exit(code)
    os.close(writer)
    try:
        ready, _, _ = select.select([reader], [], [], 3 * WAIT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"child {pid} did not finish within {3 * WAIT} s")
        assert os.read(reader, 1) == b"", "the child writes nothing"
    finally:
        os.close(reader)
        _, status = os.waitpid(pid, 0)  # exiting (end of file) or killed
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_keeps_its_claims_with_a_keeper_of_its_own(keeper: Keeper) -> None:
    claim, lease = keeper.keep()
    now = T0 + INTERVAL + EPSILON
    keeper.clock.now = now
    keeper.ended(claim, 1)  # the parent's keeper thread runs; no renewal in flight

    def child() -> bool:
        # The parent's keeper thread is not in the child: a claim kept here is renewed
        # by a keeper the child starts; the parent's claim is the parent's to renew.
        keeper.clock.now = now + EPSILON
        own, own_lease = keeper.keep()
        try:
            later = now + INTERVAL + 2 * EPSILON  # the parent's claim is due too
            keeper.clock.now = later
            renewed = keeper.ended(own, 1).outcome == "renewed"
            keeper.clock.now = later + INTERVAL + EPSILON
            renewed = renewed and keeper.ended(own, 2).outcome == "renewed"
            return renewed and len(keeper.renewals(claim)) == 1 and not own_lease.lost
        finally:
            own_lease.stop()

    assert in_child(child) == 0
    # The parent's keeper goes on: its claim renews when next due.
    keeper.clock.now = now + INTERVAL + 2 * EPSILON
    assert keeper.ended(claim, 2).outcome == "renewed"
    assert [r.record.idempotency_key for r in keeper.store.renewals] == [claim.idempotency_key] * 2
    assert not lease.lost
