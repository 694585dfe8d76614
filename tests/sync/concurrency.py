"""How the generated sync engine tests run calls concurrently: in threads.

The same names as `tests/concurrency.py` (asyncio), which the async tests import as
``.concurrency``; their sync twins, generated into this directory, get these. A sync
call cannot be interrupted from outside, so `Spawned.cancel` only cancels a call that
has not started (as `concurrent.futures.Future.cancel` does); tests of cancellation
are async-only. Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Event", "Spawned", "gather", "sleep", "spawn", "wait_set"]

T = TypeVar("T")

Event = threading.Event
sleep = time.sleep


def wait_set(event: threading.Event, timeout: float = 10.0) -> None:
    """Return once `event` is set; `TimeoutError` after `timeout` seconds."""
    if not event.wait(timeout):
        raise TimeoutError(f"the event was not set within {timeout}s")


class Spawned(Generic[T]):
    """A call running concurrently with the test, in a daemon thread of its own."""

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self.future = future

    def result(self, timeout: float = 10.0) -> T:
        """The call's result (or its exception); `TimeoutError` after `timeout` seconds."""
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:  # not the builtin one before Python 3.11
            raise TimeoutError(f"the call did not finish within {timeout}s") from None

    def cancel(self) -> bool:
        """Cancel the call if it has not started; False once it runs (it runs to its end)."""
        return self.future.cancel()


def spawn(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Spawned[T]:
    """Start ``fn(*args, **kwargs)`` in a daemon thread."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=f"spawned-{fn!r}"[:60], daemon=True).start()
    return Spawned(future)


def gather(*spawned: Spawned[T], timeout: float = 60.0) -> list[T]:
    """The results of `spawned`, in order (the first exception is raised);
    `TimeoutError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    return [s.result(max(0.0, deadline - time.monotonic())) for s in spawned]
