"""User code that `tests/test_typing.py` type-checks with ``mypy --strict``.

Not a test module and never run: mypy reads it. ``# R: <type>`` marks a line whose
``reveal_type`` must show that type (without the ``builtins.``, ``typing.`` and this
module's prefixes); ``# E: <code>`` marks a line mypy must reject with that error code.
A marker alone on its line applies to the next line. No other line may produce an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from typing import Any

from typing_extensions import reveal_type

from aioidempotency import (
    CachePersistenceLayer,
    IdempotencyEngine,
    InMemoryPersistenceLayer,
    SyncInMemoryPersistenceLayer,
    idempotent,
    idempotent_async,
    idempotent_function,
    idempotent_function_async,
)


@dataclasses.dataclass
class Receipt:
    order_id: str
    total: Decimal


class Context:
    def get_remaining_time_in_millis(self) -> int:
        return 1000


store = InMemoryPersistenceLayer()


@idempotent_function_async(data_keyword_argument="order", persistence_store=store)
async def place(order: dict[str, Any], *, customer: str) -> Receipt:
    return Receipt(order_id=str(order["id"]), total=Decimal("1.00"))


@idempotent_async(persistence_store=store)
async def handler(event: dict[str, Any], context: Context) -> dict[str, int]:
    return {"status": 200}


@idempotent_function(data_keyword_argument="order", persistence_store=store)
def charge(amount: Decimal, order: Receipt, retries: int = 3) -> Receipt:
    return order


@idempotent(persistence_store=store)
def sync_handler(event: dict[str, Any], context: Context | None) -> list[str]:
    return ["ok"]


# R: aioidempotency._async.decorators.IdempotentFunction[[order: dict[str, Any], *, customer: str], Coroutine[Any, Any, Receipt]]
reveal_type(place)
# R: aioidempotency._async.decorators.IdempotentFunction[[event: dict[str, Any], context: Context], Coroutine[Any, Any, dict[str, int]]]
reveal_type(handler)
# R: aioidempotency._sync.decorators.IdempotentFunction[[amount: decimal.Decimal, order: Receipt, retries: int =], Receipt]
reveal_type(charge)
# R: aioidempotency._sync.decorators.IdempotentFunction[[event: dict[str, Any], context: Context | None], list[str]]
reveal_type(sync_handler)
# R: def (order: dict[str, Any], *, customer: str) -> Coroutine[Any, Any, Receipt]
reveal_type(place.__wrapped__)
# R: def (event: dict[str, Any], context: Context) -> Coroutine[Any, Any, dict[str, int]]
reveal_type(handler.__wrapped__)
# R: def (amount: decimal.Decimal, order: Receipt, retries: int =) -> Receipt
reveal_type(charge.__wrapped__)
# R: def (event: dict[str, Any], context: Context | None) -> list[str]
reveal_type(sync_handler.__wrapped__)
reveal_type(place.engine)  # R: aioidempotency._async.engine.IdempotencyEngine
reveal_type(charge.engine)  # R: aioidempotency._sync.engine.SyncIdempotencyEngine


async def callers() -> None:
    receipt = await place({"id": 1}, customer="ada")
    reveal_type(receipt)  # R: Receipt
    response = await handler({"id": 1}, Context())
    reveal_type(response)  # R: dict[str, int]
    task = asyncio.create_task(place({"id": 2}, customer="bob"))
    reveal_type(task)  # R: Task[Receipt]
    both = await asyncio.gather(place({"id": 3}, customer="ada"), place({"id": 4}, customer="b"))
    reveal_type(both)  # R: tuple[Receipt, Receipt]

    engine = IdempotencyEngine(store, key_prefix="payments")

    async def refund() -> Decimal:
        return Decimal("2.50")

    reveal_type(await engine.run({"id": 4}, refund))  # R: decimal.Decimal

    async def process(record: dict[str, str], attempt: int) -> str:
        return record["id"] * attempt

    reveal_type(await engine.run({"id": 5}, process, {"id": "r"}, 2))  # R: str
    await engine.run({"id": 5}, process, {"id": "r"})  # E: arg-type
    await engine.run({"id": 5}, process, {"id": "r"}, "2")  # E: arg-type


async def stores() -> None:
    async with CachePersistenceLayer(url="redis://localhost") as cache:
        reveal_type(cache)  # R: aioidempotency._async.cache.CachePersistenceLayer
    with SyncInMemoryPersistenceLayer() as memory:
        reveal_type(memory)  # R: aioidempotency._sync.memory.SyncInMemoryPersistenceLayer


def sync_callers() -> None:
    reveal_type(asyncio.run(place({"id": 1}, customer="ada")))  # R: Receipt
    reveal_type(charge(Decimal("1.00"), Receipt("1", Decimal(1))))  # R: Receipt
    reveal_type(sync_handler({"id": 1}, None))  # R: list[str]


async def wrong_calls() -> None:
    await place({"id": 1}, customer=7)  # E: arg-type
    await place({"id": 1})  # E: call-arg
    await place({"id": 1}, "ada")  # E: call-arg
    await handler({"id": 1})  # E: call-arg
    await handler({"id": 1}, Context(), extra=1)  # E: call-arg
    wrong: str = await place({"id": 1}, customer="ada")  # E: assignment
    not_awaited: Receipt = place({"id": 1}, customer="ada")  # E: assignment
    charge("1.00", Receipt("1", Decimal(1)))  # E: arg-type
    charge(Decimal(1), order={"id": 1})  # E: arg-type
    count: int = charge(Decimal(1), Receipt("1", Decimal(1)))  # E: assignment
    sync_handler({"id": 1})  # E: call-arg
    sync_handler([], None)  # E: arg-type
    del wrong, not_awaited, count


@idempotent_function_async(data_keyword_argument=1, persistence_store=store)  # E: arg-type
async def bad_argument_name(order: dict[str, Any]) -> None:
    return None


# E: arg-type
@idempotent_function_async(data_keyword_argument="order", persistence_store="memory://")
async def bad_store(order: dict[str, Any]) -> None:
    return None
