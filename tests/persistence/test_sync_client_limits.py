"""The bound on calls in flight on a client a sync store opened (`OpenedClients` with
`max_concurrency`, counted by `Slots`): held across threads, fresh in a forked child."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import pytest

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._sync.clients import OpenedClients
from aioidempotency._sync.concurrency import Slots
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

WAIT = 10.0  # seconds: bound on every wait for another thread


def test_at_most_max_concurrency_threads_are_inside_at_once() -> None:
    holder = OpenedClients(object, lambda client: None, max_concurrency=2)
    limit = holder.open().limit
    assert isinstance(limit, Slots)
    lock = threading.Lock()
    inside = most = 0
    entered = threading.Semaphore(0)
    go = threading.Event()

    def call() -> None:
        nonlocal inside, most
        with holder.open().limit:
            with lock:
                inside += 1
                most = max(most, inside)
            entered.release()
            go.wait(WAIT)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        assert entered.acquire(timeout=WAIT)
        assert entered.acquire(timeout=WAIT)
        assert not entered.acquire(timeout=0.2), "a third call got in"
        assert inside == 2
    finally:
        go.set()
        for thread in threads:
            thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert [entered.acquire(timeout=WAIT) for _ in range(4)] == [True] * 4
    assert most == 2
    assert inside == 0


def test_slots_refuse_a_negative_size() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Slots(-1)


def test_a_cache_store_refuses_a_bound_that_lets_no_call_in() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match="max_concurrency"):
        CachePersistenceLayer(url="redis://127.0.0.1:1", max_concurrency=0)
    with pytest.raises(IdempotencyPersistenceConfigError, match="max_concurrency"):
        CachePersistenceLayer.from_url("redis://127.0.0.1:1?max_concurrency=0")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_counts_afresh_on_its_own_client() -> None:
    holder = OpenedClients(object, lambda client: None, max_concurrency=1)
    parents = holder.open()
    with parents.limit:  # the parent's only slot is taken when the child is forked
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # threads of the test process
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                childs = holder.open()
                with childs.limit:  # would wait forever on the parent's slots
                    code = 0 if childs.client is not parents.client else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"child {pid} did not finish within 30 s")
            time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0
