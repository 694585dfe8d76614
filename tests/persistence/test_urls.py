"""Store URLs and cache connection settings: what each part of a URL (or of Powertools'
connection arguments) becomes, and the errors a wrong one gets."""

from __future__ import annotations

from typing import Any

import pytest

from aioidempotency import IdempotencyPersistenceConfigError, InMemoryPersistenceLayer
from aioidempotency._urls import (
    CacheConnection,
    cache_connection,
    parse_cache_url,
    store_from_url,
)


def test_a_memory_url_sets_the_bound_of_the_table() -> None:
    store = store_from_url("MEMORY://?max_items=7")
    assert isinstance(store, InMemoryPersistenceLayer)
    assert store.table.max_items == 7


def test_an_unknown_scheme_names_the_schemes_there_are() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match="'mongodb'") as caught:
        store_from_url("mongodb://localhost/orders")
    assert "dynamodb://TABLE" in str(caught.value)


@pytest.mark.parametrize(
    ("connection", "url"),
    [
        (CacheConnection(), "redis://localhost:6379/0"),
        (CacheConnection(password="s3cret"), "redis://:s3cret@localhost:6379/0"),
        (CacheConnection(username="app", password=""), "redis://app:@localhost:6379/0"),
        (CacheConnection(username="app"), "redis://app@localhost:6379/0"),
        (
            CacheConnection(username="a b", password="p@ss/word"),
            "redis://a%20b:p%40ss%2Fword@localhost:6379/0",
        ),
        (CacheConnection(host="::1", port=7000, db=3), "redis://[::1]:7000/3"),
        (CacheConnection(cluster=True), "redis://localhost:6379"),
        (CacheConnection(cluster=True, db=2), "redis://localhost:6379/2"),
        (CacheConnection(tls=True), "rediss://localhost:6379/0"),
        (
            CacheConnection(options=(("health_check_interval", "30"), ("a", "1"))),
            "redis://localhost:6379/0?health_check_interval=30&a=1",
        ),
    ],
)
def test_a_connection_gives_redis_py_its_url(connection: CacheConnection, url: str) -> None:
    assert connection.redis_url() == url


def test_a_cache_url_round_trips_through_its_connection() -> None:
    url = "rediss://us%20er:p%40ss@cache.internal:6380/4?health_check_interval=30"
    connection, options = parse_cache_url(url)
    assert connection == CacheConnection(
        host="cache.internal",
        port=6380,
        username="us er",
        password="p@ss",
        db=4,
        tls=True,
        options=(("health_check_interval", "30"),),
    )
    assert options == {}
    assert connection.redis_url() == url


def test_a_cache_url_carries_the_store_options_and_the_client() -> None:
    connection, options = parse_cache_url(
        "valkeys://node:7000?cluster=YES&client=Glide&timeout=0.5"
        "&atomic=off&max_concurrency=8&wait_replicas=1&wait_timeout=0.25"
    )
    assert (connection.tls, connection.cluster, connection.client) == (True, True, "glide")
    assert connection.timeout == 0.5
    assert connection.options == ()
    assert options == {
        "atomic": False,
        "max_concurrency": 8,
        "wait_replicas": 1,
        "wait_timeout": 0.25,
    }


def test_the_last_copy_of_a_store_option_wins() -> None:
    connection, options = parse_cache_url("redis://h?client=glide&client=redis-py&atomic=1")
    assert connection.client == "redis"
    assert options == {"atomic": True}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost:6379", "not a Redis/Valkey URL"),
        ("redis://localhost?client=jedis", "unknown client 'jedis'"),
        ("redis://localhost/zero", "database .*'zero' is not a whole number"),
        ("redis://localhost?timeout=soon", "timeout='soon' is not a number"),
        ("redis://localhost?max_concurrency=1.5", "max_concurrency='1.5' is not a whole number"),
        ("redis://localhost?wait_replicas=all", "wait_replicas='all' is not a whole number"),
        ("redis://localhost?wait_timeout=", "wait_timeout='' is not a number"),
    ],
)
def test_a_wrong_cache_url_is_a_config_error(url: str, message: str) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match=message):
        parse_cache_url(url)


def powertools(
    *,
    url: str = "",
    host: str = "",
    port: int = 6379,
    username: str = "",
    password: str = "",
    db_index: int = 0,
    mode: str = "standalone",
    ssl: bool = True,
) -> tuple[CacheConnection, dict[str, Any]] | None:
    """`cache_connection` called as Powertools' cache layer calls it (its defaults)."""
    return cache_connection(
        url=url,
        host=host,
        port=port,
        username=username,
        password=password,
        db_index=db_index,
        mode=mode,  # type: ignore[arg-type]
        ssl=ssl,
    )


def test_powertools_arguments_without_a_url_or_a_host_name_no_connection() -> None:
    assert powertools() is None


def test_powertools_mode_must_be_standalone_or_cluster() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match="'sentinel'"):
        powertools(host="cache", mode="sentinel")


def test_powertools_host_arguments_become_a_connection() -> None:
    standalone = powertools(host="cache", port=6380, db_index=5)
    assert standalone == (CacheConnection(host="cache", port=6380, db=5, tls=True), {})
    cluster = powertools(
        host="cache",
        port=6380,
        db_index=5,
        username="app",
        password="pw",
        mode="cluster",
        ssl=False,
    )
    assert cluster == (
        CacheConnection(host="cache", port=6380, username="app", password="pw", cluster=True),
        {},
    )


def test_powertools_cluster_mode_makes_a_url_connect_as_a_cluster() -> None:
    found = powertools(url="redis://cache:7000?atomic=true", host="ignored", mode="cluster")
    assert found is not None
    connection, options = found
    assert (connection.host, connection.port, connection.cluster) == ("cache", 7000, True)
    assert options == {"atomic": True}
    already = powertools(url="redis://cache:7000?cluster=1", mode="cluster")
    assert already is not None
    assert already[0].cluster is True
