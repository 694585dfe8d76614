"""How the sync kit runs store calls at the same time: one thread each, released
together by a barrier (the same name as ``../_async/concurrency.py``)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["at_once"]

T = TypeVar("T")


def at_once(calls: list[Callable[[], T]], timeout: float = 60.0) -> list[T]:
    """Run every call in a thread of its own, all released at once, and return their
    results in order (the first exception is raised); `TimeoutError` after `timeout`
    seconds."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait(timeout)
        return call()

    with concurrent.futures.ThreadPoolExecutor(len(calls), "aioidempotency-kit") as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [future.result(timeout) for future in futures]
