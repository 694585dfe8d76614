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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from typing_extensions import TypeVarTuple, Unpack

from aioidempotency._async.concurrency import Background, Cancelled, shielded, sleep
from aioidempotency._async.flights import Flight, Flights
from aioidempotency._async.lease import Lease, Leases
from aioidempotency._calls import (
    DISABLED_ENV,
    DISABLED_MESSAGE,
    IdempotencyDisabledWarning,
    PreparedCall,
    idempotency_key,
    is_disabled,
    is_durable_replay,
    key_prefix_of,
    prepare_call,
)
from aioidempotency._config import IdempotencyConfig, LambdaContextLike
from aioidempotency._contract import ClaimResult
from aioidempotency._encoding import dumps_result
from aioidempotency._errors import invalid_record, is_own, is_transient, store_errors
from aioidempotency._local_cache import LocalCache
from aioidempotency._records import DataRecord, RecordStatus, new_owner_token
from aioidempotency._twins import StoreForAsync, as_async_store
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyCompletionError,
    IdempotencyInconsistentStateError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceLayerError,
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
    "is_disabled",
    "is_durable_replay",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

logger = logging.getLogger("aioidempotency")

_MAX_CLAIM_ATTEMPTS = 3
_MAX_POLL_INTERVAL = 1.0
_CLEANUP_ATTEMPTS = 8
"""Attempts of a background release or completion before it gives up (the lease, or
the expiry without one, then frees the key): 8 attempts back off over about 13 s."""
_CLEANUP_FIRST_DELAY = 0.05
_CONFIRM_RELEASE_DELAY = 1.0
"""After a claim whose outcome is unknown (it failed or timed out on the client, and
may still land on the server), the release is sent once more after this delay."""


class IdempotencyEngine:
    """Runs functions at most once per payload within the expiry window.

    ``persistence_store`` keeps the records; ``config`` says what to key on and how
    long to remember; ``key_prefix`` replaces the prefix otherwise derived from the
    function (``{AWS_LAMBDA_FUNCTION_NAME}.{module}.{qualname}``). ``output_serializer``
    turns results into JSON-able data and back; ``clock`` (epoch seconds) is the only
    time the engine and its stores compare against. One engine may serve many
    concurrent calls; it keeps no per-call state.
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
        lease = self.config.in_progress_lease_seconds
        self._leases = (
            None if lease is None else Leases(self.persistence_store, lease=lease, clock=clock)
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
        return prepare_call(
            payload,
            self.config,
            prefix=key_prefix_of(self.key_prefix, key_source),
            lambda_context=lambda_context,
            durable_replay=durable_replay,
            stacklevel=4,
        )

    def replay_from_cache(self, call: PreparedCall) -> tuple[bool, Any]:
        """``(True, result)`` when the local cache holds the call's result, without I/O."""
        cached = self._cache.get(call.key)
        if cached is None:
            return False, None
        self._validate(call, cached.payload_hash)
        return True, self._replay(cached)

    async def run_prepared(self, call: PreparedCall, fn: Callable[[], Awaitable[T]]) -> T:
        """Claim, run and complete a call prepared by `prepare_call` (or replay it)."""
        wait = self.config.wait_for_in_progress_seconds
        deadline = self._clock() + wait if wait > 0 else None
        inconsistent = 0
        while True:
            # A durable replay does not join the suspended invocation it replays.
            flight = None if call.durable_replay else self._flights.find(call.key)
            if flight is not None:
                record = await self._join(call, flight, deadline)
                if record is not None:
                    return cast(T, self._replay(record))
                continue  # the owner released the key: try to claim it
            in_progress = self._new_claim(call)
            result = await self._claim(in_progress)
            if result.claimed:
                return await self._execute(call, in_progress, fn)
            existing = result.existing
            if existing is not None:
                self._validate(call, existing.payload_hash)
                if existing.is_claimable(self._clock()):
                    existing = None  # it changed between the claim and the read
                elif existing.status is RecordStatus.COMPLETED:
                    self._cache.put(existing)
                    return cast(T, self._replay(existing))
                elif call.durable_replay and existing.owner is not None:
                    # A durable execution replayed after a suspension finds the claim
                    # its first invocation took (as Powertools 3.37 does): run under it
                    # and complete it, instead of refusing it as in progress.
                    return await self._execute(call, existing, fn)
            if existing is not None or result.busy:  # in progress elsewhere
                record = await self._wait(call, deadline)
                if record is not None:
                    return cast(T, self._replay(record))
                continue
            inconsistent += 1
            if inconsistent >= _MAX_CLAIM_ATTEMPTS:
                raise IdempotencyInconsistentStateError(
                    "save_inprogress and get_record return inconsistent results."
                )

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

    async def _claim(self, record: DataRecord) -> ClaimResult:
        """One claim round trip whose outcome is never lost.

        A claim interrupted by a cancellation, or failed on the client (a timeout, a
        dropped connection), may have landed on the server or may still land there:
        its owner-checked release is sent in the background, and once more a moment
        later for a claim that lands late. A claim answered with our own record (a
        client resent it after losing the first reply) is a win.
        """
        key, owner = record.idempotency_key, record.owner
        assert owner is not None
        with store_errors("Failed to save in progress record to idempotency store", key):
            try:
                result = await self.persistence_store.claim(record, now=self._clock())
            except Cancelled:
                self._background.spawn(self._release_later, key, owner, True)
                raise
            except Exception as exc:
                if not isinstance(exc, IdempotencyInvalidStatusError):  # else it did not land
                    self._background.spawn(self._release_later, key, owner, True)
                raise
        if is_own(result, owner):
            return ClaimResult(claimed=True)
        return result

    def _validate(self, call: PreparedCall, stored_hash: str | None) -> None:
        if call.payload_hash is not None and stored_hash != call.payload_hash:
            raise IdempotencyValidationError(
                "Payload does not match stored record for this event key"
            )

    def _in_progress_error(self, key: str) -> IdempotencyAlreadyInProgressError:
        return IdempotencyAlreadyInProgressError(
            "Execution already in progress with idempotency key: "
            f"{self.config.event_key_jmespath}={key}"
        )

    def _replay(self, record: DataRecord) -> Any:
        try:
            stored = record.response_json()
        except (ValueError, RecursionError) as exc:
            key = record.idempotency_key
            raise invalid_record(
                key, IdempotencyInvalidStatusError("its data is not JSON")
            ) from exc
        response = None if stored is None else self.output_serializer.from_dict(stored)
        if self.config.response_hook is not None:
            return self.config.response_hook(response, record)
        return response

    # -- running the function -----------------------------------------------------------

    async def _execute(
        self, call: PreparedCall, claim: DataRecord, fn: Callable[[], Awaitable[T]]
    ) -> T:
        owner = claim.owner
        assert owner is not None
        flight = self._flights.start(call.key, call.payload_hash)
        lease = self._start_lease(call, claim)
        try:
            try:
                result = await fn()
            except BaseException as error:
                try:
                    await self._release(call.key, owner, lease=lease)
                except IdempotencyPersistenceLayerError:
                    if isinstance(error, Exception):
                        raise
                    # A cancellation or interrupt stays what it is; the release is
                    # retried in the background, and the lease frees the key at worst.
                    logger.exception("could not release %s after %r", call.key, error)
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
            await self._release(call.key, owner, lease=lease)
            raise IdempotencySerializationError(
                f"the result of type {type(result).__name__} cannot be stored as JSON; "
                "the key was released (return JSON-able data or pass an output_serializer)",
                exc,
                result=result,
            ) from exc
        completed = DataRecord(
            idempotency_key=call.key,
            status=RecordStatus.COMPLETED,
            expiry_timestamp=int(self._clock()) + self.config.expires_after_seconds,
            response_data=response_data,
            payload_hash=call.payload_hash,
        )
        try:
            if lease is not None:
                await lease.stop()  # no renewal may land after the completion
                if lease.lost:
                    raise IdempotencyClaimLostError(
                        f"the claim on {call.key!r} was taken over while the function ran; "
                        "its result was not stored (the result is attached)",
                        key=call.key,
                    )
            await self.persistence_store.complete(completed, owner=owner)
        except Cancelled:
            self._background.spawn(self._complete_later, completed, owner)
            raise
        except IdempotencyClaimLostError as exc:
            exc.result = result
            raise
        except IdempotencyCompletionError as exc:  # the store cannot hold this result
            exc.result = result
            await self._release(call.key, owner)
            raise
        except Exception as exc:
            self._background.spawn(self._complete_later, completed, owner)
            error = IdempotencyCompletionError(
                "Failed to update record state to success in idempotency store; "
                "the function ran and its result is attached. Storing it is retried in "
                "the background: until then the key is in progress",
                exc,
                result=result,
            )
            error.transient = is_transient(exc)  # a retry later replays the result
            raise error from exc
        return completed

    async def _release(self, key: str, owner: str, *, lease: Lease | None = None) -> None:
        """Stop renewing, then delete our claim; survives the caller's cancellation.

        A release that fails is retried in the background, and the error raised.
        """

        async def release() -> None:
            if lease is not None:
                await lease.stop()
            try:
                await self.persistence_store.release(key, owner=owner)
            except Exception:
                self._background.spawn(self._release_later, key, owner, False)
                raise

        self._cache.discard(key)
        with store_errors("Failed to delete record from idempotency store", key):
            await shielded(release)

    # -- work left to the background ------------------------------------------------------

    async def _release_later(self, key: str, owner: str, confirm: bool) -> None:
        """Release `owner`'s claim, retrying failures with backoff (bounded).

        With `confirm`, release once more after `_CONFIRM_RELEASE_DELAY`: the claim
        this follows may have been in flight on another connection and land late.
        """
        release = self.persistence_store.release
        released = await self._retry(f"release of {key}", release, key, owner=owner)
        if released and confirm:
            await sleep(_CONFIRM_RELEASE_DELAY)
            await self._retry(f"release of {key}", release, key, owner=owner)

    async def _complete_later(self, record: DataRecord, owner: str) -> None:
        """Store a result whose completion was interrupted (retried, bounded)."""
        try:
            if await self._retry(
                f"completion of {record.idempotency_key}",
                self.persistence_store.complete,
                record,
                owner=owner,
            ):
                self._cache.put(record)
        except IdempotencyClaimLostError:
            logger.warning(
                "the claim on %s was taken over; its result was not stored",
                record.idempotency_key,
            )
        except IdempotencyCompletionError:
            await self._release_later(record.idempotency_key, owner, False)

    async def _retry(
        self, what: str, operation: Callable[..., Awaitable[Any]], *args: Any, **kw: Any
    ) -> bool:
        """Await `operation(*args, **kw)` until it succeeds, at most `_CLEANUP_ATTEMPTS`
        times; a claim lost or a result too large is raised at once.

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
            except Exception:
                if attempt == _CLEANUP_ATTEMPTS:
                    logger.warning("gave up the %s after %d attempts", what, attempt, exc_info=True)
                    return False
                logger.warning("the %s failed; retrying in %.2gs", what, delay, exc_info=True)
                await sleep(delay)
                delay *= 2
            else:
                return True
        return False  # pragma: no cover - the loop always returns

    # -- lease renewal ----------------------------------------------------------------

    def _start_lease(self, call: PreparedCall, claim: DataRecord) -> Lease | None:
        if call.lambda_context is not None or self._leases is None:
            return None
        return self._leases.keep(claim)

    # -- waiting for a duplicate's result -------------------------------------------------

    async def _join(
        self, call: PreparedCall, flight: Flight, deadline: float | None
    ) -> DataRecord | None:
        """Share the result of a call of this process that holds the key."""
        self._validate(call, flight.payload_hash)
        if deadline is None:
            raise self._in_progress_error(call.key)
        left = deadline - self._clock()
        if left <= 0:
            raise self._in_progress_error(call.key)
        try:
            return await self._flights.join(flight, left)
        except TimeoutError:
            raise self._in_progress_error(call.key) from None

    async def _wait(self, call: PreparedCall, deadline: float | None) -> DataRecord | None:
        """Poll for the result of a call that holds the key elsewhere.

        Returns the completed record, or None when the key became free (released,
        expired, or orphaned) so the caller should claim it.
        """
        if deadline is None:
            raise self._in_progress_error(call.key)
        interval = self.config.wait_poll_interval_seconds
        while True:
            flight = self._flights.find(call.key)
            if flight is not None:
                return await self._join(call, flight, deadline)
            left = deadline - self._clock()
            if left <= 0:
                raise self._in_progress_error(call.key)
            await sleep(min(interval, left))
            interval = min(interval * 2, _MAX_POLL_INTERVAL)
            with store_errors("Failed to get record from idempotency store", call.key):
                record = await self.persistence_store.get(call.key, now=self._clock())
            if record is None or record.is_claimable(self._clock()):
                return None
            self._validate(call, record.payload_hash)
            if record.status is RecordStatus.COMPLETED:
                self._cache.put(record)
                return record
