"""Output serializers: a replay returns an equal object of the right type."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import inspect
import json
from collections.abc import Callable, Coroutine
from decimal import Decimal
from typing import Any, Optional, ParamSpec, TypeVar, Union

import pydantic
import pytest

from aioidempotency import (
    BaseIdempotencySerializer,
    CustomDictSerializer,
    DataclassSerializer,
    IdempotencyEngine,
    IdempotencyModelTypeError,
    IdempotencyNoSerializationModelError,
    InMemoryPersistenceLayer,
    NoOpSerializer,
    PydanticSerializer,
    RecordStatus,
    idempotent_async,
    idempotent_function,
    idempotent_function_async,
)
from aioidempotency._async.decorators import IdempotentFunction
from aioidempotency.persistence import PersistenceLayer
from tests.helpers import FakeLambdaContext

P = ParamSpec("P")
R = TypeVar("R")


class Currency(enum.Enum):
    EUR = "EUR"
    USD = "USD"


@dataclasses.dataclass
class Receipt:
    order_id: str
    amount_cents: int
    items: list[str]
    note: str | None = None


class Item(pydantic.BaseModel):
    sku: str
    price: Decimal


class Invoice(pydantic.BaseModel):
    invoice_id: str
    total: Decimal
    currency: Currency
    issued: dt.datetime
    items: list[Item]


class Money:
    """A result type that is neither a dataclass nor a model."""

    def __init__(self, cents: int, currency: str) -> None:
        self.cents = cents
        self.currency = currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.cents, self.currency) == (
            other.cents,
            other.currency,
        )

    def __hash__(self) -> int:
        return hash((self.cents, self.currency))


def make_invoice(order: dict[str, Any]) -> Invoice:
    return Invoice(
        invoice_id=f"inv-{order['id']}",
        total=Decimal("12.50"),
        currency=Currency.EUR,
        issued=dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.timezone.utc),
        items=[Item(sku="a", price=Decimal("10.00")), Item(sku="b", price=Decimal("2.50"))],
    )


def make_receipt(order: dict[str, Any]) -> Receipt:
    return Receipt(order_id=str(order["id"]), amount_cents=1250, items=["a", "b"])


async def assert_replays_equal(
    store: InMemoryPersistenceLayer,
    call: Any,
    order: dict[str, Any],
    calls: list[Any],
) -> tuple[Any, Any]:
    """Call twice; the function runs once and the replay equals the first result."""
    first = await call(order=order)
    second = await call(order=order)
    assert len(calls) == 1
    assert second == first
    assert type(second) is type(first)
    if first is not None:
        assert second is not first  # it really came back from the store
    return first, second


# -- module-level functions: their string annotations resolve (from __future__ import) --------


def _decorate(
    store: PersistenceLayer, serializer: Any
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], IdempotentFunction[P, Coroutine[Any, Any, R]]]:
    return idempotent_function_async(
        data_keyword_argument="order", persistence_store=store, output_serializer=serializer
    )


async def test_noop_serializer_round_trip() -> None:
    store = InMemoryPersistenceLayer()
    calls: list[Any] = []

    @_decorate(store, NoOpSerializer())
    async def charge(order: dict[str, Any]) -> dict[str, Any]:
        calls.append(order)
        return {"charged": 250, "ok": True, "items": [1, "é", None, 0.5], "nested": {"": []}}

    await assert_replays_equal(store, charge, {"id": 1}, calls)


async def test_noop_serializer_stores_decimals_as_strings() -> None:
    """As in the reference: the first caller gets the Decimal, a replay its JSON string."""
    store = InMemoryPersistenceLayer()

    @_decorate(store, NoOpSerializer())
    async def charge(order: dict[str, Any]) -> dict[str, Any]:
        return {"charged": Decimal("2.50")}

    assert await charge(order={"id": 1}) == {"charged": Decimal("2.50")}
    assert await charge(order={"id": 1}) == {"charged": "2.50"}


async def test_custom_dict_serializer_round_trip() -> None:
    store = InMemoryPersistenceLayer()
    calls: list[Any] = []
    serializer = CustomDictSerializer(
        to_dict=lambda money: {"cents": money.cents, "currency": money.currency},
        from_dict=lambda data: Money(**data),
    )

    @_decorate(store, serializer)
    async def charge(order: dict[str, Any]) -> Money:
        calls.append(order)
        return Money(order["cents"], "EUR")

    _, second = await assert_replays_equal(store, charge, {"cents": 995}, calls)
    assert isinstance(second, Money)
    assert second == Money(995, "EUR")
    key = charge.engine.idempotency_key({"cents": 995}, key_source=inspect.unwrap(charge))
    record = await store.get(key)
    assert record is not None
    assert json.loads(record.response_data or "") == {"cents": 995, "currency": "EUR"}


@pytest.mark.parametrize("as_class", [False, True], ids=["instance", "from-annotation"])
async def test_dataclass_serializer_round_trip(as_class: bool) -> None:
    store = InMemoryPersistenceLayer()
    calls: list[Any] = []
    serializer: Any = DataclassSerializer if as_class else DataclassSerializer(Receipt)

    @_decorate(store, serializer)
    async def checkout(order: dict[str, Any]) -> Receipt:
        calls.append(order)
        return make_receipt(order)

    _, second = await assert_replays_equal(store, checkout, {"id": 42}, calls)
    assert second == Receipt(order_id="42", amount_cents=1250, items=["a", "b"])


@pytest.mark.parametrize("as_class", [False, True], ids=["instance", "from-annotation"])
async def test_pydantic_serializer_round_trip(as_class: bool) -> None:
    store = InMemoryPersistenceLayer()
    calls: list[Any] = []
    serializer: Any = PydanticSerializer if as_class else PydanticSerializer(Invoice)

    @_decorate(store, serializer)
    async def bill(order: dict[str, Any]) -> Invoice:
        calls.append(order)
        return make_invoice(order)

    _, second = await assert_replays_equal(store, bill, {"id": 7}, calls)
    assert isinstance(second, Invoice)
    assert second == make_invoice({"id": 7})
    assert isinstance(second.items[0], Item)
    assert second.total == Decimal("12.50")


async def test_engine_with_a_serializer_replays_the_model() -> None:
    store = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(
        store, key_prefix="billing", output_serializer=PydanticSerializer(Invoice)
    )
    runs: list[int] = []

    async def bill() -> Invoice:
        runs.append(1)
        return make_invoice({"id": 3})

    first = await engine.run({"id": 3}, bill)
    second = await engine.run({"id": 3}, bill)
    assert runs == [1]
    assert second == first
    assert isinstance(second, Invoice)
    record = await store.get(engine.idempotency_key({"id": 3}))
    assert record is not None
    assert record.status is RecordStatus.COMPLETED
    assert json.loads(record.response_data or "") == first.model_dump(mode="json")


OPTIONAL_CALLS: list[Any] = []


async def _optional_receipt(order: dict[str, Any]) -> Optional[Receipt]:  # noqa: UP045
    OPTIONAL_CALLS.append(order)
    return None if order.get("empty") else make_receipt(order)


async def _receipt_or_none(order: dict[str, Any]) -> Receipt | None:
    OPTIONAL_CALLS.append(order)
    return None if order.get("empty") else make_receipt(order)


async def _optional_invoice(order: dict[str, Any]) -> Optional[Invoice]:  # noqa: UP045
    OPTIONAL_CALLS.append(order)
    return None if order.get("empty") else make_invoice(order)


async def _invoice_or_none(order: dict[str, Any]) -> Invoice | None:
    OPTIONAL_CALLS.append(order)
    return None if order.get("empty") else make_invoice(order)


@pytest.mark.parametrize(
    ("serializer", "function", "model"),
    [
        (DataclassSerializer, _optional_receipt, Receipt),
        (DataclassSerializer, _receipt_or_none, Receipt),
        (PydanticSerializer, _optional_invoice, Invoice),
        (PydanticSerializer, _invoice_or_none, Invoice),
    ],
)
async def test_optional_model_annotation(serializer: Any, function: Any, model: type) -> None:
    """`Optional[Model]` and `Model | None` (string annotations here) name the model."""
    assert isinstance(function.__annotations__["return"], str)
    store = InMemoryPersistenceLayer()
    decorated = _decorate(store, serializer)(function)
    OPTIONAL_CALLS.clear()
    _, second = await assert_replays_equal(store, decorated, {"id": 5}, OPTIONAL_CALLS)
    assert isinstance(second, model)
    OPTIONAL_CALLS.clear()
    _, second = await assert_replays_equal(
        store, decorated, {"id": 6, "empty": True}, OPTIONAL_CALLS
    )
    assert second is None


_NO_FUTURE_SOURCE = """
from typing import Optional

async def bill(order) -> Optional[Invoice]:
    calls.append(order)
    return make_invoice(order)
"""


async def test_annotation_objects_without_future_import() -> None:
    """A module without `from __future__ import annotations` has real type objects."""
    calls: list[Any] = []
    namespace: dict[str, Any] = {
        "__name__": "app.billing",
        "Invoice": Invoice,
        "make_invoice": make_invoice,
        "calls": calls,
    }
    exec(compile(_NO_FUTURE_SOURCE, "<app.billing>", "exec", dont_inherit=True), namespace)
    bill = namespace["bill"]
    assert bill.__annotations__["return"] == Optional[Invoice]  # noqa: UP045
    store = InMemoryPersistenceLayer()
    decorated = _decorate(store, PydanticSerializer)(bill)
    _, second = await assert_replays_equal(store, decorated, {"id": 9}, calls)
    assert isinstance(second, Invoice)


async def test_handler_decorator_takes_a_serializer() -> None:
    store = InMemoryPersistenceLayer()
    calls: list[Any] = []

    @idempotent_async(persistence_store=store, output_serializer=DataclassSerializer)
    async def handler(event: dict[str, Any], context: Any) -> Receipt:
        calls.append(event)
        return make_receipt(event)

    first = await handler({"id": 1}, FakeLambdaContext())
    second = await handler({"id": 1}, FakeLambdaContext())
    assert calls == [{"id": 1}]
    assert second == first
    assert isinstance(second, Receipt)


def test_sync_shim_takes_a_serializer() -> None:
    store = InMemoryPersistenceLayer()
    calls: list[Any] = []

    @idempotent_function(
        data_keyword_argument="order", persistence_store=store, output_serializer=PydanticSerializer
    )
    def bill(order: dict[str, Any]) -> Invoice:
        calls.append(order)
        return make_invoice(order)

    first = bill(order={"id": 2})
    second = bill(order={"id": 2})
    assert len(calls) == 1
    assert isinstance(second, Invoice)
    assert second == first


# -- wrong or missing model types ----------------------------------------------------------------


async def _returns_invoice(order: dict[str, Any]) -> Invoice:
    return make_invoice(order)


async def _returns_receipt(order: dict[str, Any]) -> Receipt:
    return make_receipt(order)


async def _returns_int(order: dict[str, Any]) -> int:
    return 1


async def _returns_union(order: dict[str, Any]) -> Union[Receipt, Invoice]:  # noqa: UP007
    return make_receipt(order)


async def _returns_optional_union(order: dict[str, Any]) -> Receipt | Invoice | None:
    return None


async def _returns_dict(order: dict[str, Any]) -> dict[str, Any]:
    return {}


@pytest.mark.parametrize(
    ("serializer", "function"),
    [
        (DataclassSerializer, _returns_invoice),
        (DataclassSerializer, _returns_int),
        (DataclassSerializer, _returns_union),
        (DataclassSerializer, _returns_optional_union),
        (PydanticSerializer, _returns_receipt),
        (PydanticSerializer, _returns_int),
        (PydanticSerializer, _returns_dict),
        (PydanticSerializer, _returns_optional_union),
        (NoOpSerializer, _returns_receipt),  # a class that cannot be built from a model
    ],
)
def test_wrong_model_types_are_refused(serializer: Any, function: Any) -> None:
    store = InMemoryPersistenceLayer()
    with pytest.raises(IdempotencyModelTypeError):
        _decorate(store, serializer)(function)
    with pytest.raises(IdempotencyModelTypeError):
        idempotent_async(persistence_store=store, output_serializer=serializer)(function)


async def _no_annotation(order):  # type: ignore[no-untyped-def]
    return order


def _no_annotation_sync(order):  # type: ignore[no-untyped-def]
    return order


@pytest.mark.parametrize("serializer", [DataclassSerializer, PydanticSerializer])
def test_unresolvable_string_annotation_is_explained(serializer: Any) -> None:
    @dataclasses.dataclass
    class LocalReceipt:  # invisible to the module: "LocalReceipt" cannot be resolved
        order_id: str

    async def checkout(order: dict[str, Any]) -> LocalReceipt:
        return LocalReceipt(order_id="1")

    with pytest.raises(IdempotencyModelTypeError, match="cannot resolve the return annotation"):
        _decorate(InMemoryPersistenceLayer(), serializer)(checkout)


@pytest.mark.parametrize("serializer", [DataclassSerializer, PydanticSerializer])
def test_no_annotation_is_refused(serializer: Any) -> None:
    store = InMemoryPersistenceLayer()
    with pytest.raises(IdempotencyNoSerializationModelError):
        _decorate(store, serializer)(_no_annotation)
    with pytest.raises(IdempotencyNoSerializationModelError):
        idempotent_function(
            data_keyword_argument="order", persistence_store=store, output_serializer=serializer
        )(_no_annotation_sync)
    with pytest.raises(IdempotencyNoSerializationModelError):
        serializer.instantiate(None)


def test_serializers_share_the_base_class() -> None:
    for serializer in [
        NoOpSerializer(),
        CustomDictSerializer(to_dict=dict, from_dict=dict),
        DataclassSerializer(Receipt),
        PydanticSerializer(Invoice),
    ]:
        assert isinstance(serializer, BaseIdempotencySerializer)
