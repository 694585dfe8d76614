"""`IdempotencyEngine`: the state machine of one idempotent call, written once.

Every entry point (decorators, sync shims, web middleware, CLI) goes through
`IdempotencyEngine.run`. The engine derives the key, claims it in the store, runs
the function once, stores the result and replays it; it releases the claim when the
function fails or is cancelled, renews an in-progress lease while the function runs,
and (opt-in) waits for a duplicate's result. Stores only move records.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from typing_extensions import TypeVarTuple, Unpack

from aioidempotency._async.concurrency import (
    Background,
    Cancelled,
    outcomes,  # async-only
    shielded,
    sleep,
)
from aioidempotency._async.flights import Flight, Flights
from aioidempotency._async.lease import Lease, Leases
from aioidempotency._calls import (
    DISABLED_ENV,
    DISABLED_MESSAGE,
    IdempotencyDisabledWarning,
    PreparedCall,
    SentClaim,
    idempotency_key,
    is_disabled,
    is_durable_replay,
    key_prefix_of,
    prepare_call,
)
from aioidempotency._config import IdempotencyConfig, LambdaContextLike
from aioidempotency._contract import ClaimResult
from aioidempotency._encoding import dumps_result
from aioidempotency._errors import (
    in_progress_message,
    invalid_record,
    is_own,
    is_transient,
    store_error,
    store_errors,
)
from aioidempotency._events import CallOutcome, EventKind, Reporter, Watch, describe
from aioidempotency._local_cache import LocalCache
from aioidempotency._records import DataRecord, RecordStatus, new_owner_token
from aioidempotency._twins import StoreForAsync, as_async_store
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyCompletionError,
    IdempotencyInconsistentStateError,
    IdempotencyInvalidStatusError,
    IdempotencyKeyError,
    IdempotencyPersistenceLayerError,
    IdempotencyPersistenceMisconfiguredError,
    IdempotencySerializationError,
    IdempotencyValidationError,
)
from aioidempotency.serialization import BaseIdempotencySerializer, NoOpSerializer

__all__ = [
    "DISABLED_ENV",
    "DISABLED_MESSAGE",
    "IdempotencyDisabledWarning",
    "IdempotencyEngine",
    "PreparedCall",
    "SentClaim",
    "is_disabled",
    "is_durable_replay",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

logger = logging.getLogger("aioidempotency.engine")
"""One line per decision (see `aioidempotency.events`): DEBUG, WARNING for a claim
lost, a takeover of an orphaned claim and a store error."""

_MAX_CLAIM_ATTEMPTS = 3
_MAX_POLL_INTERVAL = 1.0
_CLEANUP_ATTEMPTS = 8
"""Attempts of a background release or completion before it gives up (the lease, or
the expiry without one, then frees the key): 8 attempts back off over about 13 s."""
_CLEANUP_FIRST_DELAY = 0.05
_CONFIRM_RELEASE_DELAYS = (1.0, 2.0)
"""After a claim whose outcome is unknown (it failed or timed out on the client, and
may still land on the server), the release is sent again after each of these delays in
turn (1 s, then 2 s more): a client that queues requests under load (glide holds them
up to its request timeout) can send the claim after the first of them."""

# The kinds a replay passes on every call, watched or not, read once: on CPython 3.11 an
# enum member read from its class costs about as much as the rest of a cache hit's
# bookkeeping for events.
_CACHE_HIT, _REPLAYED, _WAITED = EventKind.CACHE_HIT, EventKind.REPLAYED, EventKind.WAITED


class IdempotencyEngine:
    """Runs functions at most once per payload within the expiry window.

    ``persistence_store`` keeps the records; ``config`` says what to key on and how
    long to remember; ``key_prefix`` replaces the prefix otherwise derived from the
    function (``{AWS_LAMBDA_FUNCTION_NAME}.{module}.{qualname}``). ``output_serializer``
    turns results into JSON-able data and back; ``clock`` (epoch seconds) is the only
    time the engine and its stores compare against. One engine may serve many
    concurrent calls; it keeps no per-call state. Each decision is reported as an
    `aioidempotency.events.IdempotencyEvent` (``config.on_event``, `events.listen`) and
    logged on ``aioidempotency.engine``.
    """

    def __init__(
        self,
        persistence_store: StoreForAsync,
        config: IdempotencyConfig | None = None,
        *,
        key_prefix: str | None = None,
        output_serializer: BaseIdempotencySerializer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.persistence_store = as_async_store(persistence_store)
        self.config = config or IdempotencyConfig()
        self.key_prefix = key_prefix
        self.output_serializer = output_serializer or NoOpSerializer()
        self._clock = clock
        self._cache = LocalCache(
            enabled=self.config.use_local_cache,
            max_items=self.config.local_cache_max_items,
            clock=clock,
        )
        self._flights = Flights()
        self._background = Background()
        self._reporter = Reporter(logger, self.persistence_store, clock, self.config.on_event)
        lease = self.config.in_progress_lease_seconds
        self._leases = (
            None
            if lease is None
            else Leases(self.persistence_store, lease=lease, clock=clock, reporter=self._reporter)
        )

    # -- public API -----------------------------------------------------------------

    async def run(
        self,
        payload: Any,
        fn: Callable[[Unpack[Ts]], Awaitable[T]],
        *args: Unpack[Ts],
        lambda_context: LambdaContextLike | None = None,
    ) -> T:
        """Run ``fn(*args)`` once for ``payload``; replay its stored result to duplicates.

        ``args`` are passed to ``fn`` as they are (as ``loop.call_soon`` does), so a
        loop over records needs no closure, which would bind the loop variable late.
        ``lambda_context`` (or the one registered with
        `IdempotencyConfig.register_lambda_context`) bounds the claim by the
        invocation's remaining time. Raises `IdempotencyAlreadyInProgressError` for a
        concurrent duplicate, `IdempotencyValidationError` when the payload differs
        from the stored one, and re-raises whatever ``fn`` raises.
        """
        call: Callable[[], Awaitable[T]] = functools.partial(fn, *args) if args else fn
        return await self.run_for(payload, call, key_source=fn, lambda_context=lambda_context)

    async def run_for(
        self,
        payload: Any,
        fn: Callable[[], Awaitable[T]],
        *,
        key_source: Callable[..., Any],
        lambda_context: LambdaContextLike | None = None,
        durable_replay: bool = False,
    ) -> T:
        """Like `run`, with the key prefix derived from ``key_source`` instead of ``fn``.

        Decorators use it: they run a bound call of the function they decorate.
        """
        call = self.prepare_call(
            payload,
            key_source=key_source,
            lambda_context=lambda_context,
            durable_replay=durable_replay,
        )
        if call is None:
            return await fn()
        hit, replayed = self.replay_from_cache(call)
        if hit:
            return cast(T, replayed)
        return await self.run_prepared(call, fn)

    def prepare_call(
        self,
        payload: Any,
        *,
        key_source: Callable[..., Any],
        lambda_context: LambdaContextLike | None = None,
        durable_replay: bool = False,
    ) -> PreparedCall | None:
        """Derive the key and validation hash of a call, without I/O.

        Returns None, after a warning, when idempotency is disabled by the environment
        or the payload has no key (`IdempotencyKeyError` instead when configured): the
        function then runs unprotected. Entry points run `replay_from_cache` and then
        `run_prepared` on what it returns.
        """
        prefix = key_prefix_of(self.key_prefix, key_source)
        watch = self._reporter.watch(prefix)  # None unless someone sees the events
        try:
            call = prepare_call(
                payload,
                self.config,
                prefix=prefix,
                lambda_context=lambda_context,
                durable_replay=durable_replay,
                stacklevel=4,
                watch=watch,
            )
        except IdempotencyKeyError as exc:
            self._reporter.emit(
                EventKind.NO_KEY, None, watch, outcome=CallOutcome.REFUSED, error=exc
            )
            raise
        if call is None and watch is not None:
            kind = EventKind.DISABLED if is_disabled() else EventKind.NO_KEY
            self._reporter.emit(kind, None, watch, outcome=CallOutcome.UNPROTECTED)
        return call

    def replay_from_cache(self, call: PreparedCall) -> tuple[bool, Any]:
        """``(True, result)`` when the local cache holds the call's result, without I/O."""
        cached = self._cache.get(call.key)
        if cached is None:
            return False, None
        self._validate(call, cached.payload_hash)
        return True, self._replay(call, cached, _CACHE_HIT)

    async def run_prepared(
        self,
        call: PreparedCall,
        fn: Callable[[], Awaitable[T]],
        *,
        claim: SentClaim | None = None,
    ) -> T:
        """Claim, run and complete a call prepared by `prepare_call` (or replay it).

        ``claim`` is the call's first claim, already sent (the async engine's `claim_each`): it
        goes on from the store's answer instead of claiming again.
        """
        wait = self.config.wait_for_in_progress_seconds
        deadline = self._clock() + wait if wait > 0 else None
        inconsistent = 0
        watch = call.watch
        seen: DataRecord | None = None  # the record last seen free, for TAKEN_OVER
        try:
            while True:
                # A durable replay does not join the suspended invocation it replays; a
                # claim sent ahead has its answer already.
                flight = (
                    None
                    if call.durable_replay or claim is not None
                    else self._flights.find(call.key)
                )
                if flight is not None:
                    record = await self._join(call, flight, deadline)
                    if record is not None:
                        return cast(T, self._replay(call, record, _WAITED))
                    if watch is not None:
                        self._reporter.emit(
                            EventKind.WAITED, call.key, watch, detail="the running call released it"
                        )
                    continue  # the owner released the key: try to claim it
                kept: Lease | None = None  # the lease of a claim sent ahead
                if claim is None:
                    in_progress = self._new_claim(call)
                    result = await self._claim(call, in_progress)
                else:
                    in_progress, sent, claim = claim.record, claim, None
                    result = await self._claim(call, in_progress, sent)
                    kept = cast("Lease | None", sent.lease)
                    if kept is not None and kept.lost:
                        # Taken over while the call waited to start: claim again.
                        await kept.stop()
                        continue
                if result.claimed:
                    if seen is not None:
                        self._taken_over(call, seen)
                    elif watch is not None:
                        self._reporter.emit(EventKind.CLAIMED, call.key, watch)
                    return await self._execute(call, in_progress, fn, kept)
                existing = result.existing
                if existing is not None:
                    self._validate(call, existing.payload_hash)
                    if existing.is_claimable(self._clock()):
                        seen, existing = existing, None  # it changed between the claim and the read
                    elif existing.status is RecordStatus.COMPLETED:
                        self._cache.put(existing)
                        return cast(T, self._replay(call, existing, _REPLAYED))
                    elif call.durable_replay and existing.owner is not None:
                        # A durable execution replayed after a suspension finds the claim
                        # its first invocation took (as Powertools 3.37 does): run under it
                        # and complete it, instead of refusing it as in progress.
                        if watch is not None:
                            self._reporter.emit(EventKind.RESUMED, call.key, watch)
                        return await self._execute(call, existing, fn)
                if existing is not None or result.busy:  # in progress elsewhere
                    record, free = await self._wait(call, deadline)
                    if record is not None:
                        return cast(T, self._replay(call, record, _WAITED))
                    seen = free
                    if watch is not None:
                        self._reporter.emit(EventKind.WAITED, call.key, watch, detail=_freed(free))
                    continue
                inconsistent += 1
                if inconsistent >= _MAX_CLAIM_ATTEMPTS:
                    error = IdempotencyInconsistentStateError(
                        "save_inprogress and get_record return inconsistent results."
                    )
                    self._reporter.emit(
                        EventKind.STORE_ERROR,
                        call.key,
                        watch,
                        outcome=CallOutcome.ERROR,
                        error=error,
                        detail=f"the claim was refused {inconsistent} times with no record",
                    )
                    raise error
        except Cancelled as exc:
            if watch is not None:  # a call cancelled while it ran was reported already
                self._reporter.emit(
                    EventKind.CANCELLED, call.key, watch, outcome=CallOutcome.CANCELLED, error=exc
                )
            raise

    # begin async-only
    async def claim_each(self, calls: Sequence[PreparedCall]) -> list[SentClaim]:
        """Send the first claim of each of `calls` together, in one store operation
        (`PersistenceLayer.claim_each`: one round trip on a pipelining cache store).

        Each call then goes on with ``run_prepared(call, fn, claim=...)``; a claim no
        call took (its call never started) must be handed to `abandon`. A claim won
        is renewed by the lease (calls without a Lambda context) while its call
        waits; one taken over meanwhile is claimed again when its call starts. A failure of
        the claims as a whole becomes each call's failed claim; if this is cancelled,
        the claims, which may have landed, are released in the background.
        """
        records = [self._new_claim(call) for call in calls]
        sent = self._clock()
        watches = [(call.key, call.watch) for call in calls if call.watch is not None]
        failure: BaseException | None = None
        try:
            answers = await self.persistence_store.claim_each(records, now=sent)
            if len(answers) != len(records):  # a store of one's own that lost some
                raise IdempotencyPersistenceLayerError(
                    f"claim_each answered {len(answers)} of {len(records)} claims"
                )
        except Cancelled as exc:
            failure = exc
            self._abandon(records)
            raise
        except Exception as exc:
            failure = exc
            answers = [exc] * len(records)
        finally:
            for key, watch in watches:  # each call counts the shared round trip as its own
                watch.shared("claim", sent, failure)
                if isinstance(failure, Cancelled):
                    self._reporter.emit(
                        EventKind.CANCELLED,
                        key,
                        watch,
                        outcome=CallOutcome.CANCELLED,
                        error=failure,
                    )
        claims = [
            SentClaim(record, answer) for record, answer in zip(records, answers, strict=True)
        ]
        for call, claim in zip(calls, claims, strict=True):
            if _won(claim):  # renewed while its call waits to start
                claim.lease = self._start_lease(call, claim.record)
        return claims

    async def abandon(self, claims: Iterable[SentClaim]) -> None:
        """Release the claims of `claim_each` that no call took (their calls never
        started). A claim that was won is released now (in the background if that
        fails), one whose fate is unknown in the background (it may still land); the
        caller's cancellation does not interrupt it."""
        untaken = [claim for claim in claims if not claim.taken]
        self._abandon(c.record for c in untaken if isinstance(c.outcome, Exception))
        won = [claim for claim in untaken if _won(claim)]
        if won:
            await shielded(functools.partial(self._release_now, won))

    async def _release_now(self, claims: list[SentClaim]) -> None:
        for claim in claims:
            if claim.lease is not None:
                await cast(Lease, claim.lease).stop()
        records = [claim.record for claim in claims]
        store = self.persistence_store
        done = await outcomes(
            store.release(record.idempotency_key, owner=record.owner or "") for record in records
        )
        self._abandon(
            record for record, result in zip(records, done, strict=True) if result is not None
        )

    def _abandon(self, records: Iterable[DataRecord]) -> None:
        for record in records:
            assert record.owner is not None
            self._background.spawn(
                self._release_later, record.idempotency_key, record.owner, True, None
            )

    # end async-only
    def idempotency_key(self, payload: Any, key_source: Callable[..., Any] | None = None) -> str:
        """The key a call with ``payload`` would use (for debugging and tools)."""
        prefix = key_prefix_of(self.key_prefix, key_source)
        return idempotency_key(prefix, payload, self.config)

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until the background releases and completions of this engine's calls
        are done; True if they all finished within `timeout`.

        Calls that were cancelled or failed mid-flight free their claims (or store
        their results) in the background; tests and shutdown hooks await this.
        """
        return await self._background.drain(timeout)

    # -- the state machine ------------------------------------------------------------

    def _new_claim(self, call: PreparedCall) -> DataRecord:
        now = self._clock()
        in_progress_ms: int | None = None
        if call.lambda_context is not None:
            remaining_ms = call.lambda_context.get_remaining_time_in_millis()
            in_progress_ms = int(now * 1000) + int(remaining_ms)
        elif self.config.in_progress_lease_seconds is not None:
            in_progress_ms = int((now + self.config.in_progress_lease_seconds) * 1000)
        return DataRecord(
            idempotency_key=call.key,
            status=RecordStatus.INPROGRESS,
            expiry_timestamp=int(now) + self.config.expires_after_seconds,
            in_progress_expiry_timestamp=in_progress_ms,
            payload_hash=call.payload_hash,
            owner=new_owner_token(),
        )

    async def _claim(
        self, call: PreparedCall, record: DataRecord, sent: SentClaim | None = None
    ) -> ClaimResult:
        """One claim round trip whose outcome is never lost (`sent`: its answer, when
        `claim_each` sent it ahead).

        A claim interrupted by a cancellation, or failed on the client (a timeout, a
        dropped connection), may have landed on the server or may still land there:
        its owner-checked release is sent in the background, and again twice
        later for a claim that lands late. A claim answered with our own record (a
        client resent it after losing the first reply) is a win.
        """
        key, owner, watch = record.idempotency_key, record.owner, call.watch
        assert owner is not None
        message = "Failed to save in progress record to idempotency store"
        store = self.persistence_store if watch is None else watch.store  # timed if watched
        # Each failure is reported before the release is spawned: the event counts the
        # round trips of the call so far, and the release is one more.
        try:
            if sent is None:
                result = await store.claim(record, now=self._clock())
            else:
                sent.taken = True
                if isinstance(sent.outcome, Exception):
                    raise sent.outcome.with_traceback(None)  # may be shared: no old frames
                result = sent.outcome
        except Cancelled as exc:
            self._reporter.emit(
                EventKind.CANCELLED, key, watch, outcome=CallOutcome.CANCELLED, error=exc
            )
            self._background.spawn(self._release_later, key, owner, True, watch)
            raise
        except Exception as exc:
            error = store_error(message, key, exc)
            self._store_error(call, error, "the claim failed", CallOutcome.ERROR)
            # A record that cannot be read, or a store that refused the call as set up
            # (a missing table, a denied write), wrote nothing: no release to send.
            if not isinstance(
                exc, IdempotencyInvalidStatusError | IdempotencyPersistenceMisconfiguredError
            ):
                self._background.spawn(self._release_later, key, owner, True, watch)
            if error is exc:
                raise
            raise error from exc
        if is_own(result, owner):
            return ClaimResult(claimed=True)
        return result

    def _validate(self, call: PreparedCall, stored_hash: str | None) -> None:
        if call.payload_hash is not None and stored_hash != call.payload_hash:
            error = IdempotencyValidationError(
                "Payload does not match stored record for this event key"
            )
            self._reporter.emit(
                EventKind.PAYLOAD_MISMATCH,
                call.key,
                call.watch,
                outcome=CallOutcome.REFUSED,
                error=error,
            )
            raise error

    def _in_progress(self, call: PreparedCall, detail: str) -> IdempotencyAlreadyInProgressError:
        """The error refusing `call` as in progress, reported with `detail`."""
        self._reporter.emit(
            EventKind.IN_PROGRESS, call.key, call.watch, outcome=CallOutcome.REFUSED, detail=detail
        )
        return IdempotencyAlreadyInProgressError(  # Powertools' message
            in_progress_message(self.config.event_key_jmespath, call.key, self.persistence_store)
        )

    def _taken_over(self, call: PreparedCall, seen: DataRecord) -> None:
        """Report a claim over `seen`, a record the call saw orphaned or expired: at
        WARNING for an orphaned claim (its owner stopped renewing it, and may still run)."""
        orphaned = seen.status is RecordStatus.INPROGRESS and not seen.is_expired(self._clock())
        self._reporter.emit(
            EventKind.TAKEN_OVER,
            call.key,
            call.watch,
            level=logging.WARNING if orphaned else logging.DEBUG,
            detail="the claim was orphaned" if orphaned else "the record had expired",
        )

    def _store_error(
        self,
        call: PreparedCall,
        error: BaseException,
        what: str,
        outcome: CallOutcome | None,
        *,
        exc_info: bool = False,
    ) -> None:
        self._reporter.emit(
            EventKind.STORE_ERROR,
            call.key,
            call.watch,
            outcome=outcome,
            error=error,
            detail=f"{what}: {describe(error)}",
            exc_info=exc_info,
        )

    def _replay(self, call: PreparedCall, record: DataRecord, kind: EventKind) -> Any:
        """The stored result of `record`, through the serializer and the hook; `kind`
        (a replay from the store, the local cache or a waited-for call) reported."""
        try:
            stored = record.response_json()
        except (ValueError, RecursionError) as exc:
            key = record.idempotency_key
            error = invalid_record(
                "Failed to get record from idempotency store",
                key,
                IdempotencyInvalidStatusError("its data is not JSON"),
            )
            self._store_error(call, error, "the stored record is unusable", CallOutcome.ERROR)
            raise error from exc
        try:
            response = None if stored is None else self.output_serializer.from_dict(stored)
            if self.config.response_hook is not None:
                response = self.config.response_hook(response, record)
        except Exception as exc:  # the serializer's or the hook's
            if call.watch is not None:
                self._reporter.emit(
                    kind, call.key, call.watch, outcome=CallOutcome.ERROR, error=exc
                )
            raise
        if call.watch is not None:
            self._reporter.emit(kind, call.key, call.watch, outcome=CallOutcome.REPLAYED)
        return response

    # -- running the function -----------------------------------------------------------

    async def _execute(
        self,
        call: PreparedCall,
        claim: DataRecord,
        fn: Callable[[], Awaitable[T]],
        lease: Lease | None = None,
    ) -> T:
        """Run `fn` under `claim` (renewed by `lease`, started here when not given)."""
        owner = claim.owner
        assert owner is not None
        flight = self._flights.start(call.key, call.payload_hash)
        if lease is None:
            lease = self._start_lease(call, claim)
        try:
            try:
                result = await fn()
            except BaseException as error:
                ended = CallOutcome.FAILED
                if isinstance(error, Cancelled):
                    ended = CallOutcome.CANCELLED
                try:
                    await self._release(call, owner, error, ended, lease=lease)
                except IdempotencyPersistenceLayerError:
                    if isinstance(error, Exception):
                        raise
                    # A cancellation or interrupt stays what it is (the release failure
                    # was logged with its traceback); the release is retried in the
                    # background, and the lease frees the key at worst.
                raise
            completed = await self._complete(call, owner, result, lease)
            self._cache.put(completed)
            flight.outcome.set(completed)
            return result
        finally:
            self._flights.land(call.key, flight)

    async def _complete(
        self, call: PreparedCall, owner: str, result: Any, lease: Lease | None
    ) -> DataRecord:
        """Store the function's result, or say exactly why it was not stored.

        The function has run, so its result is what prevents a second execution: a
        completion interrupted by a cancellation or a store failure is retried in the
        background (completions are safe to repeat), never traded for a release. A
        result that cannot be stored at all (not JSON-able, too large) releases the key.
        """
        try:
            data = None if result is None else self.output_serializer.to_dict(result)
            response_data = dumps_result(data)
        except Exception as exc:
            unusable = IdempotencySerializationError(
                f"the result of type {type(result).__name__} cannot be stored as JSON; "
                "the key was released (return JSON-able data or pass an output_serializer)",
                exc,
                result=result,
            )
            await self._release(call, owner, unusable, CallOutcome.NOT_STORED, lease=lease)
            raise unusable from exc
        completed = DataRecord(
            idempotency_key=call.key,
            status=RecordStatus.COMPLETED,
            expiry_timestamp=int(self._clock()) + self.config.expires_after_seconds,
            response_data=response_data,
            payload_hash=call.payload_hash,
        )
        watch = call.watch
        try:
            if lease is not None:
                await lease.stop()  # no renewal may land after the completion
                if lease.lost:
                    raise IdempotencyClaimLostError(
                        f"the claim on {call.key!r} was taken over while the function ran; "
                        "its result was not stored (the result is attached)",
                        key=call.key,
                    )
            store = self.persistence_store if watch is None else watch.store
            await store.complete(completed, owner=owner)
        except Cancelled as exc:
            self._reporter.emit(
                EventKind.CANCELLED,
                call.key,
                watch,
                outcome=CallOutcome.CANCELLED,
                error=exc,
                detail="the result is stored in the background",
            )
            self._background.spawn(self._complete_later, completed, owner, watch)
            raise
        except IdempotencyClaimLostError as exc:
            exc.result = result
            self._reporter.emit(
                EventKind.CLAIM_LOST,
                call.key,
                watch,
                outcome=CallOutcome.NOT_STORED,
                error=exc,
                detail="another call took the claim over while the function ran; "
                "its result was not stored",
            )
            raise
        except IdempotencyCompletionError as exc:  # the store cannot hold this result
            exc.result = result
            await self._release(call, owner, exc, CallOutcome.NOT_STORED)
            raise
        except Exception as exc:
            error = IdempotencyCompletionError(  # Powertools' message; ours in the docstring
                "Failed to update record state to success in idempotency store",
                exc,
                result=result,
            )
            error.transient = is_transient(exc)  # a retry later replays the result
            self._store_error(
                call,
                error,
                "the completion failed (retried in the background)",
                CallOutcome.NOT_STORED,
            )
            self._background.spawn(self._complete_later, completed, owner, watch)
            raise error from exc
        if watch is not None:
            self._reporter.emit(EventKind.COMPLETED, call.key, watch, outcome=CallOutcome.EXECUTED)
        return completed

    async def _release(
        self,
        call: PreparedCall,
        owner: str,
        error: BaseException,
        outcome: CallOutcome,
        *,
        lease: Lease | None = None,
    ) -> None:
        """Stop renewing, then delete our claim because of `error`; survives the
        caller's cancellation.

        The release ends the call with `outcome` (reported as `RELEASED`); a release
        that fails is reported as a store error, retried in the background, and raised.
        """
        key, watch = call.key, call.watch
        message = "Failed to delete record from idempotency store"

        async def release() -> None:
            if lease is not None:
                await lease.stop()
            store = self.persistence_store if watch is None else watch.store
            try:
                await store.release(key, owner=owner)
            except Exception as exc:
                # A cancellation or interrupt is raised instead of this error: then the
                # log line carries its traceback.
                self._store_error(
                    call,
                    store_error(message, key, exc),
                    f"the claim could not be released after {type(error).__name__}",
                    outcome,
                    exc_info=not isinstance(error, Exception),
                )
                self._background.spawn(self._release_later, key, owner, False, watch)
                raise
            if watch is not None:
                self._reporter.emit(EventKind.RELEASED, key, watch, outcome=outcome, error=error)

        self._cache.discard(key)
        with store_errors(message, key):
            await shielded(release)

    # -- work left to the background ------------------------------------------------------

    async def _release_later(
        self, key: str, owner: str, confirm: bool, watch: Watch | None
    ) -> None:
        """Release `owner`'s claim, retrying failures with backoff (bounded).

        With `confirm`, release again after each of `_CONFIRM_RELEASE_DELAYS`: the
        claim this follows may have been queued or in flight, and land late.
        """
        release = (self.persistence_store if watch is None else watch.store).release
        released = await self._retry("release", key, watch, release, key, owner=owner)
        if released and watch is not None and not confirm:
            # A release that failed, done now. (One that follows a claim whose fate
            # is unknown is a precaution, not a decision of the call: not reported.)
            self._reporter.emit(EventKind.RELEASED, key, watch, detail="released in the background")
        if released and confirm:
            for delay in _CONFIRM_RELEASE_DELAYS:
                await sleep(delay)
                if not await self._retry("release", key, watch, release, key, owner=owner):
                    return

    async def _complete_later(self, record: DataRecord, owner: str, watch: Watch | None) -> None:
        """Store a result whose completion was interrupted (retried, bounded)."""
        key = record.idempotency_key
        complete = (self.persistence_store if watch is None else watch.store).complete
        try:
            if await self._retry("completion", key, watch, complete, record, owner=owner):
                self._cache.put(record)
                if watch is not None:
                    self._reporter.emit(
                        EventKind.COMPLETED, key, watch, detail="stored in the background"
                    )
        except IdempotencyClaimLostError as exc:
            self._reporter.emit(
                EventKind.CLAIM_LOST,
                key,
                watch,
                error=exc,
                detail="the claim was taken over; its result was not stored",
            )
        except IdempotencyCompletionError:
            await self._release_later(key, owner, False, watch)

    async def _retry(
        self,
        what: str,
        key: str,
        watch: Watch | None,
        operation: Callable[..., Awaitable[Any]],
        *args: Any,
        **kw: Any,
    ) -> bool:
        """Await `operation(*args, **kw)` until it succeeds, at most `_CLEANUP_ATTEMPTS`
        times; a claim lost or a result too large is raised at once. Each failure is
        reported as a store error of the call `watch` watches; `operation` is a method
        of its timing view (`Watch.store`) when watched, so each attempt is a timed
        round trip.

        Every other failure is retried, even one that does not look transient: a
        client still connecting, or a node changing role in a failover, fails in ways
        no classification foresees, and a release or completion left undone keeps
        the key locked until its lease runs out. The attempts are bounded and safe to
        repeat.
        """
        delay = _CLEANUP_FIRST_DELAY
        for attempt in range(1, _CLEANUP_ATTEMPTS + 1):
            try:
                await operation(*args, **kw)
            except (IdempotencyClaimLostError, IdempotencyCompletionError):
                raise
            except Exception as exc:
                last = attempt == _CLEANUP_ATTEMPTS
                self._reporter.emit(
                    EventKind.STORE_ERROR,
                    key,
                    watch,
                    error=exc,
                    detail=f"gave up the background {what} after {attempt} attempts"
                    if last
                    else f"the background {what} failed; retrying in {delay:.2g}s",
                    exc_info=True,
                )
                if last:
                    return False
                await sleep(delay)
                delay *= 2
            else:
                return True
        return False  # pragma: no cover - the loop always returns

    # -- lease renewal ----------------------------------------------------------------

    def _start_lease(self, call: PreparedCall, claim: DataRecord) -> Lease | None:
        if call.lambda_context is not None or self._leases is None:
            return None
        return self._leases.keep(claim, call.watch)

    # -- waiting for a duplicate's result -------------------------------------------------

    async def _join(
        self, call: PreparedCall, flight: Flight, deadline: float | None
    ) -> DataRecord | None:
        """Share the result of a call of this process that holds the key."""
        self._validate(call, flight.payload_hash)
        if deadline is None:
            raise self._in_progress(call, "a call of this process holds the key")
        left = deadline - self._clock()
        if left <= 0:
            raise self._in_progress(call, "a call of this process still holds the key")
        try:
            return await self._flights.join(flight, left)
        except TimeoutError:
            raise self._in_progress(
                call, "a call of this process held the key past the wait"
            ) from None

    async def _wait(
        self, call: PreparedCall, deadline: float | None
    ) -> tuple[DataRecord | None, DataRecord | None]:
        """Poll for the result of a call that holds the key elsewhere.

        Returns ``(completed, None)`` with the completed record, or ``(None, seen)``
        when the key became free so the caller should claim it: `seen` is the record
        found orphaned or expired, None when it was released.
        """
        if deadline is None:
            raise self._in_progress(call, "another call holds the key")
        interval = self.config.wait_poll_interval_seconds
        store = self.persistence_store if call.watch is None else call.watch.store
        while True:
            flight = self._flights.find(call.key)
            if flight is not None:
                return await self._join(call, flight, deadline), None
            left = deadline - self._clock()
            if left <= 0:
                raise self._in_progress(call, "another call held the key past the wait")
            await sleep(min(interval, left))
            interval = min(interval * 2, _MAX_POLL_INTERVAL)
            try:
                with store_errors("Failed to get record from idempotency store", call.key):
                    record = await store.get(call.key, now=self._clock())
            except Exception as exc:
                self._store_error(call, exc, "reading the record failed", CallOutcome.ERROR)
                raise
            if record is None:
                return None, None
            if record.is_claimable(self._clock()):
                return None, record
            self._validate(call, record.payload_hash)
            if record.status is RecordStatus.COMPLETED:
                self._cache.put(record)
                return record, None


# begin async-only
def _won(claim: SentClaim) -> bool:
    """True when `claim` holds its key: written, or found as the caller's own."""
    answer, owner = claim.outcome, claim.record.owner
    if isinstance(answer, Exception):
        return False
    return answer.claimed or (owner is not None and is_own(answer, owner))


# end async-only
def _freed(seen: DataRecord | None) -> str:
    """How a key a duplicate waited for became free."""
    if seen is None:
        return "the key was released"
    if seen.status is RecordStatus.INPROGRESS:
        return "the claim was orphaned"
    return "the record expired"
