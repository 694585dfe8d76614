"""A function whose parameter names a type by a forward reference that cannot be
resolved still has its return model found: the serializer class is instantiated from
the return annotation itself. (No ``from __future__ import annotations`` here: it would
make the return annotation a string too.)"""

import dataclasses
from typing import TYPE_CHECKING, Any

from aioidempotency import DataclassSerializer, InMemoryPersistenceLayer, idempotent_function_async

if TYPE_CHECKING:
    PendingOrder = dict[str, Any]  # known to type checkers only: unresolvable at run time


@dataclasses.dataclass
class Receipt:
    order_id: str
    amount: int


calls: list[str] = []


async def checkout(order: "PendingOrder") -> Receipt:
    calls.append(order["id"])
    return Receipt(order_id=order["id"], amount=order["amount"])


async def test_the_return_model_is_found_beside_an_unresolvable_parameter_type() -> None:
    store = InMemoryPersistenceLayer()
    decorated = idempotent_function_async(
        data_keyword_argument="order",
        persistence_store=store,
        output_serializer=DataclassSerializer,
    )(checkout)
    order = {"id": "o-1", "amount": 12}
    first = await decorated(order=order)
    replayed = await decorated(order=order)
    assert first == replayed == Receipt(order_id="o-1", amount=12)
    assert isinstance(replayed, Receipt)
    assert calls == ["o-1"], "the second call was replayed from the store"
