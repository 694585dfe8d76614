"""`check()` and table creation of the native sync DynamoDB store (boto3) on moto's
server, with IAM enforced where a test says so: permissions it does not need, one it
does, `raise_on_problem`, and creating a table that exists. The async layer's are in
tests/persistence/test_check.py and tests/persistence/test_dynamodb_store.py."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import boto3
import pytest

from aioidempotency._check import probe_records
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer, create_idempotency_table
from aioidempotency.exceptions import (
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceLayerError,
    IdempotencyStoreCheckError,
)
from tests.backends.dynamodb import new_table_name
from tests.persistence.test_check import iam_enforced
from tests.servers.moto import MotoServer
from tests.sync.persistence.test_dynamodb_store import sync_store

ITEM_ACTIONS = [
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
]


def iam_user(moto_server: MotoServer, actions: list[str]) -> Any:
    """A boto3 session with the keys of a new IAM user allowed `actions`."""
    name = f"sync-{uuid.uuid4().hex[:8]}"
    iam = boto3.client("iam", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
    }
    iam.put_user_policy(UserName=name, PolicyName="idempotency", PolicyDocument=json.dumps(policy))
    return boto3.session.Session(
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
    )


def layer_of(
    moto_server: MotoServer, store: SyncDynamoDBPersistenceLayer, session: Any
) -> SyncDynamoDBPersistenceLayer:
    return SyncDynamoDBPersistenceLayer(
        store.table_name,
        endpoint_url=moto_server.endpoint_url,
        region_name="eu-west-1",
        session=session,
    )


def test_describe_permissions_are_not_needed_to_pass(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    session = iam_user(moto_server, ITEM_ACTIONS)
    with sync_store(moto_server, session=boto3_session) as store:
        layer = layer_of(moto_server, store, session)
        try:
            with iam_enforced():
                report = layer.check(raise_on_problem=True)
        finally:
            layer.close()
    assert report.ok, str(report)
    assert report.facts == (
        ("table", "not checked (DescribeTable refused, and not needed)"),
        ("ttl", "not checked (DescribeTimeToLive refused)"),
        ("probe", "claim, get, renew, release, complete, delete: ok"),
    )


def test_a_missing_iam_permission_is_named_and_raised(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    session = iam_user(
        moto_server,
        ["dynamodb:GetItem", "dynamodb:DescribeTable", "dynamodb:DescribeTimeToLive"],
    )
    with sync_store(moto_server, session=boto3_session) as store:
        layer = layer_of(moto_server, store, session)
        try:
            with iam_enforced():
                report = layer.check()
                with pytest.raises(IdempotencyStoreCheckError) as raised:
                    layer.check(raise_on_problem=True)
                with pytest.raises(IdempotencyPersistenceAccessDeniedError, match="IAM"):
                    layer.claim(probe_records()[0], now=time.time())
                assert layer.get("k") is None  # what it may do still works
        finally:
            layer.close()
    [problem] = report.problems
    assert problem.kind == "permission"
    assert problem.message.startswith(
        f"the credentials may not run dynamodb:PutItem on table {store.table_name!r} during claim: "
    )
    assert raised.value.report is not None
    assert raised.value.report.problems == report.problems
    assert ("probe", "claim, get, renew, release, complete, delete: ok") not in report.facts


def test_creating_a_table_that_exists(moto_server: MotoServer, boto3_session: Any) -> None:
    table = new_table_name()
    client = boto3_session.client("dynamodb", endpoint_url=moto_server.endpoint_url)
    try:
        assert create_idempotency_table(client, table)
        assert not create_idempotency_table(client, table)  # exists: nothing changed
        with pytest.raises(IdempotencyPersistenceLayerError, match="ResourceInUseException"):
            create_idempotency_table(client, table, exist_ok=False)
    finally:
        client.delete_table(TableName=table)
