"""The contract between the engine and a store.

A store knows how to talk to its server and nothing else: no retries, hooks,
serializers or key derivation. Each method is one round trip where the server allows.
The engine (`aioidempotency._async.engine`) owns all the logic.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Sequence  # async-only
from types import TracebackType
from typing import TYPE_CHECKING

from typing_extensions import Self

from aioidempotency._async.concurrency import outcomes  # async-only
from aioidempotency._check import (
    ProbeFailed,
    StoreCheckReport,
    StoreProblem,
    probe_records,
    store_problem,
)
from aioidempotency._contract import ClaimResult, check_result_size
from aioidempotency._records import DataRecord, RecordStatus

# begin async-only
if TYPE_CHECKING:
    from aioidempotency._sync.store import SyncPersistenceLayer
# end async-only

__all__ = ["ClaimResult", "PersistenceLayer", "StoreCheckReport", "check_result_size"]


class PersistenceLayer(abc.ABC):
    """Base class of every store. Subclass it to add a store.

    Every method may be sent more than once for the same call (a client's retry after
    a lost reply, the engine's retry in the background): each must be safe to repeat.
    """

    @abc.abstractmethod
    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        """Write `record` (INPROGRESS, with an owner token) when its key is free.

        The key is free when no record exists, or the existing one is expired or
        orphaned at `now` (epoch seconds) as `DataRecord.is_claimable` says; taking
        over such a record is atomic where the store allows it. Otherwise return the
        existing record. A claim sent twice (a client's retry after a lost reply)
        returns the caller's own record the second time; the engine recognises it by
        its owner token. A stored value that is not a usable record raises
        `IdempotencyInvalidStatusError` (from `RecordAttributes`); it is never
        overwritten.
        """

    # begin async-only
    async def claim_each(
        self, records: Sequence[DataRecord], *, now: float
    ) -> list[ClaimResult | Exception]:
        """`claim` of each record, in as few round trips as the store can: one outcome
        per record, in order, a claim's failure in its place (a failure of the store
        as a whole may be raised instead; a cancellation is raised). The default sends
        them concurrently; a store that can send them together overrides it."""
        return await outcomes(self.claim(record, now=now) for record in records)

    # end async-only
    @abc.abstractmethod
    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        """Read the record under `key`, or None when there is none or it expired at
        `now` (epoch seconds; the engine always passes its clock, None means
        ``time.time()`` for tools). Never returns a malformed record."""

    @abc.abstractmethod
    async def complete(self, record: DataRecord, *, owner: str) -> None:
        """Replace the in-progress record with `record` (COMPLETED) if `owner` holds it.

        Raises `IdempotencyClaimLostError` when another call owns the key now or the
        record is gone, and `IdempotencyResultTooLargeError` when the store cannot hold
        the result; never creates a partial record. Safe to repeat: a completion sent
        twice (a client's retry after a lost reply) succeeds the second time too.
        """

    @abc.abstractmethod
    async def release(self, key: str, *, owner: str) -> None:
        """Delete the in-progress record if `owner` still holds it; otherwise do nothing.

        Never deletes a completed record, nor a claim of another owner; safe to repeat.
        """

    @abc.abstractmethod
    async def renew(self, record: DataRecord) -> None:
        """Replace the caller's in-progress claim with `record`, its renewed copy.

        `record` is the in-progress record the caller claimed (same owner token) with
        a later `in_progress_expiry_timestamp`; it is written only if `record.owner`
        still holds the key. Raises `IdempotencyClaimLostError` otherwise. Safe to
        repeat: a renewal sent twice (a retry after a lost reply) succeeds twice.
        """

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete the record under `key` whoever owns it (an operator's tool).

        Returns True when a record was deleted.
        """

    async def check(
        self, *, raise_on_problem: bool = False, probe: bool = True
    ) -> StoreCheckReport:
        """Check that this store works, before a call needs it: with `probe` (the
        default), every operation of the contract on a probe key
        (``aioidempotency-check#...``, deleted at the end, expiring within a minute in
        any case); without, one read. Returns a `StoreCheckReport` listing each problem
        with its fix; `raise_on_problem` raises them instead
        (`IdempotencyStoreCheckError`). The stores of this package check more (their
        server's version and mode, a table's key schema and TTL); a store of one's own
        may override this."""
        problems: list[StoreProblem] = []
        facts: list[tuple[str, str]] = []
        if probe:
            failed = await self._probe(*probe_records())
            if failed is not None:
                problems.append(store_problem(failed[1], failed[0]))
            else:
                facts.append(("probe", "claim, get, renew, release, complete, delete: ok"))
        else:
            try:
                await self.get(probe_records()[0].idempotency_key)
            except Exception as exc:
                problems.append(store_problem(exc, "get"))
        report = StoreCheckReport(type(self).__name__, tuple(problems), tuple(facts))
        if raise_on_problem:
            report.raise_for_problems()
        return report

    async def _probe(
        self, claim: DataRecord, renewed: DataRecord, done: DataRecord
    ) -> tuple[str, Exception] | None:
        """Run every operation of the contract on the probe key of `claim` (see
        `aioidempotency._check.probe_records`): the step that failed and its error, or
        None. The probe key is deleted at the end, and on a failure too if it can be."""
        key, owner = claim.idempotency_key, claim.owner or ""
        step = "claim"
        try:
            if not (await self.claim(claim, now=time.time())).claimed:
                raise ProbeFailed(step, "a claim of a new key was refused")
            step = "get"
            found = await self.get(key)
            if found is None or found.owner != owner:
                raise ProbeFailed(step, f"the claim just written reads back as {found!r}")
            step = "renew"
            await self.renew(renewed)
            step = "release"
            await self.release(key, owner=owner)
            step = "claim"
            if not (await self.claim(claim, now=time.time())).claimed:
                raise ProbeFailed(step, "a claim of a released key was refused")
            step = "complete"
            await self.complete(done, owner=owner)
            step = "get"
            found = await self.get(key)
            if found is None or found.status is not RecordStatus.COMPLETED:
                raise ProbeFailed(step, f"the completed record reads back as {found!r}")
            step = "delete"
            await self.delete(key)
        except Exception as exc:
            if step != "delete":
                # The probe key expires within a minute anyway.
                with contextlib.suppress(Exception):
                    await self.delete(key)
            return step, exc
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Close the clients this layer opened itself (clients given to it stay open)."""

    # begin async-only
    def _async_refusal(self) -> str | None:
        """Why async code cannot use this store (it holds only sync clients), or None;
        async decorators and engines raise it as a `TypeError` when built."""
        return None

    def _sync_twin(self) -> SyncPersistenceLayer | None:
        """The store that serves this one in sync code, or None: the sync engine then
        runs this store on a background loop (`aioidempotency._sync.bridge`). Raises a
        `TypeError` that says what to pass when sync code cannot use this store.
        `aioidempotency._twins.as_sync_store` asks once per store."""
        return None

    # end async-only

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
