"""A decorated function's ``__wrapped__`` is the function it wraps, for all four
decorators; calling it runs the function without the engine (nothing stored)."""

from __future__ import annotations

from typing import Any

from aioidempotency import (
    InMemoryPersistenceLayer,
    idempotent,
    idempotent_async,
    idempotent_function,
    idempotent_function_async,
)


async def test_async_decorators_keep_the_function_as_wrapped() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[str] = []

    async def handler(event: dict[str, Any], context: object) -> str:
        runs.append("handler")
        return "h"

    async def place(order: dict[str, Any]) -> str:
        runs.append("place")
        return "p"

    decorated_handler = idempotent_async(persistence_store=store)(handler)
    decorated_place = idempotent_function_async(
        data_keyword_argument="order", persistence_store=store
    )(place)
    assert decorated_handler.__wrapped__ is handler
    assert decorated_place.__wrapped__ is place
    assert await decorated_handler.__wrapped__({"id": 1}, None) == "h"
    assert await decorated_place.__wrapped__(order={"id": 1}) == "p"
    assert await decorated_place.__wrapped__(order={"id": 1}) == "p"
    assert runs == ["handler", "place", "place"]
    assert len(store) == 0, "the engine was not involved"
    # the decorated function itself does go through the engine
    assert await decorated_place(order={"id": 2}) == "p"
    assert await decorated_place(order={"id": 2}) == "p"
    assert runs == ["handler", "place", "place", "place"]
    assert len(store) == 1


def test_sync_decorators_keep_the_function_as_wrapped() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[str] = []

    def handler(event: dict[str, Any], context: object) -> str:
        runs.append("handler")
        return "h"

    def charge(order: dict[str, Any]) -> str:
        runs.append("charge")
        return "c"

    decorated_handler = idempotent(persistence_store=store)(handler)
    decorated_charge = idempotent_function(data_keyword_argument="order", persistence_store=store)(
        charge
    )
    assert decorated_handler.__wrapped__ is handler
    assert decorated_charge.__wrapped__ is charge
    assert decorated_handler.__wrapped__({"id": 1}, None) == "h"
    assert decorated_charge.__wrapped__(order={"id": 1}) == "c"
    assert decorated_charge.__wrapped__(order={"id": 1}) == "c"
    assert runs == ["handler", "charge", "charge"]
    assert len(store) == 0, "the engine was not involved"
    # the decorated function itself does go through the engine
    assert decorated_charge(order={"id": 2}) == "c"
    assert decorated_charge(order={"id": 2}) == "c"
    assert runs == ["handler", "charge", "charge", "charge"]
    assert len(store) == 1
