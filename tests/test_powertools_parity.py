"""The same scenario run against Powertools for AWS Lambda 3.x and against us.

Both sides use one moto server; Powertools' DynamoDB layer and our sync layer each get a
table of their own, and each test asserts the same observable behaviour of both.
"""

from __future__ import annotations

import time
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

from aioidempotency import IdempotencyConfig, idempotent_function
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer
from aioidempotency.exceptions import IdempotencyPersistenceConfigError
from tests.backends.dynamodb import fresh_sync_store
from tests.helpers import FakeLambdaContext
from tests.servers.moto import MotoServer

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
    """Decorate one function with Powertools' and with our `idempotent_function`
    (config built by `build(ConfigClass)`), run `call` on each, and return, for each
    side, its result and the items of the table seen from inside the function."""
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


def in_progress_expiry_ms(items: list[dict[str, Any]], store: SyncDynamoDBPersistenceLayer) -> int:
    """The in-progress expiry (epoch ms) of the one in-progress item among `items`."""
    status = store.attributes.status_attr
    in_progress = [item for item in items if item[status]["S"] == "INPROGRESS"]
    assert len(in_progress) == 1, items
    return int(in_progress[0][store.attributes.in_progress_expiry_attr]["N"])


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
    seen = run_both(table, build, lambda charge: charge(order=ORDER))
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
