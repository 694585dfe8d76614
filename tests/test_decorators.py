"""The decorators `@idempotent_async` and `@idempotent_function_async`: payload selection,
Lambda context, signatures, refusals, per-call state.

tools/unasync.py generates the sync decorators' twin of this module,
tests/sync/test_decorators.py: calls run concurrently through ``.concurrency`` (tasks
here, threads there). What only the sync decorators meet (many threads, the bridge to an
async-only store) is in tests/sync/test_decorators_threads.py and
tests/sync/test_decorators_bridged.py.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aioidempotency import (
    IdempotencyConfig,
    IdempotencyEngine,
    InMemoryPersistenceLayer,
    RecordStatus,
    idempotent_async,
    idempotent_function_async,
)
from aioidempotency._config import registered_lambda_context
from aioidempotency._records import DataRecord
from tests.helpers import FakeLambdaContext

from .concurrency import Event, gather, spawn, wait_set

WAIT = 10.0  # bound on every wait for another call

# The decorators a function of the other kind needs, as the refusals name them.
OTHER_HANDLER_DECORATOR = r"@idempotent\b"  # async-only
# sync-only: OTHER_HANDLER_DECORATOR = r"@idempotent_async\b"
OTHER_FUNCTION_DECORATOR = r"@idempotent_function\b"  # async-only
# sync-only: OTHER_FUNCTION_DECORATOR = r"@idempotent_function_async\b"


def now_ms() -> int:
    return int(time.time() * 1000)


def engine_of(wrapper: Any) -> IdempotencyEngine:
    engine = wrapper.engine
    assert isinstance(engine, IdempotencyEngine)
    return engine


def key_of(wrapper: Any, payload: Any) -> str:
    return engine_of(wrapper).idempotency_key(payload, key_source=wrapper.__wrapped__)


class InFlight:
    """Lets a test look at the store while a decorated function is running."""

    def __init__(self) -> None:
        self.started = Event()
        self.release = Event()

    async def hold(self) -> None:
        self.started.set()
        await wait_set(self.release, WAIT)


async def claim_while_running(
    store: InMemoryPersistenceLayer,
    wrapper: Any,
    payload: Any,
    call: Callable[[], Awaitable[Any]],
    flight: InFlight,
) -> tuple[DataRecord, int, int]:
    """Start `call`, read the in-progress record while it runs, let it finish.

    Returns the record and the wall clock (ms) just before the call and once the
    record was read: the claim was made between the two.
    """
    before = now_ms()
    running = spawn(call)
    try:
        await wait_set(flight.started, WAIT)
        record = await store.get(key_of(wrapper, payload))
        after = now_ms()
    finally:
        flight.release.set()
        await running.result(WAIT)
    assert record is not None
    assert record.status is RecordStatus.INPROGRESS
    return record, before, after


# -- handlers: the payload is the event --------------------------------------------------------


async def test_handler_payload_is_the_event() -> None:
    store = InMemoryPersistenceLayer()
    events: list[Any] = []

    @idempotent_async(persistence_store=store)
    async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        events.append(event)
        return {"status": "paid", "order": event["order"]}

    event = {"order": 17, "amount": 990}
    first = await handler(event, FakeLambdaContext())
    second = await handler(dict(event), FakeLambdaContext(remaining_ms=1))
    third = await handler(event=dict(event), context=None)
    assert first == second == third == {"status": "paid", "order": 17}
    assert events == [event]
    other = await handler({"order": 18, "amount": 990}, FakeLambdaContext())
    assert other == {"status": "paid", "order": 18}
    assert len(events) == 2
    record = await store.get(key_of(handler, event))
    assert record is not None
    assert record.status is RecordStatus.COMPLETED
    assert record.idempotency_key == engine_of(handler).idempotency_key(
        event, key_source=inspect.unwrap(handler)
    )


@pytest.mark.parametrize("remaining_ms", [123_456, 1, 0])
async def test_claim_expires_with_the_remaining_lambda_time(remaining_ms: int) -> None:
    store = InMemoryPersistenceLayer()
    flight = InFlight()

    @idempotent_async(persistence_store=store)
    async def handler(event: dict[str, Any], context: Any) -> str:
        await flight.hold()
        return "done"

    event = {"order": remaining_ms}
    record, before, after = await claim_while_running(
        store, handler, event, lambda: handler(event, FakeLambdaContext(remaining_ms)), flight
    )
    assert record.in_progress_expiry_timestamp is not None  # 0 ms left is a value, not "unknown"
    assert before + remaining_ms <= record.in_progress_expiry_timestamp <= after + remaining_ms
    completed = await store.get(key_of(handler, event))
    assert completed is not None
    assert completed.status is RecordStatus.COMPLETED


async def test_durable_context_wrapping_a_lambda_context() -> None:
    store = InMemoryPersistenceLayer()
    flight = InFlight()

    class DurableContext:
        def __init__(self, lambda_context: FakeLambdaContext) -> None:
            self.lambda_context = lambda_context

    @idempotent_async(persistence_store=store)
    async def handler(event: dict[str, Any], context: Any) -> str:
        await flight.hold()
        return "done"

    event = {"order": 1}
    context = DurableContext(FakeLambdaContext(remaining_ms=345_678))
    record, before, after = await claim_while_running(
        store, handler, event, lambda: handler(event, context), flight
    )
    assert record.in_progress_expiry_timestamp is not None
    assert before + 345_678 <= record.in_progress_expiry_timestamp <= after + 345_678


async def test_handler_without_a_lambda_context_uses_the_lease() -> None:
    store = InMemoryPersistenceLayer()
    flight = InFlight()
    lease = 777.0

    @idempotent_async(
        persistence_store=store, config=IdempotencyConfig(in_progress_lease_seconds=lease)
    )
    async def handler(event: dict[str, Any], context: Any) -> str:
        await flight.hold()
        return "done"

    event = {"order": 2}
    record, before, after = await claim_while_running(
        store, handler, event, lambda: handler(event, None), flight
    )
    assert record.in_progress_expiry_timestamp is not None
    assert before + 777_000 <= record.in_progress_expiry_timestamp <= after + 777_000


# -- functions: the payload is one argument ----------------------------------------------------


async def test_payload_argument_by_keyword_and_by_position() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[tuple[str, Any]] = []

    @idempotent_function_async(data_keyword_argument="order", persistence_store=store)
    async def place(customer: str, order: dict[str, Any], *, note: str = "") -> dict[str, Any]:
        runs.append((customer, order))
        return {"customer": customer, "order": order["id"]}

    order = {"id": 5, "total": 10}
    first = await place("ada", order)
    assert await place("ada", order=dict(order)) == first
    assert await place(customer="ada", order=dict(order), note="again") == first
    assert await place("bob", dict(order)) == first  # keyed on `order` only
    assert runs == [("ada", order)]
    record = await store.get(key_of(place, order))
    assert record is not None
    assert record.status is RecordStatus.COMPLETED
    await place("ada", {"id": 6, "total": 10})
    assert len(runs) == 2


async def test_payload_argument_with_a_default_and_kwargs() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[Any] = []

    @idempotent_function_async(data_keyword_argument="order", persistence_store=store)
    async def place(order: Any = "default-order") -> Any:
        runs.append(order)
        return order

    assert await place() == "default-order"
    assert await place("default-order") == "default-order"
    assert runs == ["default-order"]

    @idempotent_function_async(data_keyword_argument="order", persistence_store=store)
    async def forward(**kwargs: Any) -> Any:
        runs.append(kwargs)
        return kwargs["order"]

    assert await forward(order={"id": 1}) == {"id": 1}
    assert await forward(order={"id": 1}) == {"id": 1}
    assert runs[-1] == {"order": {"id": 1}}
    assert len(runs) == 2


def test_unknown_payload_argument_fails_at_decoration_time() -> None:
    async def place(customer: str, order: dict[str, Any]) -> None:
        return None

    decorate = idempotent_function_async(
        data_keyword_argument="orders", persistence_store=InMemoryPersistenceLayer()
    )
    with pytest.raises(TypeError, match=r"no parameter 'orders'.*data_keyword_argument"):
        decorate(place)


async def test_a_failure_releases_the_key() -> None:
    store = InMemoryPersistenceLayer()
    attempts: list[int] = []

    @idempotent_function_async(data_keyword_argument="order", persistence_store=store)
    async def place(order: dict[str, Any]) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("card declined")
        return "placed"

    with pytest.raises(ValueError, match="card declined"):
        await place(order={"id": 1})
    assert await store.get(key_of(place, {"id": 1})) is None
    assert await place(order={"id": 1}) == "placed"
    assert await place(order={"id": 1}) == "placed"
    assert len(attempts) == 2


# -- wrapping ----------------------------------------------------------------------------------


async def _documented(order: dict[str, Any], *, customer: str = "ada") -> list[int]:
    """Places an order."""
    return [1]


async def _handler(event: dict[str, Any], context: Any) -> int:
    """Handles an event."""
    return 1


@pytest.mark.parametrize(
    ("decorator", "function"),
    [
        (functools.partial(idempotent_function_async, data_keyword_argument="order"), _documented),
        (idempotent_async, _handler),
    ],
    ids=["idempotent_function_async", "idempotent_async"],
)
def test_wraps_keeps_the_original(decorator: Any, function: Any) -> None:
    wrapper = decorator(persistence_store=InMemoryPersistenceLayer())(function)
    assert wrapper.__wrapped__ is function
    assert wrapper.__name__ == function.__name__
    assert wrapper.__qualname__ == function.__qualname__
    assert wrapper.__doc__ == function.__doc__
    assert wrapper.__module__ == function.__module__
    assert inspect.signature(wrapper) == inspect.signature(function)
    assert inspect.iscoroutinefunction(wrapper)  # async-only
    # sync-only: assert not inspect.iscoroutinefunction(wrapper)


@pytest.mark.parametrize(
    ("decorator", "hint"),
    [
        (idempotent_async, OTHER_HANDLER_DECORATOR),
        (
            functools.partial(idempotent_function_async, data_keyword_argument="order"),
            OTHER_FUNCTION_DECORATOR,
        ),
    ],
    ids=["idempotent_async", "idempotent_function_async"],
)
def test_a_function_of_the_other_kind_is_refused_naming_its_decorator(
    decorator: Any, hint: str
) -> None:
    def other_kind(event: Any, order: Any = None) -> None:  # async-only
        # sync-only: async def other_kind(event: Any, order: Any = None) -> None:
        return None

    with pytest.raises(TypeError, match=hint):
        decorator(persistence_store=InMemoryPersistenceLayer())(other_kind)


# -- per-call state ---------------------------------------------------------------------------


async def test_two_functions_on_one_store_never_replay_each_other() -> None:
    store = InMemoryPersistenceLayer()
    config = IdempotencyConfig()  # shared too: it must hold no per-function state
    runs: list[str] = []

    @idempotent_function_async(
        data_keyword_argument="order", persistence_store=store, config=config
    )
    async def charge(order: dict[str, Any]) -> str:
        runs.append("charge")
        return "charged"

    @idempotent_function_async(
        data_keyword_argument="order", persistence_store=store, config=config
    )
    async def ship(order: dict[str, Any]) -> str:
        runs.append("ship")
        return "shipped"

    order = {"id": 1}
    assert await charge(order=order) == "charged"
    assert await ship(order=order) == "shipped"
    assert await charge(order=order) == "charged"
    assert await ship(order=order) == "shipped"
    assert runs == ["charge", "ship"]
    assert key_of(charge, order) != key_of(ship, order)
    assert key_of(charge, order).split("#")[1] == key_of(ship, order).split("#")[1]

    # interleaved, concurrently
    calls = [spawn(f, order={"id": n}) for n in range(2, 12) for f in (charge, ship)]
    assert await gather(*calls, timeout=WAIT) == ["charged", "shipped"] * 10
    assert runs.count("charge") == runs.count("ship") == 11


async def test_registered_lambda_context_belongs_to_its_caller() -> None:
    store = InMemoryPersistenceLayer()
    config = IdempotencyConfig(in_progress_lease_seconds=600.0)
    names = ("a", "b", "none", "handler")
    claimed = {name: Event() for name in names}
    registered = {name: Event() for name in names}
    all_registered = Event()
    finish = Event()

    @idempotent_function_async(
        data_keyword_argument="order", persistence_store=store, config=config
    )
    async def place(order: dict[str, Any]) -> str:
        claimed[order["task"]].set()
        await wait_set(finish, WAIT)
        return str(order["task"])

    @idempotent_async(persistence_store=store, config=config)
    async def handler(event: dict[str, Any], context: Any) -> str:
        claimed[event["task"]].set()
        await wait_set(finish, WAIT)
        return str(event["task"])

    async def caller(name: str, context: FakeLambdaContext | None) -> str:
        if context is not None:
            config.register_lambda_context(context)
        registered[name].set()
        # every caller registers before any calls: a context kept on the shared config
        # would be the last one registered for all of them
        await wait_set(all_registered, WAIT)
        if name == "handler":  # no context argument: the caller's registered one applies
            return await handler({"task": name}, None)
        return await place(order={"task": name})

    contexts = {
        "a": FakeLambdaContext(remaining_ms=111_111),
        "b": FakeLambdaContext(remaining_ms=222_222),
        "none": None,
        "handler": FakeLambdaContext(remaining_ms=333_333),
    }
    before = now_ms()
    calls = [spawn(caller, name, contexts[name]) for name in names]
    try:
        for event in registered.values():
            await wait_set(event, WAIT)
        all_registered.set()
        for event in claimed.values():
            await wait_set(event, WAIT)
        records = {
            name: await store.get(key_of(place, {"task": name})) for name in ("a", "b", "none")
        }
        records["handler"] = await store.get(key_of(handler, {"task": "handler"}))
        after = now_ms()
    finally:
        finish.set()
        results = await gather(*calls, timeout=WAIT)
    assert results == list(names)
    expected_ms = {"a": 111_111, "b": 222_222, "none": 600_000, "handler": 333_333}
    for name, record in records.items():
        assert record is not None
        assert record.status is RecordStatus.INPROGRESS
        assert record.in_progress_expiry_timestamp is not None
        assert (
            before + expected_ms[name]
            <= record.in_progress_expiry_timestamp
            <= after + expected_ms[name]
        ), name
    # nothing leaked into the test's own context or onto the shared config
    assert registered_lambda_context() is None
    assert not any(isinstance(value, FakeLambdaContext) for value in vars(config).values())


async def test_concurrent_handler_calls_keep_their_own_context() -> None:
    store = InMemoryPersistenceLayer()
    started = {1: Event(), 2: Event()}
    finish = Event()

    @idempotent_async(persistence_store=store)
    async def handler(event: dict[str, Any], context: Any) -> int:
        started[event["n"]].set()
        await wait_set(finish, WAIT)
        return int(event["n"])

    before = now_ms()
    calls = [
        spawn(handler, {"n": 1}, FakeLambdaContext(remaining_ms=50_000)),
        spawn(handler, {"n": 2}, FakeLambdaContext(remaining_ms=90_000)),
    ]
    try:
        for event in started.values():
            await wait_set(event, WAIT)
        first = await store.get(key_of(handler, {"n": 1}))
        second = await store.get(key_of(handler, {"n": 2}))
        after = now_ms()
    finally:
        finish.set()
        assert await gather(*calls, timeout=WAIT) == [1, 2]
    assert first is not None
    assert second is not None
    assert first.in_progress_expiry_timestamp is not None
    assert second.in_progress_expiry_timestamp is not None
    assert before + 50_000 <= first.in_progress_expiry_timestamp <= after + 50_000
    assert before + 90_000 <= second.in_progress_expiry_timestamp <= after + 90_000
