"""`check()` of a DynamoDB layer whose ``DescribeTimeToLive`` fails, not with a refusal
(which the check notes and passes), but with throttling: the check reports it and stops
before the probe. The fault is injected into the client the layer is given (botocore's
``before-call`` event: no request is sent), in both worlds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._check import StoreCheckReport
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer
from tests.backends.dynamodb import fresh_store, inject_error
from tests.servers.moto import MotoServer

BOUND = 60.0


@pytest.mark.parametrize("world", ["async", "sync"])
async def test_a_throttled_describe_time_to_live_is_a_problem_and_stops_the_check(
    moto_server: MotoServer, aws_session: Any, boto3_session: Any, world: str
) -> None:
    async with fresh_store(moto_server, session=aws_session) as store:
        table = store.table_name
        if world == "async":
            async with aws_session.create_client(
                "dynamodb", endpoint_url=moto_server.endpoint_url
            ) as client:
                inject_error(client, "DescribeTimeToLive", "ThrottlingException")
                layer = DynamoDBPersistenceLayer(table, client=client)
                report = await asyncio.wait_for(layer.check(), BOUND)
        else:
            client = boto3_session.client("dynamodb", endpoint_url=moto_server.endpoint_url)
            inject_error(client, "DescribeTimeToLive", "ThrottlingException")

            def in_a_thread() -> StoreCheckReport:
                return SyncDynamoDBPersistenceLayer(table, client=client).check()

            report = await asyncio.wait_for(asyncio.to_thread(in_a_thread), BOUND)
    [problem] = report.problems
    assert problem.kind == "store-error"
    assert problem.message.startswith(f"table {table!r} in region eu-west-1 failed during ")
    assert "DescribeTimeToLive" in problem.message
    assert problem.message.endswith("injected ThrottlingException")
    assert [name for name, _ in report.facts] == ["table"]  # no TTL fact, no probe
