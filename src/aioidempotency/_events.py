"""Events: one per decision the engine takes, and the machinery that reports them.

The public names are re-exported by `aioidempotency.events`, whose docstring says how
events are delivered; `Reporter` (one per engine) builds, logs and delivers them.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import itertools
import logging
import threading
import types
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

__all__ = [
    "LOG_FIELDS",
    "CallOutcome",
    "EventKind",
    "EventListener",
    "IdempotencyEvent",
    "Reporter",
    "RoundTrip",
    "Watch",
    "describe",
    "listen",
    "log_event",
    "store_kind",
]


class EventKind(str, enum.Enum):
    """What the engine decided."""

    CLAIMED = "claimed"
    """The call claimed the key: its function runs now."""
    TAKEN_OVER = "taken_over"
    """The call claimed a key whose record it had seen orphaned (its owner stopped
    renewing its lease) or expired. A claim that replaces such a record in its one
    round trip, unseen, is reported as `CLAIMED`: stores do not say what they replaced."""
    RESUMED = "resumed"
    """A durable execution replayed after a suspension runs under the claim its first
    invocation took."""
    COMPLETED = "completed"
    """The function's result was stored."""
    REPLAYED = "replayed"
    """The stored result was returned, read from the store."""
    CACHE_HIT = "cache_hit"
    """The stored result was returned from the engine's local cache (no round trip)."""
    WAITED = "waited"
    """A duplicate waited for a running call: it got its result (outcome ``replayed``),
    or the key was freed and the duplicate claims it (no outcome)."""
    IN_PROGRESS = "in_progress"
    """Refused: another call holds the key (after waiting, if configured)."""
    PAYLOAD_MISMATCH = "payload_mismatch"
    """Refused: the key's stored payload hash differs from this call's."""
    RELEASED = "released"
    """The claim was released: the function raised (``error`` names the exception), or
    its result cannot be stored (not JSON-able, too large)."""
    CLAIM_LOST = "claim_lost"
    """The function ran but another call took its claim over: its result was not stored."""
    LEASE_RENEWED = "lease_renewed"
    """The in-progress claim's lease was renewed while the function runs."""
    LEASE_LOST = "lease_lost"
    """A lease renewal found the claim taken over or gone."""
    STORE_ERROR = "store_error"
    """A store operation failed (``error`` names the exception the caller sees)."""
    CANCELLED = "cancelled"
    """The call was cancelled (or interrupted) while it waited for the store or for a
    duplicate; a claim it may hold is released in the background."""
    NO_KEY = "no_key"
    """The payload has no idempotency key: the function runs unprotected (or, with
    ``raise_on_no_idempotency_key``, the call is refused)."""
    DISABLED = "disabled"
    """``POWERTOOLS_IDEMPOTENCY_DISABLED`` is set: the function runs unprotected."""


class CallOutcome(str, enum.Enum):
    """How a call ended; set on the last event of a call, None on the others."""

    EXECUTED = "executed"
    """The function ran and its result is stored."""
    REPLAYED = "replayed"
    """A stored result was returned; the function did not run."""
    REFUSED = "refused"
    """The call was refused (in progress, payload mismatch, no key): nothing ran."""
    FAILED = "failed"
    """The function raised; its claim was released."""
    NOT_STORED = "not_stored"
    """The function ran but its result is not stored (claim lost, result unusable, or
    the store failed: a completion that failed is retried in the background)."""
    ERROR = "error"
    """The store failed, or holds an unusable record, before the function ran."""
    CANCELLED = "cancelled"
    """The call was cancelled."""
    UNPROTECTED = "unprotected"
    """The function ran without idempotency (no key, or idempotency disabled)."""


class RoundTrip(NamedTuple):
    """One store operation of a call, timed by the engine's clock (an immutable tuple:
    a watched call builds one per round trip, three times faster than a frozen
    dataclass).

    - `operation`: the store method: ``claim``, ``get``, ``complete``, ``release`` or
      ``renew``.
    - `start`: seconds from the call's start to the moment the operation was sent.
    - `duration`: seconds from then until the store answered (or raised).
    - `error`: the type name of the exception the store raised, if any (never its
      message); ``CancelledError`` when the caller or the lease's end interrupted it.
    """

    operation: str
    start: float
    duration: float
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class IdempotencyEvent:
    """One decision of the engine about one call.

    - `kind`: the decision.
    - `key`: the idempotency key (``prefix#hash``); None when the payload had none.
    - `prefix`: the key prefix (by default the function: ``module.qualname``).
    - `store`: the kind of store: ``memory``, ``redis``, ``glide``, ``dynamodb``,
      ``cache`` (a Redis or Valkey store on a client of your own) or ``custom``.
    - `duration`: seconds since the call started, by the engine's clock; None for a
      call that started while nothing listened (a WARNING logged for it).
    - `round_trips`: store round trips of the call so far (renewals included); None
      as for `duration`.
    - `outcome`: how the call ended, on its last event; None on the others (and on
      events after its end: a background retry, a late completion).
    - `error`: the type name of the exception involved, if any (never its message).
    - `call_id`: a number unique to the call in this process, shared by its events;
      None as for `duration`.
    - `trips`: the store round trips of the call that ended since its previous event
      (`RoundTrip`: operation, start, duration, error), in the order they ended; each
      round trip is on one event only, so a call's trips are those of all its events.
      Empty as for `duration`.
    """

    kind: EventKind
    key: str | None
    prefix: str
    store: str
    duration: float | None
    round_trips: int | None
    outcome: CallOutcome | None = None
    error: str | None = None
    call_id: int | None = None
    trips: tuple[RoundTrip, ...] = ()

    @property
    def final(self) -> bool:
        """True for the last event of a call (it has an `outcome`)."""
        return self.outcome is not None


EventListener = Callable[[IdempotencyEvent], object]
"""A callable taking an `IdempotencyEvent`; its return value is ignored."""

LOG_FIELDS = (
    "idempotency_decision",
    "idempotency_key",
    "idempotency_prefix",
    "duration_ms",
    "idempotency_outcome",
    "idempotency_store",
    "idempotency_round_trips",
    "idempotency_error",
    "idempotency_call_id",
)
"""The ``extra`` attributes of every decision's log record (None when unknown)."""

logger = logging.getLogger("aioidempotency.events")
"""Where a listener that raised is reported."""


class _Listener:
    """A registered callback; `failed` once it raised (then logged at DEBUG only)."""

    __slots__ = ("callback", "failed")

    def __init__(self, callback: EventListener) -> None:
        if not callable(callback):
            raise TypeError(f"an event listener must be callable, not {type(callback)!r}")
        self.callback = callback
        self.failed = False

    def deliver(self, event: IdempotencyEvent) -> None:
        """Call the callback; an exception it raises is logged, never raised."""
        try:
            self.callback(event)
        except Exception:
            level = logging.DEBUG if self.failed else logging.WARNING
            self.failed = True
            logger.log(
                level,
                "the event listener %r raised on a %s event; the call goes on "
                "(later failures of this listener are logged at DEBUG)",
                self.callback,
                event.kind.value,
                exc_info=True,
            )


_listeners: tuple[_Listener, ...] = ()
_listeners_lock = threading.Lock()


def listen(callback: EventListener) -> Callable[[], None]:
    """Call ``callback(event)`` for every event of every engine in this process.

    Returns a function that unsubscribes it (calling it again does nothing). Listeners
    are called in the order they were registered, after the config's ``on_event``.
    """
    global _listeners
    listener = _Listener(callback)
    with _listeners_lock:
        _listeners = (*_listeners, listener)

    def unsubscribe() -> None:
        global _listeners
        with _listeners_lock:
            _listeners = tuple(kept for kept in _listeners if kept is not listener)

    return unsubscribe


# -- what the engine and the lease keepers use ------------------------------------------

_call_ids = itertools.count(1)
_Coroutine = types.CoroutineType
_new_trip = tuple.__new__  # a `RoundTrip` without its Python-level __new__ (all fields given)


class Watch:
    """What a watched call's events share: its prefix, start, round trips and id;
    `done` once its last event (the one with an outcome) was reported.

    `store` is the call's view of its engine's store: each operation called on it is
    one round trip (`time`), counted in `round_trips` when sent and timed when it ends:
    a `RoundTrip` in `trips`, until the call's next event takes it.
    """

    __slots__ = (
        "_clock",
        "_store",
        "call_id",
        "done",
        "prefix",
        "round_trips",
        "started",
        "trips",
    )

    def __init__(
        self, prefix: str, started: float, clock: Callable[[], float], store: object
    ) -> None:
        self.prefix = prefix
        self.started = started
        self.round_trips = 0
        self.call_id = next(_call_ids)
        self.done = False
        self.trips: list[RoundTrip] = []
        self._clock = clock
        self._store = store

    @property
    def store(self) -> Any:
        """The engine's store, every operation on it timed as a round trip of this call."""
        # A new view each time: one kept here would be a reference cycle per call, left
        # to the cyclic garbage collector.
        return TimedStore(self._store, self)

    def timing(self, store: Any) -> Any:
        """`store` (a lease keeper's), every operation on it timed as a round trip of
        this call."""
        return TimedStore(store, self)

    def time(
        self, operation: str, method: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]
    ) -> Any:
        """Call ``method(*args, **kw)`` as a round trip of this call: counted now, timed
        until it returns or raises, or, for an awaitable it returns (an async store's
        coroutine), until that is awaited to its end."""
        self.round_trips += 1
        sent = self._clock()
        try:
            result = method(*args, **kw)
        except BaseException as exc:
            self._ended(operation, sent, exc)
            raise
        if type(result) is _Coroutine or inspect.isawaitable(result):
            return self._awaited(operation, sent, result)
        self._ended(operation, sent, None)
        return result

    async def _awaited(self, operation: str, sent: float, pending: Awaitable[Any]) -> Any:
        try:
            result = await pending
        except BaseException as exc:
            self._ended(operation, sent, exc)
            raise
        # What `_ended` does, inline: this is every async round trip's path.
        trip = (operation, sent - self.started, self._clock() - sent, None)
        self.trips.append(_new_trip(RoundTrip, trip))
        return result

    def shared(self, operation: str, sent: float, error: BaseException | None) -> None:
        """Count a round trip this call shared with others (claims sent together), sent
        at `sent` (the engine's clock) and ended now, failed with `error` if given."""
        self.round_trips += 1
        self._ended(operation, sent, error)

    def _ended(self, operation: str, sent: float, error: BaseException | None) -> None:
        name = None if error is None else type(error).__name__
        trip = (operation, sent - self.started, self._clock() - sent, name)
        self.trips.append(_new_trip(RoundTrip, trip))

    def take_trips(self) -> tuple[RoundTrip, ...]:
        """The round trips that ended since the last call, for the event built now."""
        trips = self.trips
        if not trips:
            return ()
        # A lease renewal thread may append meanwhile: take what is there, keep the rest
        # (the copy and the slice deletion are each atomic).
        taken = tuple(trips)
        del trips[: len(taken)]
        return taken


class TimedStore:
    """A watched call's view of a store (`Watch.store`): each store operation called on
    it is one round trip of the call (`Watch.time`), async or sync."""

    __slots__ = ("_store", "_watch")

    def __init__(self, store: Any, watch: Watch) -> None:
        self._store = store
        self._watch = watch

    def claim(self, *args: Any, **kw: Any) -> Any:
        return self._watch.time("claim", self._store.claim, args, kw)

    def get(self, *args: Any, **kw: Any) -> Any:
        return self._watch.time("get", self._store.get, args, kw)

    def complete(self, *args: Any, **kw: Any) -> Any:
        return self._watch.time("complete", self._store.complete, args, kw)

    def release(self, *args: Any, **kw: Any) -> Any:
        return self._watch.time("release", self._store.release, args, kw)

    def renew(self, *args: Any, **kw: Any) -> Any:
        return self._watch.time("renew", self._store.renew, args, kw)


# Compared by identity: hashing an enum member (for a set or a dict) runs Python code.
_CLAIM_LOST, _LEASE_LOST, _STORE_ERROR = (
    EventKind.CLAIM_LOST,
    EventKind.LEASE_LOST,
    EventKind.STORE_ERROR,
)


class Reporter:
    """One engine's events: each is built once, logged, and handed to the listeners.

    `watch` is the per-call check: None (and nothing more for the call's DEBUG
    decisions) unless a listener is registered or DEBUG is on for `log`.
    """

    __slots__ = ("_clock", "_on_event", "_store", "_store_kind", "log")

    def __init__(
        self,
        log: logging.Logger,
        store: object,
        clock: Callable[[], float],
        on_event: EventListener | None,
    ) -> None:
        self.log = log
        self._store = store
        self._clock = clock
        self._on_event = None if on_event is None else _Listener(on_event)
        self._store_kind: str | None = None

    def watch(self, prefix: str) -> Watch | None:
        """A `Watch` for a call starting now, or None when nobody would see its events."""
        if self._on_event is None and not _listeners and not self.log.isEnabledFor(logging.DEBUG):
            return None
        return Watch(prefix, self._clock(), self._clock, self._store)

    @property
    def store(self) -> str:
        """The kind of the engine's store (see `IdempotencyEvent.store`)."""
        if self._store_kind is not None:
            return self._store_kind
        kind = store_kind(self._store)
        # "cache" may only mean that the layer has not opened its client yet (a client
        # factory): it is worked out again until the client names the kind.
        if kind != "cache":
            self._store_kind = kind
        return kind

    def emit(
        self,
        kind: EventKind,
        key: str | None,
        watch: Watch | None,
        *,
        outcome: CallOutcome | None = None,
        error: BaseException | None = None,
        level: int | None = None,
        log: logging.Logger | None = None,
        detail: str = "",
        exc_info: bool = False,
    ) -> None:
        """Report `kind` for the call `watch` watches (None: an unwatched call, whose
        DEBUG decisions are dropped and whose WARNING ones carry no duration).

        `outcome` ends the call: a later outcome of the same call (a cancellation seen
        again on its way out) is dropped, so each call has one last event. `level`
        overrides the kind's (DEBUG, or WARNING for a claim lost, a lease lost and a
        store error); `log`, the engine's logger; `detail` is appended to the log
        message (never data).
        """
        if level is None:
            warns = kind is _CLAIM_LOST or kind is _LEASE_LOST or kind is _STORE_ERROR
            level = logging.WARNING if warns else logging.DEBUG
        if watch is None:
            if level < logging.WARNING:
                return
        elif outcome is not None:
            if watch.done:
                return
            watch.done = True
        log = log or self.log
        logging_it = log.isEnabledFor(level)
        listeners = _listeners
        if not logging_it and self._on_event is None and not listeners:
            return
        store = self.store
        error_name = None if error is None else type(error).__name__
        if watch is not None:  # positional: a third faster than by keyword
            event = IdempotencyEvent(
                kind,
                key,
                watch.prefix,
                store,
                self._clock() - watch.started,
                watch.round_trips,
                outcome,
                error_name,
                watch.call_id,
                watch.take_trips(),
            )
        else:
            prefix = (key or "").rpartition("#")[0]
            event = IdempotencyEvent(kind, key, prefix, store, None, None, outcome, error_name)
        if logging_it:
            log_event(log, level, event, detail, exc_info=exc_info)
        if self._on_event is not None:
            self._on_event.deliver(event)
        for listener in listeners:
            listener.deliver(event)


def log_event(
    log: logging.Logger,
    level: int,
    event: IdempotencyEvent,
    detail: str = "",
    *,
    exc_info: bool = False,
) -> None:
    """Log `event` as one line with its fields as ``extra`` attributes (`LOG_FIELDS`)."""
    # `_value_`, not `.value`: the enum's property runs Python code on every read.
    decision: str = event.kind._value_
    outcome: str | None = None if event.outcome is None else event.outcome._value_
    duration_ms = None if event.duration is None else round(event.duration * 1000, 3)
    parts = []
    if outcome is not None:
        parts.append(outcome)
    if event.error is not None:
        parts.append(event.error)
    if duration_ms is not None:
        parts.append(f"{duration_ms:g} ms")
    if event.round_trips is not None:
        trips = event.round_trips
        parts.append(f"{trips} round trip{'' if trips == 1 else 's'}")
    log.log(
        level,
        "%s %s%s%s",
        decision,
        event.key if event.key is not None else f"{event.prefix} (no key)",
        f": {detail}" if detail else "",
        f" ({', '.join(parts)})" if parts else "",
        exc_info=exc_info,
        extra={
            "idempotency_decision": decision,
            "idempotency_key": event.key,
            "idempotency_prefix": event.prefix,
            "duration_ms": duration_ms,
            "idempotency_outcome": outcome,
            "idempotency_store": event.store,
            "idempotency_round_trips": event.round_trips,
            "idempotency_error": event.error,
            "idempotency_call_id": event.call_id,
        },
    )


def describe(error: BaseException) -> str:
    """A store error as one bounded line: its type and message (a store's messages
    name keys and servers, never records' data)."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."


def _cache_client(layer: object) -> Any:
    """The client adapter a cache layer holds: the one passed in, or the one it opened
    (for this loop, or this process) from its factory; None before it opened one."""
    holder = getattr(layer, "_clients", None)
    client = getattr(holder, "client", None)
    if client is None and holder is not None:
        try:
            opened = holder.ready()
        except Exception:  # a forked child, or no running loop: not known here
            return None
        client = getattr(opened, "client", None)
    return client


def store_kind(store: object) -> str:
    """``memory``, ``redis``, ``glide``, ``dynamodb``, ``cache`` or ``custom``.

    A store wrapping another one in its ``inner`` attribute (the sync engine's bridge
    to an async-only store) is the kind of the store it wraps.
    """
    from aioidempotency.persistence import (
        CachePersistenceLayer,
        DynamoDBPersistenceLayer,
        InMemoryPersistenceLayer,
        SyncCachePersistenceLayer,
        SyncDynamoDBPersistenceLayer,
        SyncInMemoryPersistenceLayer,
    )

    for _ in range(8):  # bounded: a wrapper may wrap a wrapper
        inner = getattr(store, "inner", None)
        if inner is None:
            break
        store = inner
    if isinstance(store, (InMemoryPersistenceLayer, SyncInMemoryPersistenceLayer)):
        return "memory"
    if isinstance(store, (DynamoDBPersistenceLayer, SyncDynamoDBPersistenceLayer)):
        return "dynamodb"
    if isinstance(store, (CachePersistenceLayer, SyncCachePersistenceLayer)):
        connection = store.connection
        if connection is not None:
            return "glide" if connection.client == "glide" else "redis"
        client = _cache_client(store)
        if client is None:  # an async layer on a sync client: its sync twin holds it
            client = _cache_client(getattr(store, "_twin", None))
        name = type(client).__name__
        if name in ("GlideCacheClient", "SyncGlideCacheClient"):
            return "glide"
        if name in ("RedisPyCacheClient", "SyncRedisPyCacheClient"):
            return "redis"
        return "cache"
    return "custom"
