"""What identifies a call besides its payload: the key prefix an engine needs (given,
or derived from a function) and whether a durable-functions context is a replay (a
context whose checkpointed operations cannot be counted is not one)."""

from __future__ import annotations

from typing import Any

import pytest

from aioidempotency import (
    IdempotencyEngine,
    IdempotencyKeyError,
    InMemoryPersistenceLayer,
    idempotent_async,
)
from tests.helpers import FakeLambdaContext


async def place(order: Any) -> Any:
    return order


def test_a_key_needs_a_prefix_or_a_function_to_derive_it_from() -> None:
    engine = IdempotencyEngine(InMemoryPersistenceLayer())
    with pytest.raises(IdempotencyKeyError, match="no key_prefix and no function"):
        engine.idempotency_key({"id": 1})
    derived = engine.idempotency_key({"id": 1}, key_source=place)
    assert derived.split("#")[0].endswith("place")
    given = IdempotencyEngine(InMemoryPersistenceLayer(), key_prefix="orders")
    assert given.idempotency_key({"id": 1}).startswith("orders#")
    assert given.idempotency_key({"id": 1}, key_source=place).startswith("orders#")


class _DurableContext:
    """A durable-functions context as Powertools recognises one (``state`` and
    ``lambda_context``), with `operations` as given."""

    def __init__(self, operations: Any) -> None:
        self.lambda_context = FakeLambdaContext()
        self.state = type("State", (), {"operations": operations})()


@pytest.mark.parametrize("operations", [None, 3, object()])
async def test_a_durable_context_whose_operations_cannot_be_counted_is_not_a_replay(
    operations: Any,
) -> None:
    store = InMemoryPersistenceLayer()
    runs: list[Any] = []

    @idempotent_async(persistence_store=store)
    async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        runs.append(event["id"])
        return {"ok": event["id"]}

    context = _DurableContext(operations)
    assert await handler({"id": 5}, context) == {"ok": 5}
    assert await handler({"id": 5}, context) == {"ok": 5}
    assert runs == [5], "an ordinary call: it ran once, the duplicate replayed"
    assert len(store) == 1
