"""The persistence contract on every store backend of the suite (`store`,
tests/conftest.py), through the public conformance kit that store authors run
(`aioidempotency.testing.contract`, docs/testing.md).

tools/unasync.py generates the sync twin of this module,
tests/sync/persistence/test_contract.py: it subclasses the sync kit, and `store` is the
sync twin of each backend's store (tests/sync/conftest.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from aioidempotency._dynamodb_items import MAX_ITEM_BYTES
from aioidempotency.persistence import PersistenceLayer
from aioidempotency.testing.contract import AsyncStoreContract, UnusableRecordWriter
from tests.backends import cache

UNUSABLE_STATUS = "DONE"
"""The status of the unusable records written below: not one of the contract's."""


def _backend(request: pytest.FixtureRequest) -> str:
    name: str = request.node.callspec.params["store"]
    return name


def _unusable_cache_record(request: pytest.FixtureRequest, name: str, key: str) -> None:
    """Write an unusable record under `key` on the server of the cache backend `name`,
    with a client of its own."""
    backend = cache.CACHE_BACKENDS[name]
    pool = request.getfixturevalue("cache_servers")
    value = json.dumps({"status": UNUSABLE_STATUS, "expiration": int(time.time()) + 600})
    if backend.cluster:
        node = pool.cluster(backend.kind)[0]
        with redis.RedisCluster(node.host, node.port, socket_timeout=5) as client:
            client.set(key, value, ex=600)
    else:
        with pool.standalone(backend.kind).admin() as admin:
            admin.set(key, value, ex=600)


def _unusable_dynamodb_item(store: Any, key: str) -> None:
    """Write an unusable item under `key` in the table of the DynamoDB layer `store`
    (async or sync: both name their table and attributes alike), through boto3."""
    import boto3

    layer = getattr(store, "inner", store)  # the async layer behind a bridged store
    item: dict[str, Any] = {
        layer.attributes.status_attr: {"S": UNUSABLE_STATUS},
        layer.attributes.expiry_attr: {"N": str(int(time.time()) + 600)},
    }
    if layer.sort_key_attr is None:
        item[layer.key_attr] = {"S": key}
    else:
        item[layer.key_attr] = {"S": layer.static_pk_value}
        item[layer.sort_key_attr] = {"S": key}
    client = boto3.client("dynamodb", endpoint_url=layer.endpoint_url)
    try:
        client.put_item(TableName=layer.table_name, Item=item)
    finally:
        client.close()


class TestContract(AsyncStoreContract):
    """The kit on each backend (the suite's `store` fixture, parametrised)."""

    @pytest.fixture
    def store(self, store: PersistenceLayer) -> PersistenceLayer:
        return store

    @pytest.fixture
    def write_unusable_record(
        self, request: pytest.FixtureRequest, store: PersistenceLayer
    ) -> UnusableRecordWriter | None:
        name = _backend(request)
        if name in cache.CACHE_BACKENDS:

            async def write_to_cache(key: str) -> None:
                _unusable_cache_record(request, name, key)

            return write_to_cache
        if name.startswith("dynamodb"):

            async def write_to_table(key: str) -> None:
                _unusable_dynamodb_item(store, key)

            return write_to_table
        return None  # the in-memory store holds records, never stored bytes

    @pytest.fixture
    def result_limit_bytes(self, request: pytest.FixtureRequest) -> int | None:
        return MAX_ITEM_BYTES if _backend(request).startswith("dynamodb") else None
