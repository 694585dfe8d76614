"""The boto3 client a sync DynamoDB layer opens, on moto's server: the options of an
aiobotocore `AioConfig` given as `boto_config`, an aioboto3 session refused saying what
to pass, and botocore alone when boto3 is not installed."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest
from aiobotocore.config import AioConfig

from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._sync.dynamodb import DEFAULT_MAX_ATTEMPTS, SyncDynamoDBPersistenceLayer
from aioidempotency.exceptions import IdempotencyPersistenceConfigError
from tests.backends.dynamodb import new_table_name
from tests.servers.moto import MotoServer


def claim_record(key: str) -> DataRecord:
    now = time.time()
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(now) + 600,
        in_progress_expiry_timestamp=int(now * 1000) + 60_000,
        owner="o" * 32,
    )


def round_trip(layer: SyncDynamoDBPersistenceLayer) -> None:
    """Create the layer's table, claim a key and read it back, then drop the table."""
    assert layer.create_table(exist_ok=False)
    try:
        assert layer.claim(claim_record("fn#k"), now=time.time()).claimed
        stored = layer.get("fn#k")
        assert stored is not None
        assert stored.owner == "o" * 32
    finally:
        layer.client().delete_table(TableName=layer.table_name)
        layer.close()


def test_an_aiobotocore_config_gives_the_sync_client_its_options(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    given = AioConfig(connect_timeout=3, read_timeout=4, retries={"total_max_attempts": 2})
    layer = SyncDynamoDBPersistenceLayer(
        new_table_name(),
        endpoint_url=moto_server.endpoint_url,
        boto3_session=boto3_session,
        boto_config=given,
    )
    config = layer.client().meta.config
    assert (config.connect_timeout, config.read_timeout) == (3, 4)
    assert config.retries["total_max_attempts"] == 2
    assert not isinstance(config, AioConfig)  # its aiohttp options mean nothing to boto3
    round_trip(layer)


def test_an_aioboto3_session_is_refused_saying_what_to_pass(
    moto_server: MotoServer, aws_session: Any
) -> None:
    layer = SyncDynamoDBPersistenceLayer(
        "orders", endpoint_url=moto_server.endpoint_url, session=aws_session
    )
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        layer.get("fn#k")
    assert str(raised.value) == (
        "the sync DynamoDB layer of table 'orders' was given an aioboto3/aiobotocore "
        "session; pass a boto3 session as boto3_session= (or session=) instead"
    )


def test_without_boto3_the_layer_opens_its_client_with_botocore_alone(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("boto3", "boto3.session"):
        monkeypatch.setitem(sys.modules, name, None)  # "import boto3" raises ImportError
    layer = SyncDynamoDBPersistenceLayer(new_table_name(), endpoint_url=moto_server.endpoint_url)
    client = layer.client()
    assert type(client).__module__.startswith("botocore")
    assert client.meta.config.retries["total_max_attempts"] == DEFAULT_MAX_ATTEMPTS
    round_trip(layer)
