"""The primitives both engines wait with (``_async/concurrency.py`` and its hand-written
sync twin): a shielded store operation that fails after its caller was cancelled is
logged, not lost; background work that outlives a drain's timeout is reported; a value
never set times out."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from aioidempotency._async import concurrency as async_concurrency
from aioidempotency._sync import concurrency as sync_concurrency

BOUND = 15.0


class _Signal(logging.Handler):
    """Sets `logged` (on the loop that emits) when a record is logged."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.logged = asyncio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.logged.set()


async def test_a_shielded_operation_failing_after_cancellation_is_logged() -> None:
    started, go = asyncio.Event(), asyncio.Event()

    async def operation() -> str:
        started.set()
        await go.wait()
        raise ConnectionError("the store went away")

    caller = asyncio.ensure_future(async_concurrency.shielded(operation))
    await asyncio.wait_for(started.wait(), BOUND)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller

    signal = _Signal()
    logger = logging.getLogger("aioidempotency")
    logger.addHandler(signal)
    try:
        go.set()
        await asyncio.wait_for(signal.logged.wait(), BOUND)
    finally:
        logger.removeHandler(signal)
    (record,) = signal.records
    assert record.getMessage() == "store operation failed after cancellation"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ConnectionError)


async def test_a_shielded_operation_that_succeeds_after_cancellation_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started, go = asyncio.Event(), asyncio.Event()
    finished = asyncio.get_running_loop().create_future()

    async def operation() -> str:
        started.set()
        await go.wait()
        finished.set_result("stored")
        return "stored"

    caller = asyncio.ensure_future(async_concurrency.shielded(operation))
    await asyncio.wait_for(started.wait(), BOUND)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    go.set()
    assert await asyncio.wait_for(finished, BOUND) == "stored", "the operation still ran"
    assert "failed after cancellation" not in caplog.text


async def test_async_background_work_past_the_drain_timeout_is_reported() -> None:
    background = async_concurrency.Background()
    go = asyncio.Event()
    done: list[str] = []

    async def work(name: str) -> None:
        await go.wait()
        done.append(name)

    background.spawn(work, "release")
    assert await background.drain(0.05) is False
    assert done == []
    go.set()
    assert await background.drain(BOUND) is True
    assert done == ["release"]


def test_sync_background_work_past_the_drain_timeout_is_reported() -> None:
    background = sync_concurrency.Background()
    go = threading.Event()
    done: list[str] = []

    def work(name: str) -> None:
        assert go.wait(BOUND)
        done.append(name)

    background.spawn(work, "release")
    assert background.drain(0.05) is False
    assert done == []
    go.set()
    assert background.drain(BOUND) is True
    assert done == ["release"]


def test_a_sync_outcome_never_set_times_out_and_the_first_value_counts() -> None:
    outcome: sync_concurrency.Outcome[str] = sync_concurrency.Outcome()
    with pytest.raises(TimeoutError):
        outcome.wait(0.01)
    outcome.set("first")
    outcome.set("second")
    assert outcome.wait(0) == "first"
