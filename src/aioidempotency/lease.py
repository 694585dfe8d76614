"""Leases: keeping in-progress claims alive while their functions run.

One `LeaseKeeper` per engine and event loop renews all of that engine's live claims
with a single timer, so starting and finishing a call costs a dict insert and delete,
however many calls run at once; a call that finishes within a third of its lease (most
of them) never renews. A renewal that fails for a transient reason is retried while
the lease has time left; one that finds the claim taken over stops, and the late
completion is then refused by the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aioidempotency.exceptions import IdempotencyClaimLostError
from aioidempotency.persistence.base import PersistenceLayer

__all__ = ["Lease", "LeaseKeeper", "stop_task"]

logger = logging.getLogger("aioidempotency")

STOP_TIMEOUT = 5.0
"""How long stopping waits for a renewal in flight (a client that swallows a
cancellation must not hang the call)."""


class Lease:
    """One claim kept alive by a `LeaseKeeper`."""

    __slots__ = ("due", "held_until_ms", "keeper", "key", "owner", "task")

    def __init__(
        self, keeper: LeaseKeeper, key: str, owner: str, held_until_ms: int, due: float
    ) -> None:
        self.keeper = keeper
        self.key = key
        self.owner = owner
        self.held_until_ms = held_until_ms
        self.due = due
        self.task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Stop renewing; returns once no renewal is in flight (bounded wait)."""
        self.keeper._leases.pop(self.owner, None)
        await stop_task(self.task)


class LeaseKeeper:
    """Renews claims every third of `lease` seconds, with one timer for all of them."""

    def __init__(
        self, store: PersistenceLayer, *, lease: float, clock: Callable[[], float]
    ) -> None:
        self._store = store
        self._lease = lease
        self._interval = lease / 3
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._leases: dict[str, Lease] = {}
        self._timer: asyncio.TimerHandle | None = None

    def keep(self, key: str, owner: str, held_until_ms: int) -> Lease:
        """Start renewing `owner`'s claim on `key`, held until `held_until_ms`."""
        lease = Lease(self, key, owner, held_until_ms, self._clock() + self._interval)
        self._leases[owner] = lease
        if self._timer is None:
            self._timer = self._loop.call_later(self._interval / 2, self._tick)
        return lease

    def _tick(self) -> None:
        # Each claim is renewed between one third and one half of its lease after its
        # last renewal; the timer stops when no claim is left.
        self._timer = None
        if not self._leases:
            return
        now = self._clock()
        for lease in list(self._leases.values()):
            if lease.task is None and lease.due <= now:
                lease.task = self._loop.create_task(
                    self._renew(lease), name=f"aioidempotency-lease:{lease.key}"
                )
        self._timer = self._loop.call_later(self._interval / 2, self._tick)

    async def _renew(self, lease: Lease) -> None:
        until_ms = int((self._clock() + self._lease) * 1000)
        try:
            while True:
                try:
                    await self._store.renew(
                        lease.key, owner=lease.owner, in_progress_expiry_ms=until_ms
                    )
                except IdempotencyClaimLostError:
                    logger.warning(
                        "lease on %s lost to another call; its result will not be stored",
                        lease.key,
                    )
                    self._leases.pop(lease.owner, None)
                    return
                except Exception:
                    left = lease.held_until_ms / 1000 - self._clock()
                    if left <= 0:
                        logger.warning(
                            "lease on %s expired while its renewal kept failing", lease.key
                        )
                        self._leases.pop(lease.owner, None)
                        return
                    logger.warning(
                        "renewing the lease on %s failed; retrying", lease.key, exc_info=True
                    )
                    await asyncio.sleep(min(self._interval, left / 4, 1.0))
                    continue
                lease.held_until_ms = until_ms
                lease.due = self._clock() + self._interval
                return
        finally:
            lease.task = None


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
