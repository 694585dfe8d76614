"""`EventLog`: what the engines decided during a test, from the public events API
(`aioidempotency.events`), with assertions about it; `orphan_claim`, a claim left by a
worker that crashed; and `key_for`, the key of a decorated function's call."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from typing_extensions import Self

from aioidempotency._records import DataRecord, RecordStatus, new_owner_token
from aioidempotency._twins import StoreForSync, as_sync_store
from aioidempotency.events import CallOutcome, EventKind, IdempotencyEvent, listen
from aioidempotency.testing._clock import default_clock

__all__ = ["EventLog", "key_for", "orphan_claim"]

RUNS = (EventKind.CLAIMED, EventKind.TAKEN_OVER, EventKind.RESUMED)
"""The decisions after which a call's function runs under a claim."""
ENDS = (EventKind.COMPLETED, EventKind.RELEASED, EventKind.CLAIM_LOST, EventKind.LEASE_LOST)
"""The decisions after which a call holds its claim no more."""
REPLAYS = (CallOutcome.REPLAYED,)


class EventLog:
    """Keeps every event of every engine of the process while it listens.

    ``with EventLog() as log:`` (or `start` and `stop`) listens through
    `aioidempotency.events.listen`; the log is also a listener itself, for a config's
    ``on_event``. Events come from any task or thread; reading the log is safe from
    any. The ``assert_*`` methods take the idempotency `key` to look at, or a key
    `prefix`; with neither, the only key the log saw (an `AssertionError` if it saw
    several). They raise `AssertionError` with what the log saw instead.
    """

    def __init__(self) -> None:
        self.events: list[IdempotencyEvent] = []
        self._changed = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._unsubscribe: Callable[[], None] | None = None

    # -- listening -------------------------------------------------------------------------

    def __call__(self, event: IdempotencyEvent) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(_wake, waiter)

    def start(self) -> Self:
        """Listen to every engine of the process (until `stop`)."""
        if self._unsubscribe is None:
            self._unsubscribe = listen(self)
        return self

    def stop(self) -> None:
        """Stop listening; the events kept stay."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget the events kept so far."""
        with self._changed:
            self.events.clear()

    # -- reading ---------------------------------------------------------------------------

    def keys(self, prefix: str | None = None) -> list[str]:
        """The idempotency keys of the events (with `prefix`, if given), first seen first."""
        seen: dict[str, None] = {}
        for event in self._snapshot():
            if event.key is not None and (prefix is None or event.prefix == prefix):
                seen.setdefault(event.key)
        return list(seen)

    def select(
        self,
        key: str | None = None,
        *,
        prefix: str | None = None,
        kind: EventKind | None = None,
    ) -> list[IdempotencyEvent]:
        """The events of `key` (any key when None), of `prefix` and of `kind`, in order."""
        return [
            event
            for event in self._snapshot()
            if (key is None or event.key == key)
            and (prefix is None or event.prefix == prefix)
            and (kind is None or event.kind is kind)
        ]

    def calls(
        self, key: str | None = None, *, prefix: str | None = None
    ) -> list[list[IdempotencyEvent]]:
        """The events of each call of `key` (any key when None) and `prefix`, grouped by
        call, calls in the order they started."""
        calls: dict[object, list[IdempotencyEvent]] = {}
        for index, event in enumerate(self.select(key, prefix=prefix)):
            # An event outside a watched call (no call id) is a call of its own.
            call = event.call_id if event.call_id is not None else ("unwatched", index)
            calls.setdefault(call, []).append(event)
        return list(calls.values())

    def outcomes(self, key: str | None = None, *, prefix: str | None = None) -> list[CallOutcome]:
        """How each call of `key` and `prefix` that ended so far ended, in order."""
        return [e.outcome for e in self.select(key, prefix=prefix) if e.outcome is not None]

    # -- assertions ------------------------------------------------------------------------

    def the_key(self, key: str | None = None, prefix: str | None = None) -> str:
        """`key`, or else the only key the log saw (with `prefix`, if given)."""
        if key is not None:
            return key
        keys = self.keys(prefix)
        if len(keys) != 1:
            raise AssertionError(
                f"say which key: the log saw {len(keys)} keys"
                + (f" with prefix {prefix!r}" if prefix is not None else "")
                + (f" ({', '.join(keys)})" if keys else "")
            )
        return keys[0]

    def assert_ran_once(self, key: str | None = None, *, prefix: str | None = None) -> str:
        """The function of `key` ran exactly once, under a claim, and its result was
        stored. Returns the key."""
        key = self.the_key(key, prefix)
        runs = [call for call in self.calls(key) if any(e.kind in RUNS for e in call)]
        if len(runs) != 1:
            raise AssertionError(
                f"{key}: the function ran {len(runs)} times, not once\n{self._story(key)}"
            )
        if not any(e.kind is EventKind.COMPLETED for e in runs[0]):
            raise AssertionError(
                f"{key}: the function ran but its result was not stored\n{self._story(key)}"
            )
        return key

    def assert_replayed(
        self, key: str | None = None, *, prefix: str | None = None, times: int | None = None
    ) -> int:
        """A call of `key` (or exactly `times` calls) got the stored result without
        running the function. Returns how many did."""
        key = self.the_key(key, prefix)
        replays = sum(1 for outcome in self.outcomes(key) if outcome in REPLAYS)
        if replays == 0 if times is None else replays != times:
            wanted = "at least 1" if times is None else str(times)
            raise AssertionError(
                f"{key}: {replays} calls replayed the stored result, not {wanted}\n"
                f"{self._story(key)}"
            )
        return replays

    def assert_released(
        self,
        key: str | None = None,
        *,
        prefix: str | None = None,
        error: type[BaseException] | str | None = None,
    ) -> IdempotencyEvent:
        """A claim of `key` was released (the function raised `error`, when given, or
        its result could not be stored). Returns the release's event."""
        key = self.the_key(key, prefix)
        name = error.__name__ if isinstance(error, type) else error
        for event in self.select(key, kind=EventKind.RELEASED):
            if name is None or event.error == name:
                return event
        raise AssertionError(
            f"{key}: no claim was released"
            + (f" after a {name}" if name is not None else "")
            + f"\n{self._story(key)}"
        )

    def assert_left_no_claim(
        self,
        key: str | None = None,
        *,
        prefix: str | None = None,
        store: StoreForSync | None = None,
        now: float | None = None,
    ) -> None:
        """Every call of `key` that claimed it completed or released its claim (or lost
        it to another call); with `store`, the store also holds no live in-progress
        record of `key` at `now` (the plugin's clock by default). The store, async or
        sync, is read from this thread, as sync code would."""
        key = self.the_key(key, prefix)
        held = [
            call
            for call in self.calls(key)
            if any(e.kind in RUNS for e in call) and not any(e.kind in ENDS for e in call)
        ]
        if held:
            raise AssertionError(
                f"{key}: {len(held)} calls claimed the key and never let it go\n{self._story(key)}"
            )
        if store is not None:
            record = as_sync_store(store).get(key, now=default_clock() if now is None else now)
            moment = default_clock() if now is None else now
            if (
                record is not None
                and record.status is RecordStatus.INPROGRESS
                and not record.is_claimable(moment)
            ):
                raise AssertionError(f"{key}: the store still holds a claim: {record!r}")

    # -- waiting ---------------------------------------------------------------------------

    def wait_for(
        self,
        kind: EventKind,
        *,
        key: str | None = None,
        prefix: str | None = None,
        count: int = 1,
        timeout: float = 10.0,
    ) -> IdempotencyEvent:
        """Block until the log holds `count` events of `kind` (of `key`, `prefix`) and
        return the last of them; `TimeoutError` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.select(key, prefix=prefix, kind=kind)
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(_not_seen(kind, count, len(found), timeout))
                self._changed.wait(left)

    async def wait_for_async(
        self,
        kind: EventKind,
        *,
        key: str | None = None,
        prefix: str | None = None,
        count: int = 1,
        timeout: float = 10.0,
    ) -> IdempotencyEvent:
        """`wait_for` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            with self._changed:
                self._waiters.append((loop, waiter))
                found = self.select(key, prefix=prefix, kind=kind)
            if len(found) >= count:
                return found[count - 1]
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(_not_seen(kind, count, len(found), timeout))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, left)

    # -- helpers ---------------------------------------------------------------------------

    def _snapshot(self) -> list[IdempotencyEvent]:
        with self._changed:
            return list(self.events)

    def _story(self, key: str) -> str:
        return _describe(self.calls(key))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _not_seen(kind: EventKind, count: int, seen: int, timeout: float) -> str:
    return f"{count} {kind.value} events not seen within {timeout}s (seen: {seen})"


def _describe(calls: Iterable[list[IdempotencyEvent]]) -> str:
    lines = []
    for number, call in enumerate(calls, 1):
        kinds = " → ".join(e.kind.value + (f" ({e.error})" if e.error else "") for e in call)
        outcome = next((e.outcome.value for e in call if e.outcome is not None), "not ended")
        lines.append(f"  call {number}: {kinds}: {outcome}")
    return "events seen:\n" + ("\n".join(lines) if lines else "  none")


def orphan_claim(
    store: StoreForSync,
    key: str,
    *,
    now: float | None = None,
    lease_seconds: float = 60.0,
    expires_after_seconds: int = 3600,
    payload_hash: str | None = None,
) -> DataRecord:
    """Write the in-progress claim of a worker that crashed holding `key` at `now` (the
    plugin's clock by default): nobody renews it, so it is orphaned `lease_seconds`
    later and the next call takes the key over. Returns the claim. The store, async or
    sync, is written from this thread."""
    moment = default_clock() if now is None else now
    claim = DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(moment) + expires_after_seconds,
        in_progress_expiry_timestamp=int((moment + lease_seconds) * 1000),
        payload_hash=payload_hash,
        owner=new_owner_token(),
    )
    result = as_sync_store(store).claim(claim, now=moment)
    if not result.claimed:
        raise AssertionError(f"{key} is held already: {result.existing!r}")
    return claim


def key_for(function: Callable[..., Any], payload: Any) -> str:
    """The idempotency key of a call of `function` with `payload`: `function` is
    decorated with ``@idempotent_async``, ``@idempotent``, ``@idempotent_function`` (its
    payload is the argument it names) or their async twins, and may be wrapped further
    (``@lambda_handler``)."""
    engine = getattr(function, "engine", None)
    if engine is None:
        raise TypeError(f"{function!r} is not an idempotent function (it has no engine)")
    key: str = engine.idempotency_key(payload, key_source=inspect.unwrap(function))
    return key
