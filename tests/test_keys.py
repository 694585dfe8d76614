"""Idempotency keys, validation hashes and stored data: byte-identical to Powertools 3.x.

Powertools' own `BasePersistenceLayer` computes the reference values; a seeded
generator produces the payloads.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import enum
import functools
import gc
import hashlib
import json
import random
import re
import uuid
import warnings
import zlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import jmespath
import jmespath.exceptions
import jmespath.functions
import jmespath.visitor
import pydantic
import pytest
from aws_lambda_powertools.shared.json_encoder import Encoder as PowertoolsEncoder
from aws_lambda_powertools.utilities.idempotency.base import _prepare_data
from aws_lambda_powertools.utilities.idempotency.config import (
    IdempotencyConfig as PowertoolsConfig,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer

from aioidempotency import (
    IdempotencyConfig,
    IdempotencyEngine,
    IdempotencyError,
    IdempotencyKeyError,
    IdempotencyPayloadError,
    IdempotencyPersistenceConfigError,
    IdempotencyValidationError,
    InMemoryPersistenceLayer,
    RecordStatus,
    idempotent_function_async,
)
from aioidempotency._cli import usable_hash_functions
from aioidempotency._encoding import dumps_key_data, dumps_result
from aioidempotency._keys import (
    PowertoolsFunctions,
    hash_data,
    is_missing_idempotency_key,
    prepare_payload,
    select_validation_data,
)

# -- the reference ---------------------------------------------------------------------


class _ReferenceLayer(BasePersistenceLayer):
    """Powertools' persistence layer with no storage: only its key derivation is used."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Powertools leaves it unannotated

    def _get_record(self, idempotency_key: str) -> Any:
        raise NotImplementedError

    def _put_record(self, data_record: Any) -> None:
        raise NotImplementedError

    def _update_record(self, data_record: Any) -> None:
        raise NotImplementedError

    def _delete_record(self, data_record: Any) -> None:
        raise NotImplementedError


def reference_layer(
    function: Any,
    *,
    event_key_jmespath: str = "",
    payload_validation_jmespath: str = "",
    hash_function: str = "md5",
    key_prefix: str | None = None,
) -> _ReferenceLayer:
    layer = _ReferenceLayer()
    layer.configure(
        PowertoolsConfig(
            event_key_jmespath=event_key_jmespath,
            payload_validation_jmespath=payload_validation_jmespath,
            hash_function=hash_function,
        ),
        function_name=f"{function.__module__}.{function.__qualname__}",
        key_prefix=key_prefix,
    )
    return layer


def reference_key(layer: _ReferenceLayer, payload: Any) -> str | None:
    """Powertools' key for `payload`, or None when it finds no key in it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layer._get_hashed_idempotency_key(copy.deepcopy(_prepare_data(payload)))


def reference_validation_hash(layer: _ReferenceLayer, payload: Any) -> str:
    return layer._get_hashed_payload(copy.deepcopy(_prepare_data(payload)))


def reference_data(result: Any) -> str:
    return json.dumps(result, cls=PowertoolsEncoder, sort_keys=True)


async def process_order(order: Any) -> Any:
    """The function whose keys are derived (its module and qualname form the prefix)."""
    return order


class Handlers:
    async def process_order(self, order: Any) -> Any:
        return order


# -- a seeded payload generator -----------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 9


class Mode(str, enum.Enum):
    FAST = "fast"
    SAFE = "sûr"


class Shape(enum.Enum):
    SQUARE = (1, 2)
    POINT = None


@dataclasses.dataclass
class Line:
    sku: str
    quantity: int
    price: Decimal


@dataclasses.dataclass
class Order:
    order_id: uuid.UUID
    placed: dt.datetime
    lines: list[Line]
    meta: dict[str, Any]


class Customer(pydantic.BaseModel):
    name: str
    since: dt.date
    tier: Color
    balance: Decimal
    tags: list[str]
    extra: Any = None


class LegacyEvent:
    """An object with `.dict()` (Powertools' event source data classes of old)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def dict(self) -> dict[str, Any]:
        return self._data


class WrappedEvent:
    """An event source data class: the payload is its `raw_event`."""

    def __init__(self, raw_event: Any) -> None:
        self.raw_event = raw_event


_TEXT = [
    "",
    "a",
    "order-42",
    "é",
    "naïve café",
    "中文字符",
    "🙂 emoji",
    'quote " and \\ backslash',
    "line\nbreak\ttab",
    "\x00nul",
    "\u2028sep",
    "Ω≈ç√",
    " ",
]

_TIMEZONES = [
    None,
    dt.timezone.utc,
    dt.timezone(dt.timedelta(hours=5, minutes=30)),
    dt.timezone(-dt.timedelta(hours=8)),
]


def _one_of(rng: random.Random, makers: list[Callable[[], Any]]) -> Any:
    """One of `makers`, chosen by `rng`, called."""
    return rng.choice(makers)()


class PayloadGenerator:
    """Random payloads of every kind the key derivation accepts (seeded)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self) -> str:
        rng = self.rng
        if rng.random() < 0.6:
            return rng.choice(_TEXT)
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF)]))
            for _ in range(rng.randint(1, 8))
        )

    def number(self) -> Any:
        rng = self.rng
        return _one_of(
            rng,
            [
                lambda: rng.randint(-1000, 1000),
                lambda: rng.getrandbits(80) - 2**79,
                lambda: 0,
                lambda: rng.uniform(-1e6, 1e6),
                lambda: rng.random() * 10 ** rng.randint(-12, 300),
                lambda: rng.choice([0.1, -0.0, 1e-7, 1.5, 2.5e-308, float("inf"), float("nan")]),
                lambda: Decimal(
                    rng.choice(
                        ["2.50", "0", "-0", "1E+3", "0.000001", "NaN", "123456789.123456789"]
                    )
                ),
                lambda: Decimal(rng.randint(-(10**6), 10**6)) / Decimal(100),
            ],
        )

    def moment(self) -> Any:
        rng = self.rng
        base = dt.datetime(2020, 1, 1) + dt.timedelta(
            seconds=rng.randint(0, 10**9), microseconds=rng.choice([0, rng.randint(0, 999_999)])
        )
        tz = rng.choice(_TIMEZONES)
        return _one_of(
            rng,
            [
                lambda: base.replace(tzinfo=tz),
                lambda: base.date(),
                lambda: base.time().replace(tzinfo=tz),
            ],
        )

    def scalar(self) -> Any:
        rng = self.rng
        return _one_of(
            rng,
            [
                self.text,
                self.text,
                self.number,
                self.number,
                lambda: rng.choice([True, False]),
                lambda: None,
                lambda: rng.choice([*Color, *Level, *Mode, *Shape]),
                self.moment,
                lambda: uuid.UUID(int=rng.getrandbits(128)),
                lambda: rng.choice(
                    [PurePosixPath("a/b/é.txt"), PureWindowsPath("C:\\data\\x.json")]
                ),
            ],
        )

    def line(self) -> Line:
        rng = self.rng
        return Line(
            sku=self.text(), quantity=rng.randint(0, 9), price=Decimal(rng.randint(0, 99_999)) / 100
        )

    def order(self, depth: int) -> Order:
        rng = self.rng
        return Order(
            order_id=uuid.UUID(int=rng.getrandbits(128)),
            placed=dt.datetime(2024, 5, rng.randint(1, 31), 12, 30, tzinfo=rng.choice(_TIMEZONES)),
            lines=[self.line() for _ in range(rng.randint(0, 3))],
            meta=self.mapping(depth + 1),
        )

    def customer(self, depth: int) -> Customer:
        rng = self.rng
        return Customer(
            name=self.text(),
            since=dt.date(2000 + rng.randint(0, 30), rng.randint(1, 12), rng.randint(1, 28)),
            tier=rng.choice(list(Color)),
            balance=Decimal(rng.randint(-99_999, 99_999)) / 100,
            tags=[self.text() for _ in range(rng.randint(0, 3))],
            extra=self.json_value(depth + 1) if rng.random() < 0.5 else None,
        )

    def mapping(self, depth: int) -> dict[Any, Any]:
        rng = self.rng
        size = rng.randint(0, 5)
        if rng.random() < 0.1:
            return {rng.randint(-50, 50): self.value(depth + 1) for _ in range(size)}
        return {self.text(): self.value(depth + 1) for _ in range(size)}

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        if depth >= 4 or rng.random() < 0.45:
            return self.scalar()
        return _one_of(
            rng,
            [
                lambda: self.mapping(depth),
                lambda: self.mapping(depth),
                lambda: [self.value(depth + 1) for _ in range(rng.randint(0, 5))],
                lambda: tuple(self.value(depth + 1) for _ in range(rng.randint(0, 3))),
                lambda: self.order(depth),
                lambda: self.customer(depth),
            ],
        )

    def payload(self) -> Any:
        """A whole payload: usually a dict, sometimes a model, a scalar or a wrapper."""
        rng = self.rng
        return _one_of(
            rng,
            [
                lambda: self.mapping(0),
                lambda: self.mapping(0),
                lambda: self.mapping(0),
                lambda: self.value(0),
                lambda: self.order(0),
                lambda: self.customer(0),
                lambda: LegacyEvent(self.mapping(0)),
                lambda: WrappedEvent(self.mapping(0)),
            ],
        )

    def json_value(self, depth: int = 0) -> Any:
        """JSON-native data (for a request body that is JSON text)."""
        rng = self.rng
        if depth >= 3 or rng.random() < 0.5:
            return rng.choice([self.text(), rng.randint(-99, 99), rng.uniform(-9, 9), True, None])
        if rng.random() < 0.5:
            return [self.json_value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {self.text(): self.json_value(depth + 1) for _ in range(rng.randint(0, 4))}

    def event(self) -> Any:
        """An API-Gateway-like event for configs with `event_key_jmespath`."""
        rng = self.rng
        body: dict[str, Any] = {"order_id": self.json_value(2), "amount": rng.randint(0, 10**6)}
        if rng.random() < 0.3:
            del body["order_id"]
        body.update({self.text(): self.json_value(1) for _ in range(rng.randint(0, 3))})
        event: dict[str, Any] = {
            "id": self.scalar() if rng.random() < 0.85 else None,
            "body": json.dumps(body) if rng.random() < 0.8 else json.dumps(self.json_value()),
            "headers": {"Idempotency-Key": rng.choice([self.text(), None]), "x": self.value(2)},
            "nested": {"a": self.value(2), "b": self.value(2)}
            if rng.random() < 0.85
            else {"a": None, "b": None},
            "extra": self.value(1),
        }
        if rng.random() < 0.2:
            return WrappedEvent(event)
        return event

    def result(self, depth: int = 0) -> Any:
        """A function result Powertools' encoder can store."""
        rng = self.rng
        if depth >= 3 or rng.random() < 0.4:
            return _one_of(
                rng,
                [
                    self.text,
                    lambda: rng.randint(-(2**70), 2**70),
                    lambda: rng.uniform(-1e9, 1e9),
                    lambda: Decimal(rng.randint(0, 99_999)) / 100,
                    lambda: rng.choice([True, False, None, 0, "", Mode.SAFE, Level.HIGH]),
                    self.line,
                ],
            )
        return _one_of(
            rng,
            [
                lambda: {self.text(): self.result(depth + 1) for _ in range(rng.randint(0, 4))},
                lambda: [self.result(depth + 1) for _ in range(rng.randint(0, 4))],
                lambda: Customer(
                    name=self.text(),
                    since=dt.date(2001, 2, 3),
                    tier=Color.BLUE,
                    balance=Decimal("2.50"),
                    tags=[],
                ),
            ],
        )


# -- fixed vectors: serialised key data and its MD5 -----------------------------------------


@pytest.mark.parametrize(
    ("data", "serialised", "digest"),
    [
        ({"b": 2, "a": 1}, '{"a": 1, "b": 2}', "8aacdb17187e6acf2b175d4aa08d7213"),
        (None, "null", "37a6259cc0c1dae299a7866489dff0bd"),
        ("abc", '"abc"', "ebd9f4c7b06cb0aaf5d13d80e49d8b90"),
        (["x", 1], '["x", 1]', "eb7f9b4082f6f889e32eb37f50ac22d2"),
        ({"amt": Decimal("2.50")}, '{"amt": "2.50"}', "1e70d74bb2143097c828ad3c87123a2f"),
        ({"k": "é"}, '{"k": "\\u00e9"}', "2942ef53bb075210b2e0982c8680e66d"),
    ],
)
def test_semantics_vectors(data: Any, serialised: str, digest: str) -> None:
    from aioidempotency._encoding import dumps_key_data

    assert dumps_key_data(data) == serialised
    assert hash_data(data) == digest
    assert hash_data(data, "md5") == reference_layer(process_order)._generate_hash(data)


def test_vector_keys_through_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    engine = IdempotencyEngine(InMemoryPersistenceLayer())
    key = engine.idempotency_key({"b": 2, "a": 1}, key_source=process_order)
    assert key == ("test-func.tests.test_keys.process_order#8aacdb17187e6acf2b175d4aa08d7213")


#: hashlib's algorithms that OpenSSL provides beyond the guaranteed ones (no `hashlib`
#: attribute of their own: `hashlib.new(name)` makes them).
OPENSSL_ONLY = sorted(
    name
    for name in hashlib.algorithms_available - hashlib.algorithms_guaranteed
    if getattr(hashlib, name, None) is None and name in usable_hash_functions()
)


@pytest.mark.parametrize("name", OPENSSL_ONLY or ["none-in-this-python"])
async def test_a_hash_function_only_openssl_provides_keys_and_validates_calls(name: str) -> None:
    if name not in hashlib.algorithms_available:
        pytest.skip("this Python's OpenSSL provides no hash beyond the guaranteed ones")
    config = IdempotencyConfig(
        event_key_jmespath="id", payload_validation_jmespath="amount", hash_function=name
    )
    engine = IdempotencyEngine(InMemoryPersistenceLayer(), config, key_prefix="orders")
    digest = hashlib.new(name, dumps_key_data(7).encode()).hexdigest()
    assert engine.idempotency_key({"id": 7, "amount": 1}) == f"orders#{digest}"
    calls: list[int] = []

    async def charge() -> str:
        calls.append(1)
        return "charged"

    assert await engine.run({"id": 7, "amount": 1}, charge) == "charged"
    assert await engine.run({"id": 7, "amount": 1}, charge) == "charged"  # replayed
    with pytest.raises(IdempotencyValidationError):
        await engine.run({"id": 7, "amount": 2}, charge)
    assert calls == [1]


# -- generated payloads vs Powertools ------------------------------------------------------

CONFIGS = [
    pytest.param("", "", "md5", id="whole-payload"),
    pytest.param("", "", "sha256", id="whole-payload-sha256"),
    pytest.param("id", "nested", "md5", id="id-validate-nested"),
    pytest.param('[id, headers."Idempotency-Key"]', "[extra, id]", "md5", id="multiselect-list"),
    pytest.param("{order: id, who: nested.a}", "headers", "sha256", id="multiselect-hash"),
    pytest.param("powertools_json(body)", "powertools_json(body).amount", "md5", id="json-body"),
    pytest.param("powertools_json(body).order_id", "missing_field", "md5", id="json-body-field"),
    pytest.param("nested.*", "", "sha1", id="wildcard-sha1"),
]

PAYLOADS_PER_CONFIG = 250


@pytest.mark.parametrize(("key_path", "validation_path", "hash_function"), CONFIGS)
@pytest.mark.parametrize("function_name", [None, "orders-prod"])
def test_keys_and_validation_hashes_match_powertools(
    monkeypatch: pytest.MonkeyPatch,
    key_path: str,
    validation_path: str,
    hash_function: str,
    function_name: str | None,
) -> None:
    if function_name is None:
        monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    else:
        monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", function_name)
    config = IdempotencyConfig(
        event_key_jmespath=key_path,
        payload_validation_jmespath=validation_path,
        hash_function=hash_function,
    )
    engine = IdempotencyEngine(InMemoryPersistenceLayer(), config)
    reference = reference_layer(
        process_order,
        event_key_jmespath=key_path,
        payload_validation_jmespath=validation_path,
        hash_function=hash_function,
    )
    generator = PayloadGenerator(
        seed=zlib.crc32(f"{key_path}|{validation_path}|{hash_function}".encode())
    )
    keyed = missing = 0
    for _ in range(PAYLOADS_PER_CONFIG):
        payload = generator.event() if key_path else generator.payload()
        expected = reference_key(reference, payload)
        if expected is None:
            missing += 1
            with pytest.raises(IdempotencyKeyError):
                engine.idempotency_key(payload, key_source=process_order)
        else:
            keyed += 1
            assert engine.idempotency_key(payload, key_source=process_order) == expected, payload
        if validation_path:
            ours = hash_data(
                select_validation_data(prepare_payload(payload), config), hash_function
            )
            assert ours == reference_validation_hash(reference, payload), payload
    assert keyed > PAYLOADS_PER_CONFIG // 4
    if key_path and key_path != "powertools_json(body)":
        assert missing > 0  # the generator also exercises the missing-key rule


@pytest.mark.parametrize(("key_path", "validation_path", "hash_function"), CONFIGS)
async def test_stored_records_match_powertools(
    monkeypatch: pytest.MonkeyPatch, key_path: str, validation_path: str, hash_function: str
) -> None:
    """End to end: the record the engine stores has Powertools' key, validation hash and data."""
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    store = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(
        store,
        IdempotencyConfig(
            event_key_jmespath=key_path,
            payload_validation_jmespath=validation_path,
            hash_function=hash_function,
        ),
    )
    reference = reference_layer(
        process_order,
        event_key_jmespath=key_path,
        payload_validation_jmespath=validation_path,
        hash_function=hash_function,
    )
    generator = PayloadGenerator(seed=len(key_path) * 7919 + len(validation_path))
    stored = 0
    for _ in range(60):
        payload = generator.event() if key_path else generator.payload()
        key = reference_key(reference, payload)
        if key is None:
            continue
        result = generator.result()

        async def run(result: Any = result) -> Any:
            return result

        returned = await engine.run_for(payload, run, key_source=process_order)
        assert returned is result
        record = await store.get(key)
        assert record is not None, payload
        assert record.status is RecordStatus.COMPLETED
        assert record.response_data == reference_data(result)
        if validation_path:
            assert record.payload_hash == reference_validation_hash(reference, payload)
        else:
            assert record.payload_hash is None
        await store.delete(key)
        stored += 1
    assert stored > 20


def test_stored_data_matches_powertools_encoder() -> None:
    generator = PayloadGenerator(seed=2024)
    for _ in range(500):
        result = generator.result()
        assert dumps_result(result) == reference_data(result)


@pytest.mark.parametrize(
    "result",
    [dt.datetime(2024, 1, 1), b"bytes", {1, 2}, 1j, uuid.UUID(int=1), Color.RED],
    ids=["datetime", "bytes", "set", "complex", "uuid", "plain-enum"],
)
def test_results_powertools_cannot_store_are_refused(result: Any) -> None:
    with pytest.raises(TypeError):
        reference_data(result)
    with pytest.raises(TypeError):
        dumps_result(result)


class _UpperFunctions(jmespath.functions.Functions):  # type: ignore[misc]
    @jmespath.functions.signature({"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_upper(self, value: str) -> str:
        return value.upper()


def test_jmespath_options_replace_the_powertools_functions() -> None:
    options = {"custom_functions": _UpperFunctions()}
    engine = IdempotencyEngine(
        InMemoryPersistenceLayer(),
        IdempotencyConfig(event_key_jmespath="upper(user)", jmespath_options=options),
        key_prefix="p",
    )
    layer = _ReferenceLayer()
    layer.configure(
        PowertoolsConfig(event_key_jmespath="upper(user)", jmespath_options=options),
        key_prefix="p",
    )
    assert engine.idempotency_key({"user": "ada"}) == reference_key(layer, {"user": "ada"})
    assert engine.idempotency_key({"user": "ada"}) == engine.idempotency_key({"user": "ADA"})
    with pytest.raises(IdempotencyPayloadError) as caught:
        IdempotencyEngine(
            InMemoryPersistenceLayer(),
            IdempotencyConfig(event_key_jmespath="powertools_json(body)", jmespath_options=options),
            key_prefix="p",
        ).idempotency_key({"body": "{}"})
    assert isinstance(caught.value.__cause__, jmespath.exceptions.UnknownFunctionError)


def test_deriving_keys_leaves_no_garbage_for_the_collector() -> None:
    # A key derived per call must not leave reference cycles behind: with many calls
    # they set off the garbage collector's full passes over the whole heap.
    engine = IdempotencyEngine(
        InMemoryPersistenceLayer(),
        IdempotencyConfig(
            event_key_jmespath="powertools_json(body).order_id",
            payload_validation_jmespath="amount",
        ),
        key_prefix="p",
    )
    payloads = [{"body": json.dumps({"order_id": f"o-{n}"}), "amount": n} for n in range(100)]
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage
    try:
        keys = {engine.idempotency_key(payload) for payload in payloads}
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, jmespath.visitor.TreeInterpreter)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert len(keys) == len(payloads)
    assert left == []


def test_key_prefix_replaces_the_derived_prefix() -> None:
    engine = IdempotencyEngine(InMemoryPersistenceLayer(), key_prefix="payments")
    reference = reference_layer(process_order, key_prefix="payments")
    payload = {"order": 1, "amount": Decimal("9.99")}
    key = engine.idempotency_key(payload, key_source=process_order)
    assert key == reference_key(reference, payload)
    assert key.startswith("payments#")


# -- missing keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "missing"),
    [
        (0, False),
        (0.0, False),
        (False, False),
        (True, False),
        (-1, False),
        ("0", False),
        ({"a": 0}, False),
        ([None, 0], False),
        ({"a": None, "b": False}, False),
        (None, True),
        ("", True),
        ({}, True),
        ([], True),
        ((), True),
        ({"a": None, "b": None}, True),
        ([None, None], True),
        ((None,), True),
    ],
)
def test_missing_key_rules(data: Any, missing: bool) -> None:
    assert is_missing_idempotency_key(data) is missing
    assert BasePersistenceLayer.is_missing_idempotency_key(data) is missing
    engine = IdempotencyEngine(InMemoryPersistenceLayer(), key_prefix="p")
    if missing:
        with pytest.raises(IdempotencyKeyError):
            engine.idempotency_key(data)
    else:
        assert engine.idempotency_key(data) == reference_key(
            reference_layer(process_order, key_prefix="p"), data
        )


def test_missing_selection_of_a_jmespath() -> None:
    engine = IdempotencyEngine(
        InMemoryPersistenceLayer(),
        IdempotencyConfig(event_key_jmespath="[user, order]"),
        key_prefix="p",
    )
    with pytest.raises(IdempotencyKeyError):
        engine.idempotency_key({"other": 1})
    assert engine.idempotency_key({"order": 0}).startswith("p#")


# -- payloads that cannot be hashed ----------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"raw bytes",
        {"body": b"raw bytes"},
        {1, 2, 3},
        {"tags": frozenset({"a"})},
        1 + 2j,
        {"amount": 3j},
        {"when": object()},
    ],
    ids=["bytes", "nested-bytes", "set", "nested-frozenset", "complex", "nested-complex", "object"],
)
async def test_unhashable_payloads_raise_a_typed_error(payload: Any) -> None:
    store = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(store, key_prefix="p")
    with pytest.raises(IdempotencyPayloadError) as caught:
        engine.idempotency_key(payload)
    assert isinstance(caught.value, IdempotencyError)
    assert isinstance(caught.value, IdempotencyKeyError)

    ran = []

    async def work() -> str:
        ran.append(True)
        return "done"

    with pytest.raises(IdempotencyPayloadError):
        await engine.run(payload, work)
    assert ran == []
    assert len(store) == 0


@pytest.mark.parametrize(
    ("key_path", "validation_path", "payload"),
    [
        ("powertools_json(body)", "", {"body": None}),
        ("powertools_json(body)", "", {}),
        ("powertools_json(body)", "", {"body": "not json"}),
        ("powertools_base64(body)", "", {"body": "abc"}),
        ("powertools_base64_gzip(body)", "", {"body": "aGVsbG8="}),
        ("id", "powertools_json(body)", {"id": 1, "body": "{"}),
    ],
    ids=["null-body", "no-body", "not-json", "bad-base64", "not-gzip", "validation"],
)
async def test_a_selection_that_fails_on_the_payload_is_a_typed_error(
    key_path: str, validation_path: str, payload: Any
) -> None:
    """Powertools turns these into a persistence error; we say it is the payload."""
    reference = reference_layer(
        process_order, event_key_jmespath=key_path, payload_validation_jmespath=validation_path
    )

    def reference_hashes() -> None:
        reference_key(reference, payload)
        reference_validation_hash(reference, payload)

    with pytest.raises(Exception):  # noqa: B017, PT011 - the reference fails too
        reference_hashes()
    store = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(
        store,
        IdempotencyConfig(event_key_jmespath=key_path, payload_validation_jmespath=validation_path),
        key_prefix="p",
    )
    ran: list[bool] = []

    async def work() -> str:
        ran.append(True)
        return "done"

    with pytest.raises(IdempotencyPayloadError, match=re.escape(validation_path or key_path)):
        await engine.run(payload, work)
    assert ran == []
    assert len(store) == 0


def test_circular_payload_raises_a_typed_error() -> None:
    payload: dict[str, Any] = {"a": 1}
    payload["self"] = payload
    with pytest.raises(IdempotencyPayloadError):
        IdempotencyEngine(InMemoryPersistenceLayer(), key_prefix="p").idempotency_key(payload)


# -- the prefix ------------------------------------------------------------------------------


def test_prefix_uses_the_lambda_function_name(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = IdempotencyEngine(InMemoryPersistenceLayer())
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "orders-prod")
    key = engine.idempotency_key({"id": 1}, key_source=process_order)
    assert key.startswith("orders-prod.tests.test_keys.process_order#")
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME")
    assert engine.idempotency_key({"id": 1}, key_source=process_order).startswith(
        "test-func.tests.test_keys.process_order#"
    )


def test_prefix_uses_module_and_qualname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    engine = IdempotencyEngine(InMemoryPersistenceLayer())

    async def local_handler(order: Any) -> Any:
        return order

    method_key = engine.idempotency_key({"id": 1}, key_source=Handlers.process_order)
    local_key = engine.idempotency_key({"id": 1}, key_source=local_handler)
    plain_key = engine.idempotency_key({"id": 1}, key_source=process_order)
    assert method_key.startswith("test-func.tests.test_keys.Handlers.process_order#")
    assert local_key.startswith(
        "test-func.tests.test_keys.test_prefix_uses_module_and_qualname.<locals>.local_handler#"
    )
    assert len({method_key, local_key, plain_key}) == 3
    for function, key in [(Handlers.process_order, method_key), (local_handler, local_key)]:
        assert key == reference_key(reference_layer(function), {"id": 1})


def _function_in_module(module: str, source: str, name: str) -> Any:
    namespace: dict[str, Any] = {"__name__": module}
    exec(source, namespace)
    return namespace[name]


HANDLER_SOURCE = """
async def handle(order):
    return {"handled_by": __name__, "order": order}
"""


async def test_same_name_in_two_modules_never_replay_each_other() -> None:
    """Functions with the same __name__ in different modules are separate."""
    billing = _function_in_module("app.billing", HANDLER_SOURCE, "handle")
    shipping = _function_in_module("app.shipping", HANDLER_SOURCE, "handle")
    assert billing.__name__ == shipping.__name__ == "handle"
    store = InMemoryPersistenceLayer()
    billing_idem = idempotent_function_async(
        data_keyword_argument="order", persistence_store=store
    )(billing)
    shipping_idem = idempotent_function_async(
        data_keyword_argument="order", persistence_store=store
    )(shipping)

    assert await billing_idem(order={"id": 7}) == {"handled_by": "app.billing", "order": {"id": 7}}
    assert await shipping_idem(order={"id": 7}) == {
        "handled_by": "app.shipping",
        "order": {"id": 7},
    }
    assert await billing_idem(order={"id": 7}) == {"handled_by": "app.billing", "order": {"id": 7}}
    assert len(store) == 2


async def test_same_name_in_two_classes_get_different_keys() -> None:
    class Billing:
        @staticmethod
        async def handle(order: Any) -> str:
            return "billing"

    class Shipping:
        @staticmethod
        async def handle(order: Any) -> str:
            return "shipping"

    store = InMemoryPersistenceLayer()
    engine = IdempotencyEngine(store)
    assert engine.idempotency_key({"id": 1}, key_source=Billing.handle) != engine.idempotency_key(
        {"id": 1}, key_source=Shipping.handle
    )
    assert (
        await engine.run_for({"id": 1}, lambda: Billing.handle(1), key_source=Billing.handle)
        == "billing"
    )
    assert (
        await engine.run_for({"id": 1}, lambda: Shipping.handle(1), key_source=Shipping.handle)
        == "shipping"
    )


class _CallableObject:
    async def __call__(self) -> str:
        return "called"


async def _work(tag: str) -> str:
    return tag


@pytest.mark.parametrize(
    "function",
    [lambda: _work("lambda"), functools.partial(_work, "partial"), _CallableObject()],
    ids=["lambda", "partial", "callable-object"],
)
async def test_callables_without_a_stable_name_need_a_key_prefix(function: Any) -> None:
    store = InMemoryPersistenceLayer()
    with pytest.raises(IdempotencyPersistenceConfigError, match="key_prefix"):
        await IdempotencyEngine(store).run({"id": 1}, function)
    assert len(store) == 0
    assert await IdempotencyEngine(store, key_prefix="explicit").run({"id": 1}, function) in {
        "lambda",
        "partial",
        "called",
    }
    record = await store.get(
        IdempotencyEngine(store, key_prefix="explicit").idempotency_key({"id": 1})
    )
    assert record is not None
    assert record.status is RecordStatus.COMPLETED


# -- the caller's payload -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_path", ["", "powertools_json(body)", "[id, nested.items]"], ids=["whole", "json", "multi"]
)
async def test_the_callers_payload_is_never_mutated(key_path: str) -> None:
    generator = PayloadGenerator(seed=99)
    engine = IdempotencyEngine(
        InMemoryPersistenceLayer(),
        IdempotencyConfig(event_key_jmespath=key_path, payload_validation_jmespath="nested"),
        key_prefix="p",
    )
    for _ in range(20):
        nested = {"items": [generator.line(), {"d": Decimal("1.10")}], "when": dt.date(2024, 1, 2)}
        ident = f"id-{generator.rng.getrandbits(64)}"
        payload = {
            "id": ident,
            "body": json.dumps({"id": ident, "a": [1, 2]}),
            "nested": nested,
            "order": generator.order(2),
        }
        snapshot = copy.deepcopy(payload)
        items = nested["items"]

        async def work() -> Any:
            return {"ok": True}

        await engine.run(payload, work)
        await engine.run(payload, work)  # and a replay
        assert payload == snapshot
        assert payload["nested"] is nested
        assert nested["items"] is items

    model = Order(
        order_id=uuid.UUID(int=5), placed=dt.datetime(2024, 1, 1), lines=[], meta={"k": [1]}
    )
    model_snapshot = copy.deepcopy(model)

    async def work_on_model() -> str:
        return "ok"

    await IdempotencyEngine(InMemoryPersistenceLayer(), key_prefix="p").run(model, work_on_model)
    assert model == model_snapshot


def _nested(depth: int) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    inner = payload
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    return payload


@pytest.mark.parametrize("depth", [1_000, 10_000])
@pytest.mark.parametrize(
    "config",
    [
        IdempotencyConfig(),
        IdempotencyConfig(event_key_jmespath="a.a"),
        IdempotencyConfig(event_key_jmespath="a", payload_validation_jmespath="a"),
        IdempotencyConfig(jmespath_options={"custom_functions": PowertoolsFunctions()}),
    ],
)
async def test_a_deeply_nested_payload_is_a_payload_error(
    depth: int, config: IdempotencyConfig
) -> None:
    engine = IdempotencyEngine(InMemoryPersistenceLayer(), config, key_prefix="deep")
    ran: list[int] = []

    async def fn() -> int:
        ran.append(1)
        return 1

    with pytest.raises(IdempotencyPayloadError, match="nested too deeply"):
        await engine.run(_nested(depth), fn)
    assert ran == []
