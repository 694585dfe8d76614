"""How the async kit runs store calls at the same time: tasks on the running loop.

``../_sync/concurrency.py`` has the same name for threads; the generated sync kit
imports that one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["at_once"]

T = TypeVar("T")


async def at_once(calls: list[Callable[[], Awaitable[T]]], timeout: float = 60.0) -> list[T]:
    """Start every call at once and return their results in order (the first exception
    is raised); `TimeoutError` after `timeout` seconds."""
    return list(await asyncio.wait_for(asyncio.gather(*(call() for call in calls)), timeout))
