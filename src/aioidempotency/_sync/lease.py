"""Leases for the sync engine: one thread per engine keeps in-progress claims alive.

The rules are those of ``_async/lease.py``: a claim is renewed every third of its
lease; a failed renewal is retried (backing off up to a third of the lease) for as
long as the call runs; only a proven loss stops it, marks the lease `lost`, and the
engine then refuses to store the late result. The keeper thread starts with the
first claim, sleeps while there is none, and a forked child starts its own. Each
renewal runs in a daemon thread of its own (at most one in flight per claim), as the
async keeper runs each in a task: a renewal that hangs (a request that never answers)
holds up its own claim only, never the other claims' renewals. Renewals, failed
renewals and lost leases are the call's events, logged on ``aioidempotency.lease``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from aioidempotency._events import EventKind, Reporter, Watch
from aioidempotency._forks import fork_generation
from aioidempotency._records import DataRecord
from aioidempotency._sync.store import SyncPersistenceLayer
from aioidempotency.exceptions import IdempotencyClaimLostError

__all__ = ["Lease", "Leases"]

logger = logging.getLogger("aioidempotency.lease")

STOP_TIMEOUT = 5.0
"""How long stopping waits for a renewal in flight."""

RETRY_DELAY = 0.05
"""First pause between failed renewals (seconds); it doubles up to a third of the lease."""


class Lease:
    """One claim kept alive by `Leases`; `lost` once the store proved it gone.

    `watch` is the call's (its events count the renewals), None when nobody watches."""

    __slots__ = ("claim", "due", "keeper", "lost", "renewing", "wakeup", "watch")

    def __init__(
        self, keeper: Leases, claim: DataRecord, due: float, watch: Watch | None = None
    ) -> None:
        self.keeper = keeper
        self.claim = claim
        self.due = due
        self.lost = False
        self.watch = watch
        # Held while a renewal is in flight: taken by the keeper, released by the
        # renewal's thread (a bare lock, not an Event: most claims never renew).
        self.renewing = threading.Lock()
        # Set by `stop()` to end a renewal's pause between failed attempts; made by the
        # renewal's thread on its first failure only.
        self.wakeup: threading.Event | None = None

    @property
    def key(self) -> str:
        """The claimed idempotency key."""
        return self.claim.idempotency_key

    def stop(self) -> None:
        """Stop renewing; returns once no renewal is in flight (bounded wait)."""
        self.keeper._forget(self)
        if not self.renewing.acquire(timeout=STOP_TIMEOUT):
            logger.warning(
                "the lease renewal of %s did not stop within %ss", self.key, STOP_TIMEOUT
            )
            return
        self.renewing.release()


class Leases:
    """Renews the claims of one engine from one daemon thread.

    Starting and stopping a lease costs a dict insert and delete under a plain lock;
    the keeper thread looks for due claims every half interval (a new claim is not due
    before one interval, so nothing needs to wake it).
    """

    def __init__(
        self,
        store: SyncPersistenceLayer,
        *,
        lease: float,
        clock: Callable[[], float],
        reporter: Reporter | None = None,
    ) -> None:
        self._store = store
        self._lease = lease
        self._interval = lease / 3
        self._clock = clock
        self._reporter = reporter or Reporter(logger, store, clock, None)
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._thread: threading.Thread | None = None
        self._generation = fork_generation()

    def keep(self, claim: DataRecord, watch: Watch | None = None) -> Lease:
        """Start renewing `claim` (an in-progress record with an owner token; `watch`:
        the call's, if watched)."""
        assert claim.owner is not None
        lease = Lease(self, claim, self._clock() + self._interval, watch)
        if self._generation != fork_generation():
            self._after_fork()
        with self._lock:
            self._leases[claim.owner] = lease
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve,
                    args=(self._generation,),
                    name="aioidempotency-leases",
                    daemon=True,
                )
                self._thread.start()
        return lease

    def _after_fork(self) -> None:
        """In a forked child: the parent's keeper thread and claims stay behind, and the
        lock is new (a thread of the parent may have held it at the fork)."""
        self._lock = threading.Lock()
        self._leases, self._thread = {}, None
        self._generation = fork_generation()

    def _forget(self, lease: Lease) -> None:
        if self._generation != fork_generation():
            self._after_fork()
        with self._lock:
            self._leases.pop(lease.claim.owner or "", None)
            if lease.wakeup is not None:
                lease.wakeup.set()  # a renewal pausing between attempts ends now

    def _serve(self, generation: int) -> None:
        while fork_generation() == generation:
            with self._lock:
                now = self._clock()
                due = [
                    lease
                    for lease in self._leases.values()
                    # none in flight: take its lock now, the renewal releases it
                    if lease.due <= now and lease.renewing.acquire(blocking=False)
                ]
            if not due:
                # Look again in half an interval: no claim can fall due sooner.
                time.sleep(self._interval / 2)
                continue
            for lease in due:
                threading.Thread(
                    target=self._renewing,
                    args=(lease,),
                    name=f"aioidempotency-lease:{lease.key}",
                    daemon=True,
                ).start()

    def _renewing(self, lease: Lease) -> None:
        try:
            self._renew(lease)
        finally:
            lease.renewing.release()

    def _renew(self, lease: Lease) -> None:
        # Retried in this thread, pausing in real time between attempts (as the async
        # keeper does in its task) until the claim is renewed, proven lost or stopped.
        delay = RETRY_DELAY
        watch = lease.watch
        # Timed if watched. The call's own thread is in its function meanwhile (it stops
        # the lease, waiting for a renewal in flight, before it completes): no other
        # thread counts round trips now.
        store = self._store if watch is None else watch.timing(self._store)
        while lease.claim.owner in self._leases:
            until_ms = int((self._clock() + self._lease) * 1000)
            renewed = dataclasses.replace(lease.claim, in_progress_expiry_timestamp=until_ms)
            try:
                store.renew(renewed)
            except IdempotencyClaimLostError as exc:
                lease.lost = True
                self._forget(lease)
                self._reporter.emit(
                    EventKind.LEASE_LOST,
                    lease.key,
                    watch,
                    error=exc,
                    log=logger,
                    detail="another call holds the key; its result will not be stored",
                )
                return
            except Exception as exc:
                self._reporter.emit(
                    EventKind.STORE_ERROR,
                    lease.key,
                    watch,
                    error=exc,
                    log=logger,
                    detail=f"renewing the lease failed; retrying in {delay:.2g}s",
                    exc_info=True,
                )
                if not self._pause(lease, delay):
                    return
                delay = min(delay * 2, self._interval)
                continue
            lease.claim = renewed
            # Due one interval after the deadline was computed (see _async/lease.py).
            lease.due = until_ms / 1000 - self._lease + self._interval
            if watch is not None:
                self._reporter.emit(EventKind.LEASE_RENEWED, lease.key, watch, log=logger)
            return

    def _pause(self, lease: Lease, delay: float) -> bool:
        """Wait `delay` seconds before the next attempt; False if the lease was stopped
        (before or during the pause)."""
        with self._lock:
            if lease.claim.owner not in self._leases:
                return False
            if lease.wakeup is None:
                lease.wakeup = threading.Event()
            wakeup = lease.wakeup
        return not wakeup.wait(delay)
