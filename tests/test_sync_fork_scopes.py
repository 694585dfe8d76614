"""A forked child leaves its parent's sync flights, lease keeper and background work
behind: the one fork counter (`_forks.fork_generation`) tells them apart."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable

import pytest

from aioidempotency._forks import fork_generation
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._sync.concurrency import Background, scope
from aioidempotency._sync.flights import Flights
from aioidempotency._sync.lease import Leases
from aioidempotency._sync.memory import SyncInMemoryPersistenceLayer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

WAIT = 10.0  # seconds: bound on every wait for another thread
CHILD_FAILED = 1


def in_child(check: Callable[[], bool]) -> int:
    """Fork, run `check` in the child; the child's exit code (0: it returned True)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # threads of the test process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = CHILD_FAILED
        try:
            code = 0 if check() else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 3 * WAIT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {3 * WAIT} s")
        time.sleep(0.02)


def test_scope_is_one_object_in_a_process_and_another_in_a_child() -> None:
    here = scope()
    assert scope() is here
    assert here == fork_generation()
    assert in_child(lambda: scope() is not here and scope() is scope()) == 0


def test_a_child_does_not_join_a_flight_of_its_parent() -> None:
    flights = Flights()
    parents = flights.start("fn#k", None)  # running in the parent when it forks

    def child() -> bool:
        if flights.find("fn#k") is not None:
            return False  # would wait for a thread that is not in this process
        own = flights.start("fn#k", None)
        return flights.find("fn#k") is own

    assert in_child(child) == 0
    assert flights.find("fn#k") is parents


class RenewalsSeen(SyncInMemoryPersistenceLayer):
    """An in-memory store that says when a renewal reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.renewed = threading.Event()

    def renew(self, record: DataRecord) -> None:
        super().renew(record)
        self.renewed.set()


def _claim(store: RenewalsSeen) -> DataRecord:
    now = time.time()
    record = DataRecord(
        f"fn#{uuid.uuid4().hex}",
        RecordStatus.INPROGRESS,
        int(now) + 600,
        in_progress_expiry_timestamp=int((now + 60) * 1000),
        owner=uuid.uuid4().hex,
    )
    assert store.claim(record, now=now).claimed
    return record


def test_a_child_keeps_its_leases_with_a_keeper_thread_of_its_own() -> None:
    store = RenewalsSeen()
    leases = Leases(store, lease=0.3, clock=time.time)
    lease = leases.keep(_claim(store))  # the parent's keeper thread runs at the fork
    assert store.renewed.wait(WAIT)
    try:

        def child() -> bool:
            store.renewed.clear()
            kept = leases.keep(_claim(store))
            try:
                return store.renewed.wait(WAIT) and not kept.lost
            finally:
                kept.stop()

        # The keeper thread takes this lock every half interval: held at the fork, the
        # child must not wait for it.
        with leases._lock:
            assert in_child(child) == 0
        store.renewed.clear()
        assert store.renewed.wait(WAIT), "the parent's keeper still renews"
    finally:
        lease.stop()


def test_a_child_runs_and_drains_background_work_of_its_own() -> None:
    background = Background()
    release = threading.Event()

    def busy() -> None:
        release.wait(WAIT)

    background.spawn(busy)  # the parent's, running at the fork
    try:

        def child() -> bool:
            done = threading.Event()
            background.spawn(done.set)
            return background.drain(WAIT) and done.is_set()

        # A finishing thread takes this lock: held at the fork, the child must not wait.
        with background._lock:
            assert in_child(child) == 0
        assert not background.drain(0.05), "the parent's work is still running"
    finally:
        release.set()
    assert background.drain(WAIT)


def test_a_child_that_first_drains_does_not_wait_for_its_parents_work() -> None:
    background = Background()
    release = threading.Event()

    def busy() -> None:
        release.wait(WAIT)

    background.spawn(busy)  # the parent's, running at the fork
    try:

        def child() -> bool:
            started = time.monotonic()
            return background.drain(WAIT) and time.monotonic() - started < WAIT / 2

        with background._lock:  # held at the fork: the child must not wait for it
            assert in_child(child) == 0
        assert not background.drain(0.05), "the parent's work is still running"
    finally:
        release.set()
    assert background.drain(WAIT)


def test_a_child_that_first_stops_a_lease_of_its_parent_leaves_the_parent_renewing() -> None:
    store = RenewalsSeen()
    leases = Leases(store, lease=0.3, clock=time.time)
    lease = leases.keep(_claim(store))
    assert store.renewed.wait(WAIT)
    try:

        def child() -> bool:
            lease.stop()  # the parent's lease: the child forgets the parent's claims
            return not leases._leases

        with leases._lock:  # held at the fork: the child must not wait for it
            assert in_child(child) == 0
        store.renewed.clear()
        assert store.renewed.wait(WAIT), "the parent's keeper still renews"
    finally:
        lease.stop()
