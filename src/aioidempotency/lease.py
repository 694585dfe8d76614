"""`LeaseRenewer`: keeps an in-progress claim alive while its function runs.

A renewal is scheduled with `loop.call_later`, so a call that finishes within a
third of its lease (most of them) never creates a task. A renewal that fails for a
transient reason is retried while the lease still has time left; one that finds the
claim taken over stops, and the late completion is then refused by the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aioidempotency.exceptions import IdempotencyClaimLostError
from aioidempotency.persistence.base import PersistenceLayer

__all__ = ["LeaseRenewer", "stop_task"]

logger = logging.getLogger("aioidempotency")

STOP_TIMEOUT = 5.0
"""How long stopping waits for a renewal in flight (a client that swallows a
cancellation must not hang the call)."""


class LeaseRenewer:
    """Renews ``owner``'s claim on ``key`` every third of ``lease`` seconds."""

    def __init__(
        self,
        store: PersistenceLayer,
        key: str,
        owner: str,
        *,
        lease: float,
        held_until_ms: int,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._key = key
        self._owner = owner
        self._lease = lease
        self._interval = lease / 3
        self._held_until_ms = held_until_ms
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._interval, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self._stopped:
            self._task = self._loop.create_task(
                self._renew(), name=f"aioidempotency-lease:{self._key}"
            )

    async def _renew(self) -> None:
        until_ms = int((self._clock() + self._lease) * 1000)
        while True:
            try:
                await self._store.renew(
                    self._key, owner=self._owner, in_progress_expiry_ms=until_ms
                )
            except IdempotencyClaimLostError:
                logger.warning(
                    "lease on %s lost to another call; its result will not be stored", self._key
                )
                return
            except Exception:
                left = self._held_until_ms / 1000 - self._clock()
                if left <= 0:
                    logger.warning("lease on %s expired while its renewal kept failing", self._key)
                    return
                logger.warning(
                    "renewing the lease on %s failed; retrying", self._key, exc_info=True
                )
                await asyncio.sleep(min(self._interval, left / 4, 1.0))
                continue
            break
        self._held_until_ms = until_ms
        if not self._stopped:
            self._handle = self._loop.call_later(self._interval, self._fire)

    async def stop(self) -> None:
        """Stop renewing; returns once no renewal is in flight (bounded wait)."""
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        await stop_task(self._task)


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait for it to finish, at most `STOP_TIMEOUT` seconds.

    Raises only if the caller itself is cancelled.
    """
    if task is None or task.done():
        return
    task.cancel()
    _, pending = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
    if pending:
        logger.warning(
            "the lease renewer %s did not stop within %ss", task.get_name(), STOP_TIMEOUT
        )
