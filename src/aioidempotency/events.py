"""Events: one per decision the engine takes, for metrics, traces and tests.

Every decision about an idempotent call (claimed, replayed, refused as in progress,
released, completed, ...) is one immutable `IdempotencyEvent`. It reaches:

- the listener of the call's config, ``IdempotencyConfig(on_event=callback)``;
- every process-wide listener registered with `listen` (a metrics or tracing
  integration registers one), after the config's;
- the log: one line per decision on the ``aioidempotency.engine`` logger (lease
  renewals on ``aioidempotency.lease``), at DEBUG, and at WARNING for a claim lost, a
  lease lost, a takeover of an orphaned claim and a store error; the event's fields
  are the record's ``extra`` attributes (`LOG_FIELDS`).

An event holds keys, the key prefix and type names only, never a payload, a result or
an exception's message. Listeners are called synchronously, in the task or thread of
the call (lease renewals: the lease keeper's task or thread; retries of a release or
completion: the engine's background task or thread), so they must be quick; a listener
that raises is logged once at WARNING (on ``aioidempotency.events``) and the call goes
on. With no listener and DEBUG off for the engine's logger, a call builds no event.

Each store round trip of a call (claim, get, complete, release, renew) is timed by the
engine's clock and carried, as a `RoundTrip`, by the call's next event (`trips`), so a
listener can measure store latency; a call nobody watches times nothing.

See docs/observability.md.
"""

from aioidempotency._events import (
    LOG_FIELDS,
    CallOutcome,
    EventKind,
    EventListener,
    IdempotencyEvent,
    RoundTrip,
    listen,
)

__all__ = [
    "LOG_FIELDS",
    "CallOutcome",
    "EventKind",
    "EventListener",
    "IdempotencyEvent",
    "RoundTrip",
    "listen",
]
