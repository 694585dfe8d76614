"""The DynamoDB store on moto's server: item layout, conditions, owner checks, limits."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import pytest

from aioidempotency._async.dynamodb import (
    MAX_ITEM_BYTES,
    DynamoDBPersistenceLayer,
    create_idempotency_table,
)
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._urls import store_from_url
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyResultTooLargeError,
)
from tests.backends.dynamodb import BACKENDS, counting_requests, new_table_name
from tests.servers.moto import MotoServer

NOW = time.time()


@pytest.fixture(params=BACKENDS)
def ddb(request: pytest.FixtureRequest) -> DynamoDBPersistenceLayer:
    store = request.getfixturevalue(f"store_{request.param}")
    assert isinstance(store, DynamoDBPersistenceLayer)
    return store


def key_of(store: DynamoDBPersistenceLayer, key: str) -> dict[str, Any]:
    """The primary key of `key`'s item: `key` itself, or the static partition key and
    `key` as the sort key (the layout of Powertools' DynamoDB layer)."""
    if store.sort_key_attr is None:
        return {store.key_attr: {"S": key}}
    return {store.key_attr: {"S": store.static_pk_value}, store.sort_key_attr: {"S": key}}


async def raw_item(store: DynamoDBPersistenceLayer, key: str) -> dict[str, Any] | None:
    client = await store.client()
    response = await client.get_item(
        TableName=store.table_name, Key=key_of(store, key), ConsistentRead=True
    )
    item: dict[str, Any] | None = response.get("Item")
    return item


def claim_record(
    key: str = "fn#abc",
    *,
    owner: str | None = None,
    expiry: int | None = None,
    in_progress_ms: int | None = None,
    payload_hash: str | None = None,
) -> DataRecord:
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(NOW) + 3600 if expiry is None else expiry,
        in_progress_expiry_timestamp=in_progress_ms,
        payload_hash=payload_hash,
        owner=owner or uuid.uuid4().hex,
    )


def renewed(claim: DataRecord, until_ms: int = 1, owner: str | None = None) -> DataRecord:
    """`claim` renewed until `until_ms` (by `owner` when given), as the lease sends it."""
    return dataclasses.replace(
        claim, in_progress_expiry_timestamp=until_ms, owner=owner or claim.owner
    )


def completed_record(claim: DataRecord, data: str = '{"ok": true}') -> DataRecord:
    return DataRecord(
        idempotency_key=claim.idempotency_key,
        status=RecordStatus.COMPLETED,
        expiry_timestamp=claim.expiry_timestamp + 10,
        response_data=data,
        payload_hash=claim.payload_hash,
    )


# -- item layout ---------------------------------------------------------------------------


async def test_claim_writes_the_reference_item_plus_the_owner(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    record = claim_record(in_progress_ms=int(NOW * 1000) + 60_000, payload_hash="h" * 32)
    assert (await ddb.claim(record, now=NOW)).claimed
    attrs = ddb.attributes
    assert await raw_item(ddb, record.idempotency_key) == {
        **key_of(ddb, record.idempotency_key),
        attrs.expiry_attr: {"N": str(record.expiry_timestamp)},
        attrs.status_attr: {"S": "INPROGRESS"},
        attrs.in_progress_expiry_attr: {"N": str(record.in_progress_expiry_timestamp)},
        attrs.validation_key_attr: {"S": "h" * 32},
        attrs.owner_attr: {"S": record.owner},
    }


async def test_claim_without_lease_or_validation_writes_no_such_attributes(
    store_dynamodb_simple: DynamoDBPersistenceLayer,
) -> None:
    store = store_dynamodb_simple
    record = claim_record()
    assert (await store.claim(record, now=NOW)).claimed
    assert await raw_item(store, record.idempotency_key) == {
        "id": {"S": record.idempotency_key},
        "expiration": {"N": str(record.expiry_timestamp)},
        "status": {"S": "INPROGRESS"},
        "owner_token": {"S": record.owner},
    }


async def test_completion_stores_the_result_keeps_the_owner_and_drops_the_lease(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    claim = claim_record(in_progress_ms=int(NOW * 1000) + 60_000, payload_hash="v1")
    await ddb.claim(claim, now=NOW)
    done = completed_record(claim)
    assert claim.owner is not None
    await ddb.complete(done, owner=claim.owner)
    attrs = ddb.attributes
    assert await raw_item(ddb, claim.idempotency_key) == {
        **key_of(ddb, claim.idempotency_key),
        attrs.data_attr: {"S": '{"ok": true}'},
        attrs.status_attr: {"S": "COMPLETED"},
        attrs.expiry_attr: {"N": str(done.expiry_timestamp)},
        attrs.validation_key_attr: {"S": "v1"},
        attrs.owner_attr: {"S": claim.owner},
    }
    assert await ddb.get(claim.idempotency_key) == dataclasses.replace(done, owner=claim.owner)


async def test_refused_claim_returns_the_stored_record_with_int_numbers(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    first = claim_record(in_progress_ms=int(NOW * 1000) + 60_000, payload_hash="p")
    assert (await ddb.claim(first, now=NOW)).claimed
    client = await ddb.client()
    with counting_requests(client) as requests:
        refused = await ddb.claim(claim_record(first.idempotency_key), now=NOW)
    assert requests.counts == {"PutItem": 1}
    assert not refused.claimed
    assert refused.existing == first
    assert type(refused.existing.expiry_timestamp) is int
    assert type(refused.existing.in_progress_expiry_timestamp) is int


async def test_late_completion_after_a_takeover_is_refused_and_changes_nothing(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    late = claim_record(in_progress_ms=int(NOW * 1000) + 1_000)
    await ddb.claim(late, now=NOW)
    new = claim_record(late.idempotency_key, in_progress_ms=int(NOW * 1000) + 60_000)
    assert (await ddb.claim(new, now=NOW + 2)).claimed
    new_item = await raw_item(ddb, new.idempotency_key)
    assert late.owner is not None
    with pytest.raises(IdempotencyClaimLostError) as lost:
        await ddb.complete(completed_record(late, '"late"'), owner=late.owner)
    assert lost.value.key == late.idempotency_key
    with pytest.raises(IdempotencyClaimLostError):
        await ddb.renew(renewed(late))
    await ddb.release(late.idempotency_key, owner=late.owner)  # not ours: does nothing
    assert await raw_item(ddb, new.idempotency_key) == new_item
    assert new.owner is not None
    await ddb.complete(completed_record(new, '"new"'), owner=new.owner)
    stored = await ddb.get(new.idempotency_key)
    assert stored is not None
    assert stored.response_data == '"new"'


async def test_completion_of_a_vanished_record_creates_no_partial_item(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    claim = claim_record()
    await ddb.claim(claim, now=NOW)
    assert await ddb.delete(claim.idempotency_key)
    assert claim.owner is not None
    with pytest.raises(IdempotencyClaimLostError, match="is gone"):
        await ddb.complete(completed_record(claim), owner=claim.owner)
    with pytest.raises(IdempotencyClaimLostError, match="is gone"):
        await ddb.renew(renewed(claim))
    assert await raw_item(ddb, claim.idempotency_key) is None


async def test_get_and_delete(ddb: DynamoDBPersistenceLayer) -> None:
    assert await ddb.get("fn#missing") is None
    assert not await ddb.delete("fn#missing")
    expired = claim_record("fn#expired", expiry=int(time.time()) - 5)
    assert (await ddb.claim(expired, now=time.time() - 10)).claimed
    assert await raw_item(ddb, "fn#expired") is not None
    assert await ddb.get("fn#expired") is None  # expired: as good as absent
    assert await ddb.delete("fn#expired")
    assert await raw_item(ddb, "fn#expired") is None


async def test_a_malformed_item_is_a_typed_error(
    store_dynamodb_simple: DynamoDBPersistenceLayer,
) -> None:
    store = store_dynamodb_simple
    client = await store.client()
    await client.put_item(
        TableName=store.table_name,
        Item={"id": {"S": "fn#bad"}, "expiration": {"N": "9999999999"}, "status": {"S": "WHAT"}},
    )
    with pytest.raises(IdempotencyInvalidStatusError):
        await store.get("fn#bad")
    with pytest.raises(IdempotencyInvalidStatusError):
        await store.claim(claim_record("fn#bad"), now=NOW)


async def test_composite_tables_are_shared_by_partition_value(
    moto_server: MotoServer, aws_session: Any
) -> None:
    table = new_table_name()
    options: dict[str, Any] = {
        "key_attr": "pk",
        "sort_key_attr": "sk",
        "endpoint_url": moto_server.endpoint_url,
        "session": aws_session,
    }
    orders = DynamoDBPersistenceLayer(table, static_pk_value="idempotency#orders", **options)
    refunds = DynamoDBPersistenceLayer(table, static_pk_value="idempotency#refunds", **options)
    await orders.create_table(exist_ok=False)
    assert not await refunds.create_table()  # exists already
    try:
        assert (await orders.claim(claim_record("same#key"), now=NOW)).claimed
        assert (await refunds.claim(claim_record("same#key"), now=NOW)).claimed
        client = await orders.client()
        scan = await client.scan(TableName=table)
        assert sorted((i["pk"]["S"], i["sk"]["S"]) for i in scan["Items"]) == [
            ("idempotency#orders", "same#key"),
            ("idempotency#refunds", "same#key"),
        ]
    finally:
        await (await orders.client()).delete_table(TableName=table)
        await orders.aclose()
        await refunds.aclose()


# -- limits --------------------------------------------------------------------------------


async def test_a_result_over_400_kb_is_refused_before_any_request(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    claim = claim_record()
    await ddb.claim(claim, now=NOW)
    assert claim.owner is not None
    client = await ddb.client()
    # 205,000 characters, 410,000 bytes of UTF-8: DynamoDB counts bytes
    too_big = completed_record(claim, '"' + "é" * 205_000 + '"')
    with counting_requests(client) as requests, pytest.raises(IdempotencyResultTooLargeError) as e:
        await ddb.complete(too_big, owner=claim.owner)
    assert requests.total == 0
    assert e.value.limit == MAX_ITEM_BYTES
    assert e.value.size > MAX_ITEM_BYTES
    assert await ddb.get(claim.idempotency_key) == claim  # still ours: the engine releases it


async def test_a_result_just_under_the_limit_round_trips(ddb: DynamoDBPersistenceLayer) -> None:
    claim = claim_record()
    await ddb.claim(claim, now=NOW)
    assert claim.owner is not None
    data = '"' + "x" * 380_000 + '"'
    await ddb.complete(completed_record(claim, data), owner=claim.owner)
    stored = await ddb.get(claim.idempotency_key)
    assert stored is not None
    assert stored.response_data == data


async def test_a_size_refusal_by_the_server_is_also_typed(
    store_dynamodb_simple: DynamoDBPersistenceLayer,
) -> None:
    # moto's limit (405,000 bytes) is a little under DynamoDB's (409,600): in between,
    # our check passes and the server refuses, as DynamoDB would for any miscount.
    store = store_dynamodb_simple
    claim = claim_record()
    await store.claim(claim, now=NOW)
    assert claim.owner is not None
    data = '"' + "x" * 407_000 + '"'
    client = await store.client()
    with counting_requests(client) as requests, pytest.raises(IdempotencyResultTooLargeError) as e:
        await store.complete(completed_record(claim, data), owner=claim.owner)
    assert requests.counts == {"UpdateItem": 1}
    assert e.value.__cause__ is not None
    assert await store.get(claim.idempotency_key) == claim


# -- configuration -------------------------------------------------------------------------


def test_key_attr_equal_to_sort_key_attr_is_rejected() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match="sort_key_attr"):
        DynamoDBPersistenceLayer("t", key_attr="id", sort_key_attr="id")


@pytest.mark.parametrize(
    "options",
    [
        {"data_attr": "status"},
        {"owner_attr": "expiration"},
        {"key_attr": "data"},
        {"sort_key_attr": "validation"},
        {"status_attr": ""},
    ],
)
def test_attribute_names_must_be_distinct(options: dict[str, Any]) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError):
        DynamoDBPersistenceLayer("t", **options)


def test_table_name_is_required() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError):
        DynamoDBPersistenceLayer("")


def test_static_pk_value_defaults_to_the_function_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "orders-api")
    layer = DynamoDBPersistenceLayer("t", sort_key_attr="sk")
    assert layer.static_pk_value == "idempotency#orders-api"
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME")
    assert DynamoDBPersistenceLayer("t", sort_key_attr="sk").static_pk_value == "idempotency#"


def test_from_url_reads_table_region_endpoint_and_attribute_names() -> None:
    layer = store_from_url(
        "dynamodb://Orders.Idempotency?region=eu-central-1"
        "&endpoint_url=http%3A%2F%2F127.0.0.1%3A4566&sort_key_attr=sk&static_pk_value=svc"
    )
    assert isinstance(layer, DynamoDBPersistenceLayer)
    assert layer.table_name == "Orders.Idempotency"
    assert layer.region_name == "eu-central-1"
    assert layer.endpoint_url == "http://127.0.0.1:4566"
    assert (layer.key_attr, layer.sort_key_attr, layer.static_pk_value) == ("id", "sk", "svc")
    bare = DynamoDBPersistenceLayer.from_url("dynamodb://t")
    assert (bare.table_name, bare.region_name, bare.endpoint_url) == ("t", None, None)


@pytest.mark.parametrize(
    "url", ["dynamodb://", "dynamodb://t?colour=red", "redis://t", "dynamodb://t?sort_key_attr=id"]
)
def test_from_url_rejects_bad_urls(url: str) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError):
        DynamoDBPersistenceLayer.from_url(url)


async def test_create_table_sets_the_key_schema_and_ttl(
    moto_server: MotoServer, aws_session: Any
) -> None:
    table = new_table_name()
    async with aws_session.create_client("dynamodb", endpoint_url=moto_server.endpoint_url) as c:
        assert await create_idempotency_table(c, table, key_attr="pk", sort_key_attr="sk")
        assert not await create_idempotency_table(c, table)
        with pytest.raises(Exception, match="ResourceInUseException"):
            await create_idempotency_table(c, table, exist_ok=False)
        described = (await c.describe_table(TableName=table))["Table"]
        ttl = (await c.describe_time_to_live(TableName=table))["TimeToLiveDescription"]
        await c.delete_table(TableName=table)
    assert described["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expiration"}


async def test_a_renewal_needs_an_owner_and_an_in_progress_expiry(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    claim = claim_record(in_progress_ms=int(NOW * 1000) + 60_000)
    assert (await ddb.claim(claim, now=NOW)).claimed
    with counting_requests(await ddb.client()) as requests:
        with pytest.raises(ValueError, match="renew needs an owner and an in-progress expiry"):
            await ddb.renew(dataclasses.replace(claim, in_progress_expiry_timestamp=None))
        with pytest.raises(ValueError, match="renew needs an owner"):
            await ddb.renew(dataclasses.replace(claim, owner=None))
    assert requests.total == 0
    assert await ddb.get(claim.idempotency_key) == claim
