"""`aioidempotency.testing.EventLog` started twice listens once, and stopped when it
does not listen does nothing: each event is kept once, and none after `stop`."""

from __future__ import annotations

from aioidempotency import IdempotencyConfig, IdempotencyEngine, InMemoryPersistenceLayer
from aioidempotency.events import EventKind
from aioidempotency.testing import EventLog


async def charge() -> str:
    return "paid"


async def test_an_event_log_started_twice_keeps_each_event_once() -> None:
    engine = IdempotencyEngine(
        InMemoryPersistenceLayer(), IdempotencyConfig(event_key_jmespath="id"), key_prefix="log"
    )
    log = EventLog()
    log.stop()  # not listening yet: nothing to stop
    assert log.start() is log.start()
    try:
        assert await engine.run({"id": "p-1"}, charge) == "paid"
    finally:
        log.stop()
    assert [e.kind for e in log.events] == [EventKind.CLAIMED, EventKind.COMPLETED]
    log.stop()  # stopped twice: still nothing
    assert await engine.run({"id": "p-1"}, charge) == "paid"
    assert [e.kind for e in log.events] == [EventKind.CLAIMED, EventKind.COMPLETED]
