"""What `SyncCachePersistenceLayer` refuses when it is built, and the clients its
`client_factory` returns: each refusal says what to pass instead. The async layer's are
in tests/persistence/test_construction.py and tests/persistence/test_cache_store.py."""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency.exceptions import IdempotencyPersistenceConfigError
from tests.persistence.test_cache_store import in_progress, new_key
from tests.servers.redis import Server, ServerPool


class OwnClient:
    """A user's own sync client: get, set (TTL only) and delete, and no `close`."""

    def __init__(self, inner: redis.Redis) -> None:
        self.inner = inner
        self.closed = False

    def get(self, name: str) -> Any:
        return self.inner.get(name)

    def set(self, name: str, value: str, *, ex: int | None = None, nx: bool = False) -> Any:
        return self.inner.set(name, value, ex=ex, nx=nx)

    def delete(self, *names: str) -> Any:
        return self.inner.delete(*names)


class ClosableClient(OwnClient):
    """`OwnClient` with a `close` that records being called."""

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def node(cache_servers: ServerPool) -> Server:
    return cache_servers.standalone("valkey")


@pytest.fixture
def admin(node: Server) -> Iterator[redis.Redis]:
    with node.admin() as client:
        yield client


async def make_client() -> Any:
    return aioredis.Redis(host="localhost")


def test_a_coroutine_object_as_factory_is_refused_saying_what_to_pass() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(IdempotencyPersistenceConfigError) as raised:
            SyncCachePersistenceLayer(client_factory=make_client())  # type: ignore[arg-type]
        gc.collect()
    assert str(raised.value) == (
        "client_factory= got a coroutine object, the result of calling make_client(); pass "
        "the function itself: client_factory=make_client"
    )
    assert not [w for w in caught if "never awaited" in str(w.message)]  # it was closed


def test_a_client_as_factory_is_refused(admin: redis.Redis) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        SyncCachePersistenceLayer(client_factory=admin)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "client_factory= takes a function that opens a client, not a Redis; pass a client "
        "as client= instead"
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"url": "redis://127.0.0.1:1"}, {"client_factory": lambda: None}],
    ids=["nothing", "client-and-url", "client-and-factory"],
)
def test_exactly_one_source_of_clients_is_taken(
    admin: redis.Redis, options: dict[str, Any]
) -> None:
    client = admin if options else None
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        SyncCachePersistenceLayer(client, **options)
    assert str(raised.value) == "pass exactly one of client, client_factory, url or host"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency must be at least 1: 0"),
        ({"wait_replicas": -1}, "wait_replicas must be >= 0 and wait_timeout > 0 seconds"),
        ({"wait_timeout": 0}, "wait_replicas must be >= 0 and wait_timeout > 0 seconds"),
    ],
)
def test_bounds_that_could_never_be_met_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        SyncCachePersistenceLayer(url="redis://127.0.0.1:1", **options)
    assert str(raised.value) == message


def test_a_url_as_first_argument_is_a_url_as_in_powertools(node: Server) -> None:
    url = f"redis://{node.host}:{node.port}?timeout=5"
    with SyncCachePersistenceLayer(url) as layer:
        assert layer.connection is not None
        assert layer.connection.port == node.port
        key = new_key()
        assert layer.claim(in_progress(key, "a"), now=time.time()).claimed
        assert layer.get(key) is not None


def test_a_factory_returning_an_asyncio_client_is_refused(node: Server) -> None:
    opened: list[Any] = []

    def make() -> Any:
        opened.append(aioredis.Redis(host=node.host, port=node.port))
        return opened[-1]

    with (
        SyncCachePersistenceLayer(client_factory=make) as layer,
        pytest.raises(IdempotencyPersistenceConfigError) as raised,
    ):
        layer.get("k")
    assert str(raised.value) == (
        "client_factory returned Redis, a client of the other world: this layer needs a sync client"
    )
    assert len(opened) == 1


def test_a_factory_client_that_cannot_run_scripts_is_refused_and_closed(node: Server) -> None:
    opened: list[ClosableClient] = []

    def make() -> ClosableClient:
        opened.append(ClosableClient(node.admin()))
        return opened[-1]

    with (
        SyncCachePersistenceLayer(client_factory=make, atomic=True) as layer,
        pytest.raises(IdempotencyPersistenceConfigError) as raised,
    ):
        layer.get("k")
    assert str(raised.value) == "ClosableClient cannot run scripts; use atomic=False"  # its class
    assert [client.closed for client in opened] == [True]  # opened for the layer, of no use
    for client in opened:
        client.inner.close()


def test_a_factory_client_without_close_is_left_to_the_user(node: Server) -> None:
    raw = node.admin()
    own = OwnClient(raw)
    layer = SyncCachePersistenceLayer(client_factory=lambda: own, atomic=False)
    key = new_key()
    try:
        assert layer.claim(in_progress(key, "a"), now=time.time()).claimed
        layer.close()  # nothing to close it with: no error
        assert raw.get(key) is not None
        assert layer.get(key) is not None  # a later call opens the factory's client again
    finally:
        raw.close()
