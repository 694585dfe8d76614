"""Leases: keeping in-progress claims alive while their functions run.

One `LeaseKeeper` per engine and event loop renews all of that engine's live claims
with a single timer, so starting and finishing a call costs a dict insert and delete,
however many calls run at once; a call that finishes within a third of its lease (most
of them) never renews. A renewal that fails (the store is down or slow) is retried for
as long as the call runs, even past the lease: the claim stays ours until someone else
takes it, and a renewal that lands after an outage keeps a duplicate from running.
Only a proven loss (the store says another call holds the key, or the claim is gone)
stops the renewals; it marks the lease `lost`, and the engine then refuses to store
the late result. Renewals (DEBUG), failed renewals and lost leases (WARNING) are the
call's events (`aioidempotency.events`), logged on ``aioidempotency.lease``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections.abc import Callable

from aioidempotency._async.store import PersistenceLayer
from aioidempotency._events import EventKind, Reporter, Watch
from aioidempotency._records import DataRecord
from aioidempotency.exceptions import IdempotencyClaimLostError

__all__ = ["Lease", "LeaseKeeper", "Leases", "stop_task"]

logger = logging.getLogger("aioidempotency.lease")

STOP_TIMEOUT = 5.0
"""How long stopping waits for a renewal in flight (a client that swallows a
cancellation must not hang the call)."""

RETRY_DELAY = 0.05
"""First pause between failed renewals (seconds); it doubles up to a third of the lease."""


class Lease:
    """One claim kept alive by a `LeaseKeeper`; `lost` once the store proved it gone.

    `watch` is the call's (its events count the renewals), None when nobody watches."""

    __slots__ = ("claim", "due", "keeper", "lost", "task", "watch")

    def __init__(
        self, keeper: LeaseKeeper, claim: DataRecord, due: float, watch: Watch | None = None
    ) -> None:
        self.keeper = keeper
        self.claim = claim
        self.due = due
        self.lost = False
        self.task: asyncio.Task[None] | None = None
        self.watch = watch

    @property
    def key(self) -> str:
        """The claimed idempotency key."""
        return self.claim.idempotency_key

    async def stop(self) -> None:
        """Stop renewing; returns once no renewal is in flight (bounded wait)."""
        assert self.claim.owner is not None
        self.keeper._leases.pop(self.claim.owner, None)
        await stop_task(self.task)


class LeaseKeeper:
    """Renews claims every third of `lease` seconds, with one timer for all of them."""

    def __init__(
        self,
        store: PersistenceLayer,
        *,
        lease: float,
        clock: Callable[[], float],
        reporter: Reporter,
    ) -> None:
        self._store = store
        self._lease = lease
        self._interval = lease / 3
        self._clock = clock
        self._reporter = reporter
        self._loop = asyncio.get_running_loop()
        self._leases: dict[str, Lease] = {}
        self._timer: asyncio.TimerHandle | None = None

    def keep(self, claim: DataRecord, watch: Watch | None = None) -> Lease:
        """Start renewing `claim` (an in-progress record with an owner token)."""
        assert claim.owner is not None
        lease = Lease(self, claim, self._clock() + self._interval, watch)
        self._leases[claim.owner] = lease
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
        delay = RETRY_DELAY
        report, watch = self._reporter.emit, lease.watch
        store = self._store if watch is None else watch.timing(self._store)  # timed if watched
        try:
            while lease.claim.owner in self._leases:
                until_ms = int((self._clock() + self._lease) * 1000)
                renewed = dataclasses.replace(lease.claim, in_progress_expiry_timestamp=until_ms)
                try:
                    await store.renew(renewed)
                except IdempotencyClaimLostError as exc:
                    lease.lost = True
                    self._leases.pop(renewed.owner or "", None)
                    report(
                        EventKind.LEASE_LOST,
                        lease.key,
                        watch,
                        error=exc,
                        log=logger,
                        detail="another call holds the key; its result will not be stored",
                    )
                    return
                except Exception as exc:
                    report(
                        EventKind.STORE_ERROR,
                        lease.key,
                        watch,
                        error=exc,
                        log=logger,
                        detail=f"renewing the lease failed; retrying in {delay:.2g}s",
                        exc_info=True,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._interval)
                    continue
                lease.claim = renewed
                if watch is not None:
                    report(EventKind.LEASE_RENEWED, lease.key, watch, log=logger)
                # Due one interval after the deadline was computed, not after the reply
                # came: a renewal retried or delayed on its way must not push the next
                # one past the deadline it carried.
                lease.due = until_ms / 1000 - self._lease + self._interval
                return
        finally:
            lease.task = None


class Leases:
    """The lease keepers of one engine: one per event loop, created on first use."""

    def __init__(
        self,
        store: PersistenceLayer,
        *,
        lease: float,
        clock: Callable[[], float],
        reporter: Reporter | None = None,
    ) -> None:
        self._store = store
        self._lease = lease
        self._clock = clock
        self._reporter = reporter or Reporter(logger, store, clock, None)
        self._keepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LeaseKeeper] = (
            weakref.WeakKeyDictionary()
        )

    def keep(self, claim: DataRecord, watch: Watch | None = None) -> Lease:
        """Start renewing `claim` on the running loop (`watch`: the call's, if watched)."""
        loop = asyncio.get_running_loop()
        keeper = self._keepers.get(loop)
        if keeper is None:
            keeper = LeaseKeeper(
                self._store, lease=self._lease, clock=self._clock, reporter=self._reporter
            )
            self._keepers[loop] = keeper
        return keeper.keep(claim, watch)


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
