"""The async decorators: payload selection, Lambda context, signatures, per-call state."""

from __future__ import annotations

import asyncio
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
    idempotent,
    idempotent_async,
    idempotent_function,
    idempotent_function_async,
)
from aioidempotency._records import DataRecord
from tests.helpers import FakeLambdaContext

WAIT = 5.0  # bound on every wait for another task


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
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def hold(self) -> None:
        self.started.set()
        await asyncio.wait_for(self.release.wait(), WAIT)


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
    task = asyncio.ensure_future(call())
    try:
        await asyncio.wait_for(flight.started.wait(), WAIT)
        record = await store.get(key_of(wrapper, payload))
        after = now_ms()
    finally:
        flight.release.set()
        await asyncio.wait_for(task, WAIT)
    assert record is not None
    assert record.status is RecordStatus.INPROGRESS
    return record, before, after


# -- @idempotent_async -------------------------------------------------------------------------


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
    third = await handler(event=dict(event), context=FakeLambdaContext())
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


# -- @idempotent_function_async --------------------------------------------------------------------


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
    assert await store.get(key_of(place, order)) is not None
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


@pytest.mark.parametrize("decorator", [idempotent_function_async, idempotent_function])
def test_unknown_payload_argument_fails_at_decoration_time(decorator: Any) -> None:
    async def async_place(customer: str, order: dict[str, Any]) -> None:
        return None

    def sync_place(customer: str, order: dict[str, Any]) -> None:
        return None

    function = async_place if decorator is idempotent_function_async else sync_place
    with pytest.raises(TypeError, match=r"no parameter 'orders'.*data_keyword_argument"):
        decorator(data_keyword_argument="orders", persistence_store=InMemoryPersistenceLayer())(
            function
        )


# -- wrapping ----------------------------------------------------------------------------------


async def _documented(order: dict[str, Any], *, customer: str = "ada") -> list[int]:
    """Places an order."""
    return [1]


def _documented_sync(order: dict[str, Any], *, customer: str = "ada") -> list[int]:
    """Places an order."""
    return [1]


async def _handler(event: dict[str, Any], context: Any) -> int:
    """Handles an event."""
    return 1


def _handler_sync(event: dict[str, Any], context: Any) -> int:
    """Handles an event."""
    return 1


@pytest.mark.parametrize(
    ("decorator", "function"),
    [
        (functools.partial(idempotent_function_async, data_keyword_argument="order"), _documented),
        (functools.partial(idempotent_function, data_keyword_argument="order"), _documented_sync),
        (idempotent_async, _handler),
        (idempotent, _handler_sync),
    ],
    ids=["idempotent_function_async", "idempotent_function", "idempotent_async", "idempotent"],
)
def test_wraps_keeps_the_original(decorator: Any, function: Any) -> None:
    wrapper = decorator(persistence_store=InMemoryPersistenceLayer())(function)
    assert wrapper.__wrapped__ is function
    assert wrapper.__name__ == function.__name__
    assert wrapper.__qualname__ == function.__qualname__
    assert wrapper.__doc__ == function.__doc__
    assert wrapper.__module__ == function.__module__
    assert inspect.signature(wrapper) == inspect.signature(function)
    assert inspect.iscoroutinefunction(wrapper) == inspect.iscoroutinefunction(function)


@pytest.mark.parametrize(
    ("decorator", "hint"),
    [
        (idempotent_async, r"@idempotent\b"),
        (
            functools.partial(idempotent_function_async, data_keyword_argument="order"),
            r"@idempotent_function\b",
        ),
    ],
    ids=["idempotent_async", "idempotent_function_async"],
)
def test_async_decorator_on_a_plain_function_points_to_the_shim(decorator: Any, hint: str) -> None:
    def plain(event: Any, context: Any = None, order: Any = None) -> None:
        return None

    with pytest.raises(TypeError, match=hint):
        decorator(persistence_store=InMemoryPersistenceLayer())(plain)


@pytest.mark.parametrize(
    ("decorator", "hint"),
    [
        (idempotent, r"@idempotent_async\b"),
        (
            functools.partial(idempotent_function, data_keyword_argument="order"),
            r"@idempotent_function_async\b",
        ),
    ],
    ids=["idempotent", "idempotent_function"],
)
def test_sync_shim_on_an_async_function_points_to_the_async_decorator(
    decorator: Any, hint: str
) -> None:
    async def coroutine_function(event: Any, context: Any = None, order: Any = None) -> None:
        return None

    with pytest.raises(TypeError, match=hint):
        decorator(persistence_store=InMemoryPersistenceLayer())(coroutine_function)


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
    results = await asyncio.gather(
        *(f(order={"id": n}) for n in range(2, 12) for f in (charge, ship))
    )
    assert results == ["charged", "shipped"] * 10
    assert runs.count("charge") == runs.count("ship") == 11


async def test_registered_lambda_context_is_per_task() -> None:
    store = InMemoryPersistenceLayer()
    config = IdempotencyConfig(in_progress_lease_seconds=600.0)
    claimed = {name: asyncio.Event() for name in ("a", "b", "none")}
    finish = asyncio.Event()

    @idempotent_function_async(
        data_keyword_argument="order", persistence_store=store, config=config
    )
    async def place(order: dict[str, Any]) -> str:
        claimed[order["task"]].set()
        await asyncio.wait_for(finish.wait(), WAIT)
        task: str = order["task"]
        return task

    registered = {name: asyncio.Event() for name in claimed}
    all_registered = asyncio.Event()

    async def task(name: str, context: FakeLambdaContext | None) -> str:
        if context is not None:
            config.register_lambda_context(context)
        registered[name].set()
        # every task registers before any calls: a context kept on the shared config
        # would be the last one registered for all of them
        await asyncio.wait_for(all_registered.wait(), WAIT)
        return await place(order={"task": name})

    before = now_ms()
    tasks = [
        asyncio.ensure_future(task("a", FakeLambdaContext(remaining_ms=111_111))),
        asyncio.ensure_future(task("b", FakeLambdaContext(remaining_ms=222_222))),
        asyncio.ensure_future(task("none", None)),
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in registered.values())), WAIT)
        all_registered.set()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in claimed.values())), WAIT)
        records = {
            name: await store.get(key_of(place, {"task": name})) for name in ("a", "b", "none")
        }
        after = now_ms()
    finally:
        finish.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert results == ["a", "b", "none"]
    expected_ms = {"a": 111_111, "b": 222_222, "none": 600_000}
    for name, record in records.items():
        assert record is not None
        assert record.status is RecordStatus.INPROGRESS
        assert record.in_progress_expiry_timestamp is not None
        assert (
            before + expected_ms[name]
            <= record.in_progress_expiry_timestamp
            <= after + expected_ms[name]
        ), name
    # nothing leaked into this (the test's) task or onto the shared config
    from aioidempotency._config import registered_lambda_context

    assert registered_lambda_context() is None
    assert not any(isinstance(value, FakeLambdaContext) for value in vars(config).values())


async def test_concurrent_handler_calls_keep_their_own_context() -> None:
    store = InMemoryPersistenceLayer()
    started = {1: asyncio.Event(), 2: asyncio.Event()}
    finish = asyncio.Event()

    @idempotent_async(persistence_store=store)
    async def handler(event: dict[str, Any], context: Any) -> int:
        started[event["n"]].set()
        await asyncio.wait_for(finish.wait(), WAIT)
        return int(event["n"])

    before = now_ms()
    calls = [
        asyncio.ensure_future(handler({"n": 1}, FakeLambdaContext(remaining_ms=50_000))),
        asyncio.ensure_future(handler({"n": 2}, FakeLambdaContext(remaining_ms=90_000))),
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), WAIT)
        first = await store.get(key_of(handler, {"n": 1}))
        second = await store.get(key_of(handler, {"n": 2}))
        after = now_ms()
    finally:
        finish.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [1, 2]
    assert first is not None
    assert second is not None
    assert first.in_progress_expiry_timestamp is not None
    assert second.in_progress_expiry_timestamp is not None
    assert before + 50_000 <= first.in_progress_expiry_timestamp <= after + 50_000
    assert before + 90_000 <= second.in_progress_expiry_timestamp <= after + 90_000
