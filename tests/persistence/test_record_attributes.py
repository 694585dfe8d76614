"""One `RecordAttributes` as a store's attribute names: the same items as the keywords,
on real servers, kept by the sync twin; given twice, refused."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer
from aioidempotency._twins import as_sync_store
from aioidempotency.exceptions import IdempotencyPersistenceConfigError
from aioidempotency.persistence import RecordAttributes
from tests.backends.cache import CacheBackend
from tests.backends.dynamodb import fresh_store
from tests.servers.moto import MotoServer
from tests.servers.redis import ServerPool

NAMES: dict[str, str] = {
    "status_attr": "state",
    "expiry_attr": "ttl",
    "in_progress_expiry_attr": "lease_until",
    "data_attr": "result",
    "validation_key_attr": "hash",
    "owner_attr": "owner",
}
ATTRIBUTES = RecordAttributes(**NAMES)
OWNER = "a" * 32  # as long as the engine's tokens: the atomic path refuses short ones
BOUND = 30.0  # seconds: a sync twin's calls run in a thread


#: One base time for every record of the module, so that records written in different
#: seconds still compare equal (stores compare expiries with the `now` they are given).
NOW = int(time.time())


def claim_of(key: str) -> DataRecord:
    now = NOW
    return DataRecord(
        key,
        RecordStatus.INPROGRESS,
        now + 600,
        in_progress_expiry_timestamp=(now + 60) * 1000,
        payload_hash="5d41402abc4b2a76b9719d911017c592",
        owner=OWNER,
    )


def completion_of(claim: DataRecord) -> DataRecord:
    return DataRecord(
        claim.idempotency_key,
        RecordStatus.COMPLETED,
        claim.expiry_timestamp,
        response_data='{"paid": 1}',
        payload_hash=claim.payload_hash,
    )


def stored_value(admin: Any, key: str) -> Any:
    raw = admin.get(key)
    assert raw is not None, f"{key!r} is not on the server"
    return json.loads(raw)


def new_key() -> str:
    return f"attrs#{uuid.uuid4().hex}"


def test_attributes_given_with_a_changed_keyword_are_refused() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match=r"owner_attr='mine'"):
        CachePersistenceLayer(url="redis://127.0.0.1:1", attributes=ATTRIBUTES, owner_attr="mine")
    with pytest.raises(IdempotencyPersistenceConfigError, match=r"given twice.*status_attr='s'"):
        DynamoDBPersistenceLayer("t", attributes=ATTRIBUTES, status_attr="s", region_name="x")
    with pytest.raises(IdempotencyPersistenceConfigError, match="takes a RecordAttributes"):
        CachePersistenceLayer(url="redis://127.0.0.1:1", attributes=NAMES)  # type: ignore[arg-type]


def test_keywords_left_at_their_defaults_do_not_conflict() -> None:
    cache = CachePersistenceLayer(
        url="redis://127.0.0.1:1", attributes=ATTRIBUTES, data_attr="data"
    )
    assert cache.attributes is ATTRIBUTES
    table = DynamoDBPersistenceLayer("t", attributes=ATTRIBUTES, region_name="x")
    assert table.attributes is ATTRIBUTES
    assert table.settings.attributes is ATTRIBUTES


def test_dynamodb_still_refuses_names_it_cannot_tell_apart() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match="must be distinct"):
        DynamoDBPersistenceLayer("t", attributes=RecordAttributes(owner_attr="id"), region_name="x")
    with pytest.raises(IdempotencyPersistenceConfigError, match="must be distinct"):
        DynamoDBPersistenceLayer(
            "t", attributes=RecordAttributes(data_attr="status"), region_name="x"
        )


# -- the cache store ----------------------------------------------------------------------


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
async def test_a_cache_store_writes_and_reads_what_the_keywords_do(
    cache_servers: ServerPool, atomic: bool
) -> None:
    url = CacheBackend("redis", False, "redis", atomic).url(cache_servers)
    by_keywords = CachePersistenceLayer.from_url(url, **NAMES)
    by_object = CachePersistenceLayer.from_url(url, attributes=ATTRIBUTES)
    assert by_object.attributes == by_keywords.attributes == ATTRIBUTES
    admin = cache_servers.standalone("redis").admin()
    try:
        stored: list[list[Any]] = []
        for writer, reader in [(by_keywords, by_object), (by_object, by_keywords)]:
            key = new_key()
            claim = claim_of(key)
            assert (await writer.claim(claim, now=time.time())).claimed
            in_progress = stored_value(admin, key)
            assert await reader.get(key) == claim
            await writer.complete(completion_of(claim), owner=OWNER)
            done = stored_value(admin, key)
            assert await reader.get(key) == completion_of(claim)
            stored.append([in_progress, done])
        assert stored[0] == stored[1]
        in_progress, done = stored[0]
        assert in_progress == {
            "state": "INPROGRESS",
            "ttl": claim.expiry_timestamp,
            "lease_until": claim.in_progress_expiry_timestamp,
            "hash": claim.payload_hash,
            "owner": OWNER,
        }
        assert done == {
            "result": '{"paid": 1}',
            "state": "COMPLETED",
            "ttl": claim.expiry_timestamp,
            "hash": claim.payload_hash,
        }
    finally:
        admin.close()
        await by_keywords.aclose()
        await by_object.aclose()


async def test_a_cache_stores_sync_twin_keeps_the_names(cache_servers: ServerPool) -> None:
    url = CacheBackend("redis", False, "redis", True).url(cache_servers)
    layer = CachePersistenceLayer.from_url(url, attributes=ATTRIBUTES)
    twin = as_sync_store(layer)
    assert isinstance(twin, SyncCachePersistenceLayer)
    assert twin.attributes == ATTRIBUTES
    admin = cache_servers.standalone("redis").admin()
    try:
        key = new_key()
        claim = claim_of(key)
        claimed = await asyncio.wait_for(
            asyncio.to_thread(twin.claim, claim, now=time.time()), BOUND
        )
        assert claimed.claimed
        assert stored_value(admin, key)["owner"] == OWNER
        assert await layer.get(key) == claim
    finally:
        admin.close()
        await layer.aclose()  # closes the twin's client too


# -- the DynamoDB store -------------------------------------------------------------------


async def test_a_dynamodb_store_writes_and_reads_what_the_keywords_do(
    moto_server: MotoServer, aws_session: Any
) -> None:
    async with fresh_store(moto_server, session=aws_session, **NAMES) as by_keywords:
        by_object = DynamoDBPersistenceLayer(
            by_keywords.table_name,
            endpoint_url=moto_server.endpoint_url,
            session=aws_session,
            attributes=ATTRIBUTES,
        )
        client = await by_keywords.client()

        async def item_of(key: str) -> dict[str, Any]:
            response = await client.get_item(
                TableName=by_keywords.table_name, Key={"id": {"S": key}}, ConsistentRead=True
            )
            item: dict[str, Any] = response["Item"]
            return item

        try:
            stored: list[list[dict[str, Any]]] = []
            for writer, reader in [(by_keywords, by_object), (by_object, by_keywords)]:
                key = new_key()
                claim = claim_of(key)
                assert (await writer.claim(claim, now=time.time())).claimed
                in_progress = await item_of(key)
                assert await reader.get(key) == claim
                await writer.complete(completion_of(claim), owner=OWNER)
                done = await item_of(key)
                # the completed item keeps the owner token (a resent completion is done)
                assert await reader.get(key) == replace(completion_of(claim), owner=OWNER)
                stored.append([{**in_progress, "id": None}, {**done, "id": None}])
            assert stored[0] == stored[1]
            in_progress, done = stored[0]
            assert set(in_progress) == {"id", "state", "ttl", "lease_until", "hash", "owner"}
            assert set(done) == {"id", "state", "ttl", "hash", "owner", "result"}
            assert done["result"] == {"S": '{"paid": 1}'}
        finally:
            await by_object.aclose()


async def test_a_dynamodb_stores_sync_twin_keeps_the_names(
    moto_server: MotoServer, aws_session: Any
) -> None:
    async with fresh_store(moto_server, session=aws_session) as plain:
        layer = DynamoDBPersistenceLayer(
            plain.table_name, endpoint_url=moto_server.endpoint_url, attributes=ATTRIBUTES
        )
        twin = as_sync_store(layer)
        assert isinstance(twin, SyncDynamoDBPersistenceLayer)
        assert twin.attributes == ATTRIBUTES
        try:
            key = new_key()
            claim = claim_of(key)
            claimed = await asyncio.wait_for(
                asyncio.to_thread(twin.claim, claim, now=time.time()), BOUND
            )
            assert claimed.claimed
            client = await plain.client()
            response = await client.get_item(
                TableName=plain.table_name, Key={"id": {"S": key}}, ConsistentRead=True
            )
            assert response["Item"]["owner"] == {"S": OWNER}
            assert "owner_token" not in response["Item"]
            assert await layer.get(key) == claim
        finally:
            twin.close()
            await layer.aclose()
