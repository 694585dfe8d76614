"""The bridge from sync code to an async store: every store call runs on the background
loop's thread and its errors reach the caller as they are; closing a loop closes the
stores it served, cancels what is left and reports a store that fails to close or does
not close in time."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from aioidempotency import IdempotencyPersistenceLayerError, RecordStatus
from aioidempotency._records import DataRecord
from aioidempotency._sync.bridge import BackgroundLoop, BridgedStore, background_loop
from tests.helpers import WrapperStore

OWNER = "owner-0123456789abcdef"


def claim_of(key: str, lease_ms: int) -> DataRecord:
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(time.time()) + 600,
        in_progress_expiry_timestamp=lease_ms,
        owner=OWNER,
    )


def test_each_store_call_runs_on_the_background_loop() -> None:
    inner = WrapperStore()
    store = BridgedStore(inner, timeout=30)
    now_ms = int(time.time() * 1000)
    assert store.claim(claim_of("k", now_ms + 60_000), now=time.time()).claimed
    store.renew(claim_of("k", now_ms + 120_000))
    record = store.get("k")
    assert record is not None
    assert record.in_progress_expiry_timestamp == now_ms + 120_000
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert store.get("k") is None
    store.close()

    assert [call.method for call in inner.calls] == [
        "claim",
        "renew",
        "get",
        "delete",
        "delete",
        "get",
    ]
    loop_thread = background_loop.thread
    assert loop_thread is not None
    assert {call.thread_ident for call in inner.calls} == {loop_thread.ident}
    assert loop_thread.ident != threading.get_ident()


def test_a_store_error_reaches_the_caller_as_it_is() -> None:
    inner = WrapperStore()
    inner.fail["get"] = lambda: IdempotencyPersistenceLayerError("the store broke")
    store = BridgedStore(inner, timeout=30)
    with pytest.raises(IdempotencyPersistenceLayerError, match="the store broke"):
        store.get("k")
    assert inner.counts["get"] == 1
    del inner.fail["get"]
    assert store.get("k") is None, "the bridge still serves the next call"


class _ClosingStore(WrapperStore):
    """`aclose` fails, or waits until `closed_by` is set (never, here)."""

    def __init__(self, *, fails: bool = False) -> None:
        super().__init__()
        self.fails = fails
        self.closed_by: asyncio.Event | None = None
        self.closes = 0

    async def aclose(self) -> None:
        self.closes += 1
        if self.fails:
            raise OSError("connection reset while closing")
        self.closed_by = asyncio.Event()
        await self.closed_by.wait()


def test_closing_a_loop_that_never_started_does_nothing() -> None:
    loop = BackgroundLoop()
    assert loop.close() is True
    assert loop.thread is None


def test_a_store_that_fails_to_close_is_logged_and_the_loop_still_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    background = BackgroundLoop()
    store = _ClosingStore(fails=True)
    loop = background.loop()
    background.remember(store)
    background.remember(store)
    with caplog.at_level(logging.WARNING, logger="aioidempotency"):
        assert background.close(timeout=10) is True
    assert store.closes == 1, "remembered once"
    assert loop.is_closed()
    assert "closing the stores at exit failed: OSError" in caplog.text
    assert background.loop() is not loop, "a later call starts a new loop"
    assert background.close(timeout=10) is True


def test_a_store_that_does_not_close_in_time_is_given_up_and_tasks_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    background = BackgroundLoop()
    store = _ClosingStore()
    loop = background.loop()
    background.remember(store)
    never = asyncio.run_coroutine_threadsafe(asyncio.Event().wait(), loop)
    with caplog.at_level(logging.WARNING, logger="aioidempotency"):
        assert background.close(timeout=0.2) is False
    assert store.closes == 1
    assert never.cancelled(), "a task left on the loop is cancelled"
    assert loop.is_closed()
    assert "closing the stores at exit did not finish within 0.2s" in caplog.text
