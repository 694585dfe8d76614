"""The asyncio primitives the engine is written with (hand-written in both worlds).

The engine, flights and stores use only these names for waiting, sleeping and
background work, so that their sync twin, generated from them, gets the thread-based
primitives of ``_sync/concurrency.py`` under the same names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar, cast

from typing_extensions import TypeVarTuple, Unpack

__all__ = ["Background", "Cancelled", "Outcome", "outcomes", "scope", "shielded", "sleep"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

logger = logging.getLogger("aioidempotency")

Cancelled = asyncio.CancelledError
"""What interrupts a call from outside: the task's cancellation."""

sleep = asyncio.sleep


def scope() -> object:
    """What in-process calls can share a result within: the running event loop."""
    return asyncio.get_running_loop()


async def shielded(operation: Callable[[], Awaitable[T]]) -> T:
    """Await ``operation()`` in its own task, so cancelling the caller does not
    interrupt it; the caller still sees its cancellation."""
    task = asyncio.ensure_future(operation())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_failure)
        raise


async def outcomes(calls: Iterable[Awaitable[T]]) -> list[T | Exception]:
    """Await `calls` concurrently; each one's result, or its failure, in its place. (A
    cancellation is raised, after the calls are cancelled.) Async only: it serves the
    batch path, which the sync twin does not have."""
    done = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome
    return cast(list[T | Exception], done)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("store operation failed after cancellation", exc_info=task.exception())


class Outcome(Generic[T]):
    """A value set once, that calls of the same event loop wait for."""

    def __init__(self) -> None:
        self._future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def set(self, value: T) -> None:
        """Set the value (the first one counts)."""
        if not self._future.done():
            self._future.set_result(value)

    async def wait(self, timeout: float) -> T:
        """The value, once set; `TimeoutError` after `timeout` seconds."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError from None


class Background:
    """Bounded work that outlives the call that started it (releases, completions),
    run as tasks of the loop that started it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Callable[[Unpack[Ts]], Awaitable[None]], *args: Unpack[Ts]) -> None:
        """Run ``work(*args)`` in the background."""
        coroutine = cast(Coroutine[Any, Any, None], work(*args))
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> bool:
        """Wait for the work started on the running loop; True if it all finished
        within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pending = {task for task in self._tasks if task.get_loop() is loop}
            left = deadline - loop.time()
            if not pending:
                return True
            if left <= 0:
                return False
            # A finished task may start another (a claim's release): look again.
            await asyncio.wait(pending, timeout=left)
