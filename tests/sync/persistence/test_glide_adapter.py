"""The glide_sync adapter (`SyncGlideCacheClient`) on real servers: what it refuses, the
URL's database, glide's errors as the store's typed errors (a command the ACL refuses,
a client glide cannot create), a login refused after a password change, INFO of a
cluster client and which clients the layer closes. When glide_sync is imported is in
tests/persistence/test_glide_adapter.py; `wait_replicas` in
tests/sync/persistence/test_cache_store.py."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import glide_sync
import pytest
import redis

from aioidempotency._cache_errors import CacheAccessDeniedError
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._sync.glide import SyncGlideCacheClient
from aioidempotency.exceptions import (
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
)
from tests.persistence.cache_setups import acl_user, set_password
from tests.persistence.test_cache_store import completed, in_progress, new_key, tok
from tests.servers.redis import Server, ServerPool


@pytest.fixture
def raw_clients() -> Iterator[list[Any]]:
    """glide_sync clients a test creates (see `open_raw`), closed at its end."""
    opened: list[Any] = []
    yield opened
    for client in opened:
        client.close()


def open_raw(opened: list[Any], node: Server, *, cluster: bool = False) -> Any:
    """A glide_sync client of the user's."""
    addresses = [glide_sync.NodeAddress(node.host, node.port)]
    client: Any
    if cluster:
        config: Any = glide_sync.GlideClusterClientConfiguration(addresses, request_timeout=5000)
        client = glide_sync.GlideClusterClient.create(config)
    else:
        config = glide_sync.GlideClientConfiguration(addresses, request_timeout=5000)
        client = glide_sync.GlideClient.create(config)
    opened.append(client)
    return client


def url_of(node: Server, *, user: str = "", path: str = "", **query: str) -> str:
    auth = f"{user}@" if user else ""
    options = "".join(f"&{name}={value}" for name, value in query.items())
    return f"redis://{auth}{node.host}:{node.port}{path}?client=glide&timeout=5{options}"


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_client_that_is_not_glide_sync_is_refused(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    with node.admin() as raw, pytest.raises(IdempotencyPersistenceConfigError) as refused:
        SyncGlideCacheClient(raw)
    assert str(refused.value) == (
        "expected a glide_sync GlideClient or GlideClusterClient, got Redis"
    )


def test_the_urls_database_is_the_one_written(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("valkey")
    key = new_key()
    with SyncCachePersistenceLayer.from_url(url_of(node, path="/4")) as layer:
        assert layer.claim(in_progress(key, "a"), now=time.time()).claimed
        layer.complete(completed(key, 5), owner=tok("a"))
    with node.admin() as db0, redis.Redis(host=node.host, port=node.port, db=4) as db4:
        assert db0.get(key) is None
        stored = db4.get(key)
    assert stored is not None
    assert json.loads(stored)["status"] == "COMPLETED"


def test_a_client_glide_cannot_create_is_a_typed_error(
    cache_servers: ServerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With lazy_connect, a server started here never makes `create` fail; glide's
    # eager connect fails this way when the server cannot be reached.
    failure = glide_sync.RequestError("Standalone connect failed - IoError: connection refused")

    def failing_create(config: Any) -> Any:
        raise failure

    monkeypatch.setattr(glide_sync.GlideClient, "create", failing_create)
    node = cache_servers.standalone("valkey")
    with (
        SyncCachePersistenceLayer.from_url(url_of(node), retry_attempts=1) as layer,
        pytest.raises(IdempotencyPersistenceConnectionError) as caught,
    ):
        layer.get(new_key())
    assert caught.value.transient
    assert caught.value.__cause__ is failure


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
def test_a_delete_the_acl_refuses_is_access_denied(cache_servers: ServerPool, atomic: bool) -> None:
    node = cache_servers.standalone("valkey")
    key = new_key()
    with acl_user([node], "+@all", "-del") as user:
        url = url_of(node, user=f"{user}:pw", atomic=str(atomic).lower())
        with SyncCachePersistenceLayer.from_url(url) as layer:
            assert layer.claim(in_progress(key, "a"), now=time.time()).claimed
            with pytest.raises(CacheAccessDeniedError) as caught:
                layer.delete(key)
            assert not caught.value.transient
            assert layer.get(key) is not None  # still there


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
def test_a_wait_the_acl_refuses_is_access_denied(cache_servers: ServerPool, cluster: bool) -> None:
    nodes = cache_servers.cluster("valkey") if cluster else [cache_servers.standalone("valkey")]
    query = {"wait_replicas": "1", "wait_timeout": "0.05"}
    if cluster:
        query["cluster"] = "true"
    with acl_user(nodes, "+@all", "-wait") as user:
        url = url_of(nodes[0], user=f"{user}:pw", **query)
        with (
            SyncCachePersistenceLayer.from_url(url) as layer,
            pytest.raises(CacheAccessDeniedError) as caught,
        ):
            layer.claim(in_progress(new_key(), "a"), now=time.time())
    assert not caught.value.transient
    assert "wait" in str(caught.value.__cause__).lower()


def test_a_password_changed_under_a_running_layer_is_access_denied_not_a_timeout(
    cache_servers: ServerPool,
) -> None:
    # glide logs in again in the background and reports the refusal only as timed-out
    # requests: the layer asks a fresh client, which is refused at once.
    node = cache_servers.standalone("valkey")
    with acl_user([node], "+@all") as user:
        url = url_of(node, user=f"{user}:pw", timeout="0.5")
        with SyncCachePersistenceLayer.from_url(url) as layer:
            assert layer.get(new_key()) is None
            set_password([node], user, "rotated")
            with pytest.raises(CacheAccessDeniedError) as caught:
                layer.get(new_key())
    assert not caught.value.transient
    assert "WRONGPASS" in str(caught.value)


def test_diagnose_blames_only_a_refused_login(
    cache_servers: ServerPool, raw_clients: list[Any]
) -> None:
    node = cache_servers.standalone("valkey")
    seed = cache_servers.cluster("valkey")[0]
    passed = SyncGlideCacheClient(open_raw(raw_clients, node))
    assert passed.diagnose() is None  # not built by connect: nothing to go on
    healthy = SyncGlideCacheClient.connect(node.host, node.port)
    healthy_cluster = SyncGlideCacheClient.connect(seed.host, seed.port, cluster=True)
    down = SyncGlideCacheClient.connect("127.0.0.1", dead_port(), request_timeout_ms=500)
    refused = SyncGlideCacheClient.connect(
        seed.host, seed.port, cluster=True, username="nobody", password="wrong"
    )
    try:
        assert healthy.diagnose() is None
        assert healthy_cluster.diagnose() is None
        assert down.diagnose() is None  # unreachable: the timeouts say it all
        found = refused.diagnose()
        assert isinstance(found, CacheAccessDeniedError)
        assert "WRONGPASS" in str(found) or "invalid username-password" in str(found)
    finally:
        for adapter in (healthy, healthy_cluster, down, refused):
            adapter.close()


def test_check_of_a_cluster_client_reads_info_from_one_of_its_nodes(
    cache_servers: ServerPool, raw_clients: list[Any]
) -> None:
    seed = cache_servers.cluster("valkey")[0]
    layer = SyncCachePersistenceLayer(open_raw(raw_clients, seed, cluster=True))
    report = layer.check()
    assert report.ok, str(report)
    server = dict(report.facts)["server"]
    assert server.startswith("Valkey ")
    assert server.endswith("(cluster)")


@pytest.mark.parametrize("owned", [False, True], ids=["not-owned", "owned"])
def test_an_adapter_from_a_factory_is_closed_by_the_layer_only_when_it_owns_its_client(
    cache_servers: ServerPool, raw_clients: list[Any], owned: bool
) -> None:
    node = cache_servers.standalone("valkey")
    raw = open_raw(raw_clients, node)
    layer = SyncCachePersistenceLayer(client_factory=lambda: SyncGlideCacheClient(raw, owned=owned))
    key = new_key()
    assert layer.claim(in_progress(key, "a"), now=time.time()).claimed
    layer.close()
    if owned:
        with pytest.raises(glide_sync.ClosingError):
            raw.get(key)
    else:
        assert raw.get(key) is not None  # the user's client still works
