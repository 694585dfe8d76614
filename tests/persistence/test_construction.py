"""Mistakes caught when a store is built, not at its first call: Redis/Valkey URL
options that are unknown, that the chosen client would ignore, or whose value is
wrong (each named, with the valid ones listed); a `client_factory` that is not a
function that opens a client (``client_factory=make()``, a client, an async function
for the sync store)."""

from __future__ import annotations

import asyncio
import gc
import uuid
import warnings
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._urls import REDIS_PY_OPTIONS, parse_cache_url, redacted, store_from_url
from aioidempotency.exceptions import IdempotencyPersistenceConfigError
from tests.servers.redis import ServerPool

STORE_OPTIONS = (
    "cluster, client, timeout, atomic, max_concurrency, wait_replicas, wait_timeout, auto_pipeline"
)


def refusal(url: str) -> str:
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        CachePersistenceLayer.from_url(url)
    return str(raised.value)


def test_an_unknown_option_is_refused_with_the_valid_ones() -> None:
    message = refusal("redis://cache:6379?healthcheck=30")
    assert message.startswith(
        f"unknown option 'healthcheck'; a cache URL takes the store's options ({STORE_OPTIONS})"
        " and redis-py's (socket_timeout, socket_connect_timeout, "
    )
    assert "health_check_interval" in message
    assert message.endswith("in 'redis://cache:6379?healthcheck=30'")
    glide = refusal("valkey://cache?client=glide&healthcheck=30")
    assert f"takes the store's options ({STORE_OPTIONS}) in" in glide
    assert "redis-py's" not in glide


def test_a_redis_py_option_with_glide_is_refused_not_dropped() -> None:
    message = refusal("valkey://cache?client=glide&health_check_interval=30")
    assert message == (
        "option 'health_check_interval' is redis-py's, and valkey-glide (client=glide) would "
        f"ignore it; with client=glide a URL takes {STORE_OPTIONS} in "
        "'valkey://cache?client=glide&health_check_interval=30'"
    )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ssl_ca_certs=/ca.pem", "option 'ssl_ca_certs' needs TLS: use rediss:// or valkeys://"),
        ("health_check_interval=soon", "option health_check_interval='soon' is not a whole number"),
        ("socket_keepalive=maybe", "option socket_keepalive='maybe' is not true or false"),
        ("protocol=4", "option protocol='4' is not 2 or 3"),
        ("cluster=yes please", "option cluster='yes please' is not true or false"),
        ("atomic=sometimes", "option atomic='sometimes' is not true or false"),
        ("timeout=-1", "option timeout=-1 must be a positive number of seconds"),
    ],
)
def test_a_bad_value_names_its_option(query: str, message: str) -> None:
    assert refusal(f"redis://cache?{query}").startswith(message)


def test_messages_never_show_the_password() -> None:
    message = refusal("redis://app:s3cret@cache:6379?nope=1")
    assert "s3cret" not in message
    assert "'redis://app:***@cache:6379?nope=1'" in message
    assert redacted("redis://cache:6379") == "redis://cache:6379"
    assert redacted("rediss://:tok%40en@cache") == "rediss://:***@cache"


def test_valid_options_pass_and_reach_redis_py() -> None:
    connection, options = parse_cache_url(
        "rediss://cache?ssl_cert_reqs=none&health_check_interval=30&socket_keepalive=on"
        "&atomic=off&cluster=0"
    )
    assert connection.options == (
        ("ssl_cert_reqs", "none"),
        ("health_check_interval", "30"),
        ("socket_keepalive", "on"),
    )
    assert options == {"atomic": False}
    assert not connection.cluster
    assert set(REDIS_PY_OPTIONS) >= {name for name, _ in connection.options}


async def test_an_option_given_reaches_the_server(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("redis")
    name = f"check-{uuid.uuid4().hex[:8]}"
    async with CachePersistenceLayer.from_url(
        f"redis://{node.host}:{node.port}?client_name={name}&timeout=5"
    ) as layer:
        assert await asyncio.wait_for(layer.get("k"), 30) is None
        with node.admin() as admin:
            names = [client.get("name") for client in admin.client_list()]
    assert name in names


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://?max_items=lots", "option max_items='lots' is not a whole number"),
        ("memory://?max_items=0", "option max_items=0 must be at least 1"),
        ("memory://?size=10", "unknown option 'size'; memory:// takes max_items"),
    ],
)
def test_memory_urls_are_checked_too(url: str, message: str) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match=message):
        store_from_url(url)


# -- client_factory --------------------------------------------------------------------------


async def make_client() -> Any:
    return aioredis.Redis(host="localhost")


def test_a_coroutine_object_as_factory_is_refused_saying_what_to_pass() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(IdempotencyPersistenceConfigError) as raised:
            CachePersistenceLayer(client_factory=make_client())  # type: ignore[arg-type]
        gc.collect()
    assert str(raised.value) == (
        "client_factory= got a coroutine object, the result of calling make_client(); pass "
        "the function itself: client_factory=make_client"
    )
    assert not [w for w in caught if "never awaited" in str(w.message)]  # it was closed


def test_a_client_as_factory_is_refused() -> None:
    client = aioredis.Redis(host="localhost")
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        CachePersistenceLayer(client_factory=client)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "client_factory= takes a function that opens a client, not a Redis; pass a client "
        "as client= instead"
    )


def test_the_sync_store_refuses_an_async_factory() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        SyncCachePersistenceLayer(client_factory=make_client)
    assert str(raised.value).startswith(
        "make_client is an async function: SyncCachePersistenceLayer needs one that returns "
        "a sync client"
    )


async def test_a_plain_function_opening_an_asyncio_client_is_a_factory(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")

    def make() -> Any:
        return aioredis.Redis(host=node.host, port=node.port)

    async with CachePersistenceLayer(client_factory=make) as layer:
        assert await asyncio.wait_for(layer.get("k"), 30) is None
        assert (await asyncio.wait_for(layer.check(), 30)).ok


async def test_a_factory_returning_a_client_of_the_other_world_is_refused(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")

    async def make() -> Any:
        return redis.Redis(host=node.host, port=node.port)

    async with CachePersistenceLayer(client_factory=make) as layer:
        with pytest.raises(IdempotencyPersistenceConfigError) as raised:
            await asyncio.wait_for(layer.get("k"), 30)
    assert str(raised.value) == (
        "client_factory returned Redis, a client of the other world: this layer needs an "
        "asyncio client"
    )


async def test_a_plain_function_returning_a_sync_client_is_refused(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")

    def make() -> Any:
        return redis.Redis(host=node.host, port=node.port)

    async with CachePersistenceLayer(client_factory=make) as layer:
        with pytest.raises(IdempotencyPersistenceConfigError) as raised:
            await asyncio.wait_for(layer.get("k"), 30)
    assert str(raised.value) == (
        "client_factory returned Redis, a client of the other world: this layer needs an "
        "asyncio client"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"wait_replicas": -1}, "wait_replicas must be >= 0 and wait_timeout > 0 seconds"),
        ({"wait_replicas": 1, "wait_timeout": 0}, "wait_replicas must be >= 0 and wait_timeout"),
        (
            {"wait_replicas": 1, "atomic": False},
            "wait_replicas needs the atomic path (a client that runs scripts)",
        ),
    ],
)
def test_replica_waits_the_store_cannot_do_are_refused(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        CachePersistenceLayer(host="cache", **options)
    assert str(raised.value).startswith(message)
