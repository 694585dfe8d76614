"""Interop with Powertools for AWS Lambda (Python) on one Redis server: a record it
completes is replayed by us, and a record we complete is replayed by it, for the same
function and payload (so the same key: `test-func.<module>.<qualname>#<md5>`)."""

from __future__ import annotations

import asyncio
import json
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis

from aioidempotency import IdempotencyConfig, idempotent_function
from aioidempotency._async.cache import CachePersistenceLayer
from tests.servers.redis import Server, ServerPool

EXECUTIONS: list[str] = []
# Powertools warns that it has no Lambda context to bound the claim with.
pytestmark = pytest.mark.filterwarnings("ignore:Couldn't determine the remaining time")


def charge(order: dict[str, Any]) -> dict[str, Any]:
    """The function both libraries make idempotent (one module, one qualname)."""
    EXECUTIONS.append(order["id"])
    return {"charged": order["amount"], "id": order["id"], "note": None}


@pytest.fixture
def theirs(cache_servers: ServerPool) -> Iterator[Callable[..., dict[str, Any]]]:
    """`charge` made idempotent by Powertools (sync redis-py client, same server)."""
    from aws_lambda_powertools.utilities.idempotency import (
        IdempotencyConfig as PowertoolsConfig,
    )
    from aws_lambda_powertools.utilities.idempotency import (
        idempotent_function as powertools_idempotent_function,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
        RedisCachePersistenceLayer,
    )

    server = cache_servers.standalone("redis")
    client = redis.Redis(server.host, server.port, decode_responses=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        store = RedisCachePersistenceLayer(client=client)  # type: ignore[arg-type]
    decorate = powertools_idempotent_function(
        data_keyword_argument="order",
        persistence_store=store,
        config=PowertoolsConfig(expires_after_seconds=600),
    )
    yield decorate(charge)
    client.close()


@pytest.fixture(
    params=[("redis", True), ("glide", True), ("redis", False)],
    ids=["redispy-atomic", "glide-atomic", "redispy-protocol"],
)
async def ours(
    request: pytest.FixtureRequest, cache_servers: ServerPool, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Server, Callable[..., dict[str, Any]]]]:
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    client, atomic = request.param
    server = cache_servers.standalone("redis")
    query = f"client={client}&atomic={str(atomic).lower()}&timeout=5"
    layer = CachePersistenceLayer.from_url(f"redis://{server.host}:{server.port}?{query}")
    decorate = idempotent_function(
        data_keyword_argument="order",
        persistence_store=layer,
        config=IdempotencyConfig(expires_after_seconds=600),
    )
    yield server, decorate(charge)
    await layer.aclose()


def an_order() -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "amount": "12.50"}


async def test_a_result_powertools_stored_is_replayed_by_us(
    ours: tuple[Server, Callable[..., dict[str, Any]]], theirs: Callable[..., dict[str, Any]]
) -> None:
    _, our_charge = ours
    order = an_order()
    first = await asyncio.to_thread(theirs, order=order)
    replayed = await asyncio.wait_for(asyncio.to_thread(our_charge, order=order), 30)
    assert replayed == first
    assert EXECUTIONS.count(order["id"]) == 1


async def test_a_result_we_stored_is_replayed_by_powertools(
    ours: tuple[Server, Callable[..., dict[str, Any]]], theirs: Callable[..., dict[str, Any]]
) -> None:
    server, our_charge = ours
    order = an_order()
    first = await asyncio.wait_for(asyncio.to_thread(our_charge, order=order), 30)
    replayed = await asyncio.to_thread(theirs, order=order)
    assert replayed == first
    assert EXECUTIONS.count(order["id"]) == 1
    with server.admin() as admin:
        pattern = f"test-func.{__name__}.charge#*"
        keys = [k.decode() for k in admin.keys(pattern)]
        stored = [json.loads(admin.get(k)) for k in keys]
    assert any(record.get("data") == json.dumps(first, sort_keys=True) for record in stored)
