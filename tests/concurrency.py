"""How the engine tests run calls concurrently, in asyncio.

`tests/sync/concurrency.py` has the same names for threads: a test written with these
(``from .concurrency import ...``) is generated into its sync twin by tools/unasync.py,
whose relative import then finds the thread-based ones. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["Event", "Spawned", "gather", "sleep", "spawn", "wait_set"]

T = TypeVar("T")

Event = asyncio.Event
sleep = asyncio.sleep


async def wait_set(event: asyncio.Event, timeout: float = 10.0) -> None:
    """Return once `event` is set; `TimeoutError` after `timeout` seconds."""
    await asyncio.wait_for(event.wait(), timeout)


class Spawned(Generic[T]):
    """A call running concurrently with the test (a task of the running loop)."""

    def __init__(self, task: asyncio.Task[T]) -> None:
        self.task = task

    async def result(self, timeout: float = 10.0) -> T:
        """The call's result (or its exception); `TimeoutError` after `timeout` seconds."""
        return await asyncio.wait_for(self.task, timeout)

    def cancel(self) -> bool:
        """Cancel the call: it sees a `CancelledError` at its next await."""
        return self.task.cancel()


def spawn(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> Spawned[T]:
    """Start ``fn(*args, **kwargs)`` as a task; it runs once the test awaits."""

    async def call() -> T:
        return await fn(*args, **kwargs)

    return Spawned(asyncio.create_task(call()))


async def gather(*spawned: Spawned[T], timeout: float = 60.0) -> list[T]:
    """The results of `spawned`, in order (the first exception is raised);
    `TimeoutError` after `timeout` seconds."""
    return list(await asyncio.wait_for(asyncio.gather(*(s.task for s in spawned)), timeout))
