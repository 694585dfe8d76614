"""The same scenario run against Powertools for AWS Lambda 3.x and against us.

Both sides use one moto server; Powertools' DynamoDB layer and our sync layer each get a
table of their own, and each test asserts the same observable behaviour of both.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer as PowertoolsDynamoDB,
)
from aws_lambda_powertools.utilities.idempotency import (
    IdempotencyConfig as PowertoolsConfig,
)
from aws_lambda_powertools.utilities.idempotency import idempotent_function as pt_idempotent
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyInvalidStatusError as PowertoolsInvalidStatusError,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyItemAlreadyExistsError as PowertoolsItemAlreadyExistsError,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyPersistenceLayerError as PowertoolsPersistenceLayerError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import (
    DataRecord as PowertoolsRecord,
)
from aws_lambda_powertools.warnings import PowertoolsUserWarning

from aioidempotency import (
    DataRecord,
    IdempotencyConfig,
    IdempotencyDisabledWarning,
    IdempotencyEngine,
    IdempotentHookFunction,
    InMemoryPersistenceLayer,
    RecordStatus,
    idempotent_function,
    idempotent_function_async,
)
from aioidempotency._cli import usable_hash_functions as cli_hash_functions
from aioidempotency._config import usable_hash_functions
from aioidempotency._errors import store_error
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer
from aioidempotency.exceptions import (
    IdempotencyCompletionError,
    IdempotencyInvalidRecordError,
    IdempotencyInvalidStatusError,
    IdempotencyKeyError,
    IdempotencyPayloadError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from aioidempotency.persistence import ClaimResult, PowertoolsStoreAdapter
from tests.backends.dynamodb import fresh_sync_store
from tests.helpers import FakeLambdaContext
from tests.servers.moto import MotoServer

pytestmark = pytest.mark.filterwarnings(
    "ignore:Couldn't determine the remaining time left:UserWarning"  # Powertools, no context
)

ORDER = {"order_id": "o-1", "amount": 42}
KEY_OPTIONS: dict[str, dict[str, Any]] = {
    "simple": {},
    "composite": {"key_attr": "pk", "sort_key_attr": "sk"},
}


@pytest.fixture(params=["simple", "composite"])
def table(
    request: pytest.FixtureRequest, moto_server: MotoServer, boto3_session: Any
) -> Iterator[SyncDynamoDBPersistenceLayer]:
    """Our sync layer on a new table; `powertools_twin` builds Powertools' layer on it."""
    options = KEY_OPTIONS[request.param]
    with fresh_sync_store(moto_server, boto3_session=boto3_session, **options) as store:
        yield store


def powertools_twin(store: SyncDynamoDBPersistenceLayer) -> PowertoolsDynamoDB:
    """Powertools' layer on the same table and key layout as `store`."""
    return PowertoolsDynamoDB(
        table_name=store.table_name,
        boto3_client=boto3.client("dynamodb", endpoint_url=store.endpoint_url),
        **KEY_OPTIONS["composite" if store.sort_key_attr else "simple"],
    )


def stored_items(store: SyncDynamoDBPersistenceLayer) -> list[dict[str, Any]]:
    """Every item of the table, as DynamoDB's typed attribute maps."""
    items: list[dict[str, Any]] = store.client().scan(TableName=store.table_name)["Items"]
    return items


def run_both(
    store: SyncDynamoDBPersistenceLayer,
    build: Callable[[type[Any]], Any],
    call: Callable[[Callable[..., Any]], Any],
) -> dict[str, tuple[Any, list[dict[str, Any]]]]:
    """Decorate one function with Powertools' and with our `idempotent_function`, in that
    order (config built by `build(ConfigClass)`), run `call` on each, and return, for
    each side, its result and the items of the table seen from inside the function."""
    return {
        "powertools": run_one(
            store, pt_idempotent, build(PowertoolsConfig), powertools_twin(store), call
        ),
        "ours": run_one(store, idempotent_function, build(IdempotencyConfig), store, call),
    }


def run_one(
    store: SyncDynamoDBPersistenceLayer,
    decorate: Any,
    config: Any,
    layer: Any,
    call: Callable[[Callable[..., Any]], Any],
) -> tuple[Any, list[dict[str, Any]]]:
    """One side of `run_both`."""
    inside: list[list[dict[str, Any]]] = []

    def charge(order: dict[str, Any]) -> dict[str, Any]:
        inside.append(stored_items(store))
        return {"charged": order["amount"]}

    charge.__qualname__ = f"charge_{type(config).__module__.split('.')[0]}"
    wrapped = decorate(data_keyword_argument="order", persistence_store=layer, config=config)
    result = call(wrapped(charge))
    assert len(inside) == 1, inside
    return result, inside[0]


def in_progress_item(
    items: list[dict[str, Any]], store: SyncDynamoDBPersistenceLayer
) -> dict[str, Any]:
    """The one in-progress item among `items`."""
    status = store.attributes.status_attr
    in_progress = [item for item in items if item[status]["S"] == "INPROGRESS"]
    assert len(in_progress) == 1, items
    return in_progress[0]


def in_progress_expiry_ms(items: list[dict[str, Any]], store: SyncDynamoDBPersistenceLayer) -> int:
    """The in-progress expiry (epoch ms) of the one in-progress item among `items`."""
    item = in_progress_item(items, store)
    return int(item[store.attributes.in_progress_expiry_attr]["N"])


# -- IdempotencyConfig(lambda_context=...) ---------------------------------------------


def test_config_lambda_context_bounds_the_claim_on_both_sides(
    table: SyncDynamoDBPersistenceLayer,
) -> None:
    context = FakeLambdaContext(remaining_ms=5_000)
    before_ms = int(time.time() * 1000)
    seen = run_both(
        table,
        lambda config: config(lambda_context=context),
        lambda charge: charge(order=ORDER),
    )
    after_ms = int(time.time() * 1000)
    for side, (result, items) in seen.items():
        assert result == {"charged": 42}, side
        expiry_ms = in_progress_expiry_ms(items, table)
        assert before_ms + 5_000 <= expiry_ms <= after_ms + 5_000, side


def test_registered_context_replaces_the_configs_on_both_sides(
    table: SyncDynamoDBPersistenceLayer,
) -> None:
    def build(config_class: type[Any]) -> Any:
        config = config_class(lambda_context=FakeLambdaContext(remaining_ms=5_000))
        config.register_lambda_context(FakeLambdaContext(remaining_ms=900_000))
        return config

    before_ms = int(time.time() * 1000)
    # In a copy of this thread's context: the registered context must not outlive the
    # test (later tests of this thread would run with it).
    seen = contextvars.copy_context().run(
        run_both, table, build, lambda charge: charge(order=ORDER)
    )
    after_ms = int(time.time() * 1000)
    for side, (_, items) in seen.items():
        expiry_ms = in_progress_expiry_ms(items, table)
        assert before_ms + 900_000 <= expiry_ms <= after_ms + 900_000, side


def test_config_lambda_context_is_keyword_only_and_kept_out_of_equality() -> None:
    context = FakeLambdaContext()
    config = IdempotencyConfig(event_key_jmespath="id", lambda_context=context)
    assert config.lambda_context is context
    assert config == IdempotencyConfig(event_key_jmespath="id")
    assert "lambda_context" not in repr(config)
    with pytest.raises(AttributeError):
        config.lambda_context = None  # type: ignore[misc]


def test_config_refuses_a_lambda_context_without_remaining_time() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match="get_remaining_time_in_millis"):
        IdempotencyConfig(lambda_context=object())  # type: ignore[arg-type]


# -- DataRecord in response hooks --------------------------------------------------------


def test_response_hook_sees_the_same_record_on_both_sides(
    table: SyncDynamoDBPersistenceLayer,
) -> None:
    seen: dict[str, dict[str, Any]] = {}

    def hook_for(side: str) -> IdempotentHookFunction:
        def hook(response: Any, idempotent_data: Any) -> Any:
            seen[side] = {
                "status": idempotent_data.status,
                "sort_key": idempotent_data.sort_key,
                "expires": idempotent_data.get_expiration_datetime(),
                "as_dict": idempotent_data.response_json_as_dict(),
            }
            return {**response, "replayed": True}

        return hook

    before = datetime.datetime.fromtimestamp(int(time.time()) + 3600)
    results = run_both(
        table,
        lambda config: config(
            response_hook=hook_for("powertools" if config is PowertoolsConfig else "ours")
        ),
        lambda charge: (charge(order=ORDER), charge(order=ORDER)),
    )
    after = datetime.datetime.fromtimestamp(int(time.time()) + 3600)
    for side in ("powertools", "ours"):
        (first, replayed), items = results[side]
        assert first == {"charged": 42}, side
        assert replayed == {"charged": 42, "replayed": True}, side
        record = seen[side]
        assert record["status"] == "COMPLETED", side
        assert record["as_dict"] == {"charged": 42}, side
        assert before <= record["expires"] <= after, side
        assert record["expires"].tzinfo is None, side
        if table.sort_key_attr is None:
            assert record["sort_key"] is None, side
        else:
            stored_key = in_progress_item(items, table)[table.sort_key_attr]["S"]
            assert record["sort_key"] == stored_key, side


@pytest.mark.parametrize(
    ("response_data", "expected"),
    [('{"a": [1, 2]}', {"a": [1, 2]}), ("", None), (None, None)],
)
def test_response_json_as_dict_as_powertools(response_data: str | None, expected: Any) -> None:
    ours = DataRecord("k", RecordStatus.COMPLETED, 1_700_000_000, response_data=response_data)
    theirs = PowertoolsRecord("k", "COMPLETED", 1_700_000_000, response_data=response_data or "")
    assert ours.response_json_as_dict() == theirs.response_json_as_dict() == expected


@pytest.mark.parametrize("expiry", [0, 1, 1_700_000_000, 4_102_444_800])
def test_get_expiration_datetime_as_powertools(expiry: int) -> None:
    ours = DataRecord("k", RecordStatus.COMPLETED, expiry)
    theirs = PowertoolsRecord("k", "COMPLETED", expiry)
    assert ours.get_expiration_datetime() == theirs.get_expiration_datetime()
    assert (ours.get_expiration_datetime() is None) == (expiry == 0)


def test_sort_key_is_not_part_of_a_records_equality() -> None:
    record = DataRecord("k", RecordStatus.COMPLETED, 1)
    assert record.sort_key is None
    assert record == DataRecord("k", RecordStatus.COMPLETED, 1, sort_key="k")


def test_a_hook_typed_for_powertools_is_an_idempotent_hook_function() -> None:
    def powertools_style(response: Any, idempotent_data: DataRecord) -> Any:
        return response

    def other_names(result: Any, record: DataRecord) -> Any:
        return result

    hooks: list[IdempotentHookFunction] = [powertools_style, other_names]
    config = IdempotencyConfig(response_hook=hooks[0])
    assert config.response_hook is powertools_style


# -- the disabled-idempotency warning ------------------------------------------------


def test_disabled_warning_is_caught_by_the_filter_that_catches_powertools(
    table: SyncDynamoDBPersistenceLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_IDEMPOTENCY_DISABLED", "true")
    caught: list[list[type[Warning]]] = []

    def call(charge: Callable[..., Any]) -> Any:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            result = charge(order=ORDER)
        disabled = [w for w in got if "development environments" in str(w.message)]
        caught.append([w.category for w in disabled])
        for warning in disabled:  # the filter its docstring gives catches each side's
            with warnings.catch_warnings(record=True) as filtered:
                warnings.simplefilter("always")
                warnings.filterwarnings("ignore", "Disabling idempotency", UserWarning)
                warnings.warn(str(warning.message), warning.category, stacklevel=1)
            assert filtered == []
        return result

    seen = run_both(table, lambda config: config(), call)
    assert {side: result for side, (result, _) in seen.items()} == {
        "powertools": {"charged": 42},
        "ours": {"charged": 42},
    }
    assert caught == [[PowertoolsUserWarning], [IdempotencyDisabledWarning]]  # in run order
    assert stored_items(table) == []  # neither side touched the table


def test_importing_the_package_does_not_import_powertools() -> None:
    code = textwrap.dedent(
        """
        import sys
        import aioidempotency
        from aioidempotency.persistence import PowertoolsStoreAdapter
        print(aioidempotency.IdempotencyDisabledWarning.__mro__[1].__name__)
        print(sorted(name for name in sys.modules if name.startswith("aws_lambda_powertools")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["UserWarning", "[]"]


# -- hash_function ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shake_128", "shake_256"])
def test_a_hash_needing_a_length_fails_powertools_at_the_call_and_us_at_construction(
    table: SyncDynamoDBPersistenceLayer, name: str
) -> None:
    powertools = pt_idempotent(
        data_keyword_argument="order",
        persistence_store=powertools_twin(table),
        config=PowertoolsConfig(hash_function=name),  # accepted
    )(lambda order: order)
    with pytest.raises(PowertoolsPersistenceLayerError, match=r"hexdigest\(\) missing"):
        powertools(order=ORDER)  # only at the call: hexdigest() needs a length
    with pytest.raises(IdempotencyPersistenceConfigError) as caught:
        IdempotencyConfig(hash_function=name)
    message = str(caught.value)
    assert f"hash_function {name!r} cannot be used: its digest needs a length" in message
    assert str(usable_hash_functions()) in message
    assert stored_items(table) == []


@pytest.mark.parametrize("name", ["crc32", "SHA256 ", ""])
def test_a_name_hashlib_does_not_offer_is_refused_with_the_usable_ones(name: str) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError) as caught:
        IdempotencyConfig(hash_function=name)
    assert str(caught.value) == (
        f"unknown hash_function {name!r}; choose one of {usable_hash_functions()}"
    )


def test_config_and_cli_share_one_list_of_usable_hash_functions() -> None:
    usable = usable_hash_functions()
    assert cli_hash_functions is usable_hash_functions
    assert {"md5", "sha256"} <= set(usable)
    assert not any(name.startswith("shake_") for name in usable)
    for name in usable:
        assert IdempotencyConfig(hash_function=name).hash_function == name
    usable.append("mutated")  # each call returns a new list
    assert "mutated" not in usable_hash_functions()


# -- error messages --------------------------------------------------------------------


class FailingCompletion(InMemoryPersistenceLayer):
    """Fault injection: the first completion fails as a dropped connection would."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection reset by peer")
        await super().complete(record, owner=owner)


async def test_a_failed_completion_has_powertools_message_and_our_details(
    table: SyncDynamoDBPersistenceLayer,
) -> None:
    class PowertoolsFailingCompletion(PowertoolsDynamoDB):
        def _update_record(self, data_record: PowertoolsRecord) -> None:
            raise ConnectionError("connection reset by peer")

    layer = PowertoolsFailingCompletion(
        table_name=table.table_name,
        boto3_client=boto3.client("dynamodb", endpoint_url=table.endpoint_url),
        **KEY_OPTIONS["composite" if table.sort_key_attr else "simple"],
    )
    powertools = pt_idempotent(
        data_keyword_argument="order", persistence_store=layer, config=PowertoolsConfig()
    )(lambda order: {"charged": order["amount"]})
    with pytest.raises(PowertoolsPersistenceLayerError) as theirs:
        powertools(order=ORDER)

    engine = IdempotencyEngine(FailingCompletion(), key_prefix="orders")

    async def charge() -> dict[str, int]:
        return {"charged": 42}

    with pytest.raises(IdempotencyCompletionError) as ours:
        await engine.run(ORDER, charge)
    assert await engine.drain(10)  # the background completion lands

    expected = "Failed to update record state to success in idempotency store"
    assert ours.value.args[0] == theirs.value.args[0] == expected
    assert str(ours.value) == str(theirs.value) == f"{expected} - (connection reset by peer)"
    assert isinstance(ours.value, IdempotencyPersistenceLayerError)
    assert isinstance(ours.value.__cause__, ConnectionError)
    assert isinstance(theirs.value.__cause__, ConnectionError)
    assert ours.value.result == {"charged": 42}  # our detail: the function's result
    assert await engine.run(ORDER, charge) == {"charged": 42}  # stored in the background


class FailingStore(InMemoryPersistenceLayer):
    """Fault injection: the named operations fail once as a dropped connection would; a
    claim can also be refused by an in-progress record, so the engine reads the key."""

    def __init__(self, *failing: str, refuse_claim: bool = False) -> None:
        super().__init__()
        self.failing = set(failing)
        self.refuse_claim = refuse_claim

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self.fail_once("claim")
        if self.refuse_claim:
            return ClaimResult(claimed=False, existing=dataclasses.replace(record, owner="other"))
        return await super().claim(record, now=now)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        self.fail_once("get")
        return await super().get(key, now=now)

    async def release(self, key: str, *, owner: str) -> None:
        self.fail_once("release")
        await super().release(key, owner=owner)

    def fail_once(self, operation: str) -> None:
        if operation in self.failing:
            self.failing.discard(operation)
            raise ConnectionError("connection reset by peer")


class PowertoolsFailing(PowertoolsDynamoDB):
    """Powertools' DynamoDB layer whose named operations fail as a dropped connection
    would; a put can be refused as if the key were taken (no old record returned)."""

    failing: frozenset[str] = frozenset()
    refuse_put = False

    def _put_record(self, data_record: PowertoolsRecord) -> None:
        if "claim" in self.failing:
            raise ConnectionError("connection reset by peer")
        if self.refuse_put:
            raise PowertoolsItemAlreadyExistsError()
        super()._put_record(data_record)

    def _get_record(self, idempotency_key: str) -> PowertoolsRecord:
        if "get" in self.failing:
            raise ConnectionError("connection reset by peer")
        return super()._get_record(idempotency_key)

    def _delete_record(self, data_record: PowertoolsRecord) -> None:
        if "release" in self.failing:
            raise ConnectionError("connection reset by peer")
        super()._delete_record(data_record)


class Declined(Exception):
    """The function's own failure."""


@pytest.mark.parametrize(
    ("failing", "expected"),
    [
        ("claim", "Failed to save in progress record to idempotency store"),
        ("get", "Failed to get record from idempotency store"),
        ("release", "Failed to delete record from idempotency store"),
    ],
)
async def test_a_store_failure_has_powertools_message_as_args0(
    table: SyncDynamoDBPersistenceLayer, failing: str, expected: str
) -> None:
    layer = PowertoolsFailing(
        table_name=table.table_name,
        boto3_client=boto3.client("dynamodb", endpoint_url=table.endpoint_url),
        **KEY_OPTIONS["composite" if table.sort_key_attr else "simple"],
    )
    layer.failing = frozenset({failing})
    layer.refuse_put = failing == "get"

    def pt_decline(order: dict[str, Any]) -> None:
        raise Declined(order["order_id"])

    powertools = pt_idempotent(
        data_keyword_argument="order", persistence_store=layer, config=PowertoolsConfig()
    )(pt_decline)
    with pytest.raises(PowertoolsPersistenceLayerError) as theirs:
        powertools(order=ORDER)

    store = FailingStore(failing, refuse_claim=failing == "get")
    # Waiting makes the engine read the key it found in progress (Powertools reads it
    # after every refused put).
    engine = IdempotencyEngine(
        store,
        key_prefix="orders",
        config=IdempotencyConfig(wait_for_in_progress_seconds=5, wait_poll_interval_seconds=0.01),
    )

    async def decline() -> None:
        raise Declined(ORDER["order_id"])

    with pytest.raises(IdempotencyPersistenceLayerError) as ours:
        await engine.run(ORDER, decline)
    assert await engine.drain(10)

    assert ours.value.args[0] == theirs.value.args[0] == expected
    assert str(ours.value) == str(theirs.value) == f"{expected} - (connection reset by peer)"
    assert isinstance(ours.value.__cause__, ConnectionError)
    assert isinstance(theirs.value.__cause__, ConnectionError)
    assert ours.value.transient is True  # our detail: a retry can succeed


async def test_a_classified_store_error_keeps_its_class_under_powertools_message() -> None:
    class Unreachable(InMemoryPersistenceLayer):
        async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
            raise IdempotencyPersistenceConnectionError(
                "Redis at 127.0.0.1:1 unreachable", ConnectionRefusedError("refused")
            )

    engine = IdempotencyEngine(Unreachable(), key_prefix="orders")

    async def charge() -> int:
        return 1

    with pytest.raises(IdempotencyPersistenceConnectionError) as ours:
        await engine.run(ORDER, charge)
    assert ours.value.args[0] == "Failed to save in progress record to idempotency store"
    assert ours.value.transient is True
    store_error = ours.value.__cause__
    assert isinstance(store_error, IdempotencyPersistenceConnectionError)
    assert str(ours.value) == (
        "Failed to save in progress record to idempotency store - "
        "(Redis at 127.0.0.1:1 unreachable - (refused))"
    )
    assert await engine.drain(10)


def key_of(payload: Any, config: IdempotencyConfig) -> str:
    """Our key for `payload` with ``key_prefix="orders"`` (Powertools' is the same)."""
    engine = IdempotencyEngine(InMemoryPersistenceLayer(), key_prefix="orders", config=config)
    return engine.idempotency_key(payload)


def refusal_inside(decorate: Any, layer: Any, config: Any) -> BaseException:
    """The error a call gets when it runs again inside its own first call (keyed by
    ``key_prefix="orders"`` and the order id on both sides)."""
    caught: list[BaseException] = []

    def charge(order: dict[str, Any]) -> dict[str, Any]:
        try:
            wrapped(order=order)
        except Exception as exc:
            caught.append(exc)
        return {"charged": order["amount"]}

    wrapped = decorate(
        data_keyword_argument="order", persistence_store=layer, config=config, key_prefix="orders"
    )(charge)
    assert wrapped(order=ORDER) == {"charged": 42}
    [error] = caught
    return error


def test_in_progress_has_powertools_message_on_both_table_layouts(
    table: SyncDynamoDBPersistenceLayer,
) -> None:
    theirs = refusal_inside(
        pt_idempotent, powertools_twin(table), PowertoolsConfig(event_key_jmespath="order_id")
    )
    for item in stored_items(table):  # the next side starts from an empty table
        item_key = {name: item[name] for name in (table.key_attr, table.sort_key_attr) if name}
        table.client().delete_item(TableName=table.table_name, Key=item_key)
    ours = refusal_inside(
        idempotent_function, table, IdempotencyConfig(event_key_jmespath="order_id")
    )

    assert type(theirs).__name__ == type(ours).__name__ == "IdempotencyAlreadyInProgressError"
    key = key_of(ORDER, IdempotencyConfig(event_key_jmespath="order_id"))
    if table.sort_key_attr is None:
        expected = f"Execution already in progress with idempotency key: order_id={key}"
    else:
        expected = (
            "Execution already in progress with idempotency key: "
            f"order_id={table.static_pk_value} and sort key: {key}"
        )
    assert ours.args[0] == theirs.args[0] == expected
    assert str(ours) == str(theirs)


def test_an_unknown_stored_status_fails_as_in_powertools(
    table: SyncDynamoDBPersistenceLayer,
) -> None:
    config = IdempotencyConfig()
    key = key_of(ORDER, config)
    item_key = (
        {table.key_attr: {"S": key}}
        if table.sort_key_attr is None
        else {table.key_attr: {"S": table.static_pk_value}, table.sort_key_attr: {"S": key}}
    )
    table.client().put_item(
        TableName=table.table_name,
        Item={
            **item_key,
            table.attributes.status_attr: {"S": "BOGUS"},
            table.attributes.expiry_attr: {"N": str(int(time.time()) + 3600)},
        },
    )

    def charge(order: dict[str, Any]) -> int:
        return 1

    powertools = pt_idempotent(
        data_keyword_argument="order",
        persistence_store=powertools_twin(table),
        config=PowertoolsConfig(),
        key_prefix="orders",
    )(charge)
    with pytest.raises(PowertoolsPersistenceLayerError) as theirs:
        powertools(order=ORDER)
    ours_fn = idempotent_function(
        data_keyword_argument="order", persistence_store=table, config=config, key_prefix="orders"
    )(charge)
    with pytest.raises(IdempotencyPersistenceLayerError) as ours:
        ours_fn(order=ORDER)

    expected = "Failed to save in progress record to idempotency store"
    assert ours.value.args[0] == theirs.value.args[0] == expected
    assert isinstance(theirs.value.__cause__, PowertoolsInvalidStatusError)
    assert isinstance(ours.value.__cause__, IdempotencyInvalidStatusError)
    assert str(theirs.value) == f"{expected} - (BOGUS)"
    # Ours names what is wrong and how to free the key: a subclass with the key.
    assert isinstance(ours.value, IdempotencyInvalidRecordError)
    assert ours.value.key == key
    assert "'BOGUS'" in str(ours.value)
    assert ours.value.fix is not None
    assert ours.value.fix in str(ours.value)
    assert len(stored_items(table)) == 1  # neither side overwrote it


# -- JMESPath evaluation errors ----------------------------------------------------------


@pytest.mark.parametrize("option", ["event_key_jmespath", "payload_validation_jmespath"])
def test_a_jmespath_error_is_a_store_error_in_powertools_and_a_payload_error_here(
    table: SyncDynamoDBPersistenceLayer, option: str
) -> None:
    order = {"body": "not JSON", "order_id": "o-1"}
    options: dict[str, Any] = {option: "powertools_json(body).order_id"}

    def charge(order: dict[str, Any]) -> int:
        return 1

    powertools = pt_idempotent(
        data_keyword_argument="order",
        persistence_store=powertools_twin(table),
        config=PowertoolsConfig(**options),
    )(charge)
    with pytest.raises(PowertoolsPersistenceLayerError) as theirs:
        powertools(order=order)
    ours_fn = idempotent_function(
        data_keyword_argument="order", persistence_store=table, config=IdempotencyConfig(**options)
    )(charge)
    with pytest.raises(IdempotencyPayloadError) as ours:
        ours_fn(order=order)

    # Powertools evaluates the expression inside its claim, so the failure reads as the
    # store's; ours fails before any I/O, as a payload error (docs/getting-started.md).
    assert theirs.value.args[0] == "Failed to save in progress record to idempotency store"
    assert isinstance(theirs.value.__cause__, ValueError)  # json.JSONDecodeError
    assert isinstance(ours.value, IdempotencyKeyError)
    assert not isinstance(ours.value, IdempotencyPersistenceLayerError)
    assert isinstance(ours.value.__cause__, ValueError)
    assert f"{option}='powertools_json(body).order_id'" in str(ours.value)
    assert stored_items(table) == []  # neither side wrote a record


# -- layers written for Powertools -----------------------------------------------------


async def test_one_powertools_layer_serves_powertools_and_our_engines_alike(
    table: SyncDynamoDBPersistenceLayer,
) -> None:
    """Powertools' decorator and our engines (through `PowertoolsStoreAdapter`) on one
    Powertools layer instance: each replays what the other stored."""
    layer = powertools_twin(table)
    adapter = PowertoolsStoreAdapter(layer)
    runs: list[str] = []

    def charge(order: dict[str, Any]) -> dict[str, Any]:
        runs.append(order["order_id"])
        return {"charged": order["amount"]}

    async def charge_async(order: dict[str, Any]) -> dict[str, Any]:
        return charge(order)

    options: dict[str, Any] = {"data_keyword_argument": "order", "key_prefix": "orders"}
    theirs = pt_idempotent(persistence_store=layer, config=PowertoolsConfig(), **options)(charge)
    config = IdempotencyConfig(in_progress_lease_seconds=None)
    ours_sync = idempotent_function(persistence_store=adapter, config=config, **options)(charge)
    ours_async = idempotent_function_async(persistence_store=adapter, config=config, **options)(
        charge_async
    )

    assert theirs(order=ORDER) == {"charged": 42}
    assert ours_sync(order=ORDER) == {"charged": 42}
    assert await ours_async(order=ORDER) == {"charged": 42}
    other = {"order_id": "o-2", "amount": 7}
    assert await ours_async(order=other) == {"charged": 7}
    assert theirs(order=other) == {"charged": 7}
    assert ours_sync(order=other) == {"charged": 7}
    assert runs == ["o-1", "o-2"]
    assert len(stored_items(table)) == 2


def test_a_store_errors_own_class_is_kept_whatever_its_constructor_takes() -> None:
    class Down(IdempotencyPersistenceConnectionError):
        def __init__(self, host: str, port: int) -> None:
            super().__init__(f"{host}:{port} is down")
            self.host = host

    down = Down("db", 5432)
    mapped = store_error("Failed to save in progress record to idempotency store", "k", down)
    assert type(mapped) is Down
    assert mapped.args == ("Failed to save in progress record to idempotency store", down)
    assert mapped.host == "db"
    assert mapped.transient is True
    assert (
        str(mapped) == "Failed to save in progress record to idempotency store - (db:5432 is down)"
    )


def test_a_store_error_is_wrapped_once_and_an_unkeyed_invalid_record_names_no_fix() -> None:
    message = "Failed to get record from idempotency store"
    said = IdempotencyPersistenceConnectionError(message, ConnectionError("reset"))
    assert store_error(message, "k", said) is said  # already Powertools' text
    unkeyed = IdempotencyInvalidRecordError(message, "bad")
    assert unkeyed.fix is None
    assert str(unkeyed) == f"{message} - (bad)"
