"""Faults injected into the `Batcher` behind automatic pipelining, through a `send` of
the test's own: a reply missing from a batch, a flush cancelled (its loop shutting
down), a batch failing with an error that is not an `Exception`, a size cap below 1.
Every caller ends with an outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aioidempotency._async.pipelining import Batcher
from tests.persistence.test_pipelining import wait_until


def _closed() -> Exception:
    return RuntimeError("closed")


class _Busy:
    """Keeps a batcher busy (a command in flight alone) until `release`, so that the
    next commands are queued."""

    def __init__(self, batcher: Batcher[Any]) -> None:
        self.reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(batcher.alone(self.reply))

    async def release(self) -> None:
        self.reply.set_result(None)
        await self.task


async def _busy(batcher: Batcher[Any]) -> _Busy:
    busy = _Busy(batcher)
    await wait_until(lambda: not batcher.idle, "a command in flight")
    return busy


async def test_a_batch_short_of_replies_fails_each_of_its_callers() -> None:
    async def send(commands: list[str]) -> list[Any]:
        return commands[:-1]

    batcher: Batcher[str] = Batcher(send, closed=_closed)
    release = await _busy(batcher)
    outcomes = await asyncio.gather(
        *(batcher.submit(c) for c in ("a", "b")), return_exceptions=True
    )
    await release.release()
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]
    assert "a batch of 2 got 1 replies" in str(outcomes[0])


async def test_a_cancelled_flush_cancels_its_callers() -> None:
    started = asyncio.Event()

    async def send(commands: list[str]) -> list[Any]:
        started.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError("unreachable")

    batcher: Batcher[str] = Batcher(send, closed=_closed)
    release = await _busy(batcher)
    calls = [batcher.submit(c) for c in ("a", "b")]
    await asyncio.wait_for(started.wait(), 5)
    for task in list(batcher._tasks):  # as a loop shutting down cancels every task
        task.cancel()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    await release.release()
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    await batcher.flushed()
    assert not batcher._tasks


async def test_a_batch_failing_with_a_base_exception_fails_its_callers() -> None:
    class Stop(BaseException):
        pass

    async def send(commands: list[str]) -> list[Any]:
        raise Stop

    batcher: Batcher[str] = Batcher(send, closed=_closed)
    release = await _busy(batcher)
    futures = [batcher.submit(c) for c in ("a", "b")]
    (flush,) = batcher._tasks
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    await release.release()
    assert all(isinstance(o, Stop) for o in outcomes)
    with pytest.raises(Stop):
        await flush  # the flush ends with it too (retrieved here)


def test_a_size_cap_below_one_is_refused() -> None:
    async def send(commands: list[str]) -> list[Any]:
        return list(commands)

    with pytest.raises(ValueError, match="max_batch"):
        Batcher(send, closed=_closed, max_batch=0)
