"""The errors a DynamoDB request fails with, as the caller sees them: a table whose key
is not the layer's, no credentials at all, a gateway's bare HTTP status, a request
botocore refuses before sending it; and the default retries when the AWS profile named
cannot be read."""

from __future__ import annotations

from typing import Any

import pytest
from aiobotocore.session import AioSession
from botocore.exceptions import NoCredentialsError, PartialCredentialsError

from aioidempotency._async.dynamodb import DEFAULT_MAX_ATTEMPTS, DynamoDBPersistenceLayer
from aioidempotency.exceptions import (
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
    IdempotencyPersistenceMisconfiguredError,
)
from tests.backends.dynamodb import fresh_store, inject_error
from tests.servers.moto import MotoServer


async def test_a_simple_table_read_with_a_composite_key_is_misconfigured(
    moto_server: MotoServer, aws_session: Any
) -> None:
    async with fresh_store(moto_server, session=aws_session, key_attr="pk") as composite:
        simple = DynamoDBPersistenceLayer(
            composite.table_name,
            key_attr="pk",
            sort_key_attr="sk",
            endpoint_url=moto_server.endpoint_url,
            session=aws_session,
        )
        try:
            with pytest.raises(IdempotencyPersistenceMisconfiguredError) as raised:
                await simple.get("fn#k")
        finally:
            await simple.aclose()
    assert str(raised.value).startswith(
        f"DynamoDB get on table {composite.table_name!r}: the table's key is not the layer's "
        "key_attr/sort_key_attr"
    )
    assert "[ValidationException]" in str(raised.value)
    assert not raised.value.transient


async def test_no_credentials_at_all_is_access_denied(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role either
    layer = DynamoDBPersistenceLayer(
        "idempotency", endpoint_url=moto_server.endpoint_url, session=AioSession()
    )
    try:
        with pytest.raises(IdempotencyPersistenceAccessDeniedError) as raised:
            await layer.get("fn#k")
    finally:
        await layer.aclose()
    assert str(raised.value).startswith(
        "DynamoDB get on table 'idempotency': no AWS credentials found (set AWS_ACCESS_KEY_ID"
    )
    assert isinstance(raised.value.__cause__, NoCredentialsError)


async def test_a_bare_http_status_is_a_failure_named_by_it(
    moto_server: MotoServer, user_client: Any
) -> None:
    # What botocore makes of a gateway's error page: the HTTP status as the code.
    async with fresh_store(moto_server, client=user_client) as store:
        inject_error(user_client, "GetItem", "502")
        with pytest.raises(IdempotencyPersistenceLayerError) as raised:
            await store.get("fn#k")
    assert str(raised.value).startswith(f"DynamoDB get on table {store.table_name!r}: failed [502]")
    assert not isinstance(raised.value, IdempotencyPersistenceConnectionError)


async def test_half_of_a_key_pair_is_a_failure_naming_the_missing_half(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An access key id without its secret: botocore refuses to open the client.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    layer = DynamoDBPersistenceLayer(
        "idempotency", endpoint_url=moto_server.endpoint_url, session=AioSession()
    )
    try:
        with pytest.raises(IdempotencyPersistenceLayerError) as raised:
            await layer.get("fn#k")
    finally:
        await layer.aclose()
    assert str(raised.value).startswith("DynamoDB get on table 'idempotency': failed - ")
    assert "AWS_SECRET_ACCESS_KEY" in str(raised.value)
    assert isinstance(raised.value.__cause__, PartialCredentialsError)
    assert not isinstance(raised.value, IdempotencyPersistenceConnectionError)


def test_an_unreadable_profile_leaves_the_default_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # botocore reports the missing profile when a client opens; the config is built first.
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aioidempotency-tests/config")
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    config = DynamoDBPersistenceLayer("t").client_config(AioSession())
    assert dict(config.retries) == {"total_max_attempts": DEFAULT_MAX_ATTEMPTS, "mode": "standard"}
