"""Interop with Powertools for AWS Lambda 3.x on one table: each replays the other's records.

Powertools runs with boto3 against the same moto server and table, in a worker thread
(it blocks). Both sides decorate a function with the same module and qualname, so
their default key prefixes match (``test-func.{module}.charge``), or use a key_prefix.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable
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
    IdempotencyAlreadyInProgressError as PowertoolsInProgressError,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyValidationError as PowertoolsValidationError,
)

from aioidempotency import (
    IdempotencyAlreadyInProgressError,
    IdempotencyConfig,
    IdempotencyValidationError,
    idempotent_function_async,
)
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from tests.backends.dynamodb import fresh_store
from tests.servers.moto import MotoServer

pytestmark = pytest.mark.filterwarnings(
    "ignore:Couldn't determine the remaining time left:UserWarning"  # no Lambda context here
)

ORDER = {"order_id": "o-1", "amount": 42}
KEY_OPTIONS = {"simple": {}, "composite": {"key_attr": "pk", "sort_key_attr": "sk"}}


@pytest.fixture(params=["simple", "composite"])
async def table(
    request: pytest.FixtureRequest, moto_server: MotoServer, aws_session: Any
) -> AsyncIterator[DynamoDBPersistenceLayer]:
    async with fresh_store(moto_server, session=aws_session, **KEY_OPTIONS[request.param]) as s:
        yield s


class Side:
    """One function, decorated by Powertools and by us, recording who executed it."""

    def __init__(
        self,
        store: DynamoDBPersistenceLayer,
        *,
        key_prefix: str | None = None,
        validation: bool = False,
        body: Callable[[], None] | None = None,
    ) -> None:
        self.executions: list[str] = []
        event_key = "order_id" if validation else ""
        validate = "amount" if validation else ""
        key_options = KEY_OPTIONS["composite" if store.sort_key_attr else "simple"]
        powertools_store = PowertoolsDynamoDB(
            table_name=store.table_name,
            boto3_client=boto3.client("dynamodb", endpoint_url=store.endpoint_url),
            **key_options,
        )

        def charge(order: dict[str, Any]) -> dict[str, Any]:
            self.executions.append("powertools")
            if body is not None:
                body()
            return {"charged": order["amount"], "by": "powertools"}

        async def charge_async(order: dict[str, Any]) -> dict[str, Any]:
            self.executions.append("aioidempotency")
            return {"charged": order["amount"], "by": "aioidempotency"}

        charge.__qualname__ = charge_async.__qualname__ = "charge"
        self.powertools = pt_idempotent(
            data_keyword_argument="order",
            persistence_store=powertools_store,
            config=PowertoolsConfig(
                event_key_jmespath=event_key, payload_validation_jmespath=validate
            ),
            key_prefix=key_prefix,
        )(charge)
        self.ours = idempotent_function_async(
            data_keyword_argument="order",
            persistence_store=store,
            config=IdempotencyConfig(
                event_key_jmespath=event_key, payload_validation_jmespath=validate
            ),
            key_prefix=key_prefix,
        )(charge_async)

    async def call_powertools(self, order: dict[str, Any]) -> Any:
        return await asyncio.wait_for(asyncio.to_thread(self.powertools, order=order), 30)


@pytest.mark.parametrize("key_prefix", [None, "orders"])
async def test_we_replay_a_record_powertools_completed(
    table: DynamoDBPersistenceLayer, key_prefix: str | None
) -> None:
    side = Side(table, key_prefix=key_prefix)
    expected = {"charged": 42, "by": "powertools"}
    assert await side.call_powertools(ORDER) == expected
    assert await side.ours(order=ORDER) == expected
    assert side.executions == ["powertools"]


@pytest.mark.parametrize("key_prefix", [None, "orders"])
async def test_powertools_replays_a_record_we_completed(
    table: DynamoDBPersistenceLayer, key_prefix: str | None
) -> None:
    side = Side(table, key_prefix=key_prefix)
    expected = {"charged": 42, "by": "aioidempotency"}
    assert await side.ours(order=ORDER) == expected
    assert await side.call_powertools(ORDER) == expected
    assert side.executions == ["aioidempotency"]


async def test_validation_hashes_agree_both_ways(table: DynamoDBPersistenceLayer) -> None:
    side = Side(table, validation=True)
    assert (await side.call_powertools(ORDER))["by"] == "powertools"
    assert (await side.ours(order=ORDER))["by"] == "powertools"
    with pytest.raises(IdempotencyValidationError):
        await side.ours(order={**ORDER, "amount": 43})
    other = {"order_id": "o-2", "amount": 7}
    assert (await side.ours(order=other))["by"] == "aioidempotency"
    assert (await side.call_powertools(other))["by"] == "aioidempotency"
    with pytest.raises(PowertoolsValidationError):
        await side.call_powertools({**other, "amount": 8})
    assert side.executions == ["powertools", "aioidempotency"]


async def test_each_refuses_a_key_the_other_holds(table: DynamoDBPersistenceLayer) -> None:
    started, finish = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        assert finish.wait(30)

    side = Side(table, body=hold)
    powertools_call = asyncio.create_task(side.call_powertools(ORDER))
    try:
        assert await asyncio.to_thread(started.wait, 30)
        with pytest.raises(IdempotencyAlreadyInProgressError):
            await side.ours(order=ORDER)  # a Powertools claim: no owner, no lease
    finally:
        finish.set()
    assert (await powertools_call)["by"] == "powertools"

    ours_started, ours_finish = asyncio.Event(), asyncio.Event()

    @idempotent_function_async(data_keyword_argument="order", persistence_store=table)
    async def slow(order: dict[str, Any]) -> str:
        ours_started.set()
        await asyncio.wait_for(ours_finish.wait(), 30)
        return "ours"

    def powertools_slow(order: dict[str, Any]) -> str:
        return "powertools"

    powertools_slow.__qualname__ = inspect.unwrap(slow).__qualname__
    powertools_store = PowertoolsDynamoDB(
        table_name=table.table_name,
        boto3_client=boto3.client("dynamodb", endpoint_url=table.endpoint_url),
        **KEY_OPTIONS["composite" if table.sort_key_attr else "simple"],
    )
    powertools_slow = pt_idempotent(
        data_keyword_argument="order", persistence_store=powertools_store
    )(powertools_slow)
    our_call = asyncio.create_task(slow(order=ORDER))
    try:
        await asyncio.wait_for(ours_started.wait(), 30)
        with pytest.raises(PowertoolsInProgressError):
            await asyncio.wait_for(asyncio.to_thread(powertools_slow, order=ORDER), 30)
    finally:
        ours_finish.set()
    assert await our_call == "ours"
    assert await asyncio.wait_for(asyncio.to_thread(powertools_slow, order=ORDER), 30) == "ours"
