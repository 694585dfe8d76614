"""Redis and Valkey backends: server x client x path, standalone and cluster.

Each backend is a `CachePersistenceLayer.from_url` layer (one lazily opened client per
event loop) on a real server started once per session; every test starts on a
flushed keyspace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from aioidempotency._async.cache import CachePersistenceLayer
from tests.servers.redis import Kind, Server, ServerPool


@dataclasses.dataclass(frozen=True)
class CacheBackend:
    """One combination: server kind, standalone or cluster, client, atomic or protocol."""

    kind: Kind
    cluster: bool
    client: str  # "redis" (redis-py asyncio) or "glide"
    atomic: bool

    def url(self, pool: ServerPool) -> str:
        node = pool.cluster(self.kind)[0] if self.cluster else pool.standalone(self.kind)
        scheme = "valkey" if self.kind == "valkey" else "redis"
        query = f"client={self.client}&atomic={str(self.atomic).lower()}&timeout=5"
        if self.cluster:
            query += "&cluster=true"
        return f"{scheme}://{node.host}:{node.port}?{query}"


CACHE_BACKENDS: dict[str, CacheBackend] = {
    "redis_protocol": CacheBackend("redis", False, "redis", False),
    "redis_atomic": CacheBackend("redis", False, "redis", True),
    "redis_glide_atomic": CacheBackend("redis", False, "glide", True),
    "valkey_redispy_atomic": CacheBackend("valkey", False, "redis", True),
    "valkey_glide_protocol": CacheBackend("valkey", False, "glide", False),
    "valkey_glide_atomic": CacheBackend("valkey", False, "glide", True),
    "valkey_cluster_glide_atomic": CacheBackend("valkey", True, "glide", True),
    "redis_cluster_redispy_atomic": CacheBackend("redis", True, "redis", True),
    "valkey_cluster_redispy_protocol": CacheBackend("valkey", True, "redis", False),
}
BACKENDS = list(CACHE_BACKENDS)


@pytest.fixture(scope="session")
def cache_servers() -> Iterator[ServerPool]:
    """The Redis/Valkey servers of the session, stopped at its end."""
    pool = ServerPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session", autouse=True)
def _glide_replies_on_a_running_loop(cache_servers: ServerPool) -> Iterator[None]:
    """valkey-glide 2.6 reads the replies of every glide client of the process from one
    pipe, watched by the first event loop that created a glide client until that loop is
    closed. pytest's session loop sits open and idle during sync tests, and any glide
    client used then (a sync shim's loop, a Lambda handler's loop) would never get a
    reply. So the first glide client of the session is made here, on a loop that runs
    until the session ends."""
    import glide

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="glide-replies", daemon=True)
    thread.start()
    node = cache_servers.standalone("valkey")
    config = glide.GlideClientConfiguration([glide.NodeAddress(node.host, node.port)])
    client = asyncio.run_coroutine_threadsafe(glide.GlideClient.create(config), loop).result(30)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class _Flusher:
    """Synchronous admin clients that empty a server (every node of a cluster)."""

    def __init__(self, nodes: list[Server]) -> None:
        self._clients = [node.admin() for node in nodes]

    def flush(self) -> None:
        for client in self._clients:
            client.flushall()

    def close(self) -> None:
        for client in self._clients:
            client.close()


@pytest.fixture(scope="session")
def _cache_flushers(cache_servers: ServerPool) -> Iterator[dict[tuple[Kind, bool], _Flusher]]:
    flushers: dict[tuple[Kind, bool], _Flusher] = {}
    yield flushers
    for flusher in flushers.values():
        flusher.close()


@pytest.fixture(scope="session")
async def _cache_layers(
    cache_servers: ServerPool,
) -> AsyncIterator[dict[str, CachePersistenceLayer]]:
    layers: dict[str, CachePersistenceLayer] = {}
    yield layers
    for layer in layers.values():
        await layer.aclose()


async def _fresh_store(
    name: str,
    pool: ServerPool,
    layers: dict[str, CachePersistenceLayer],
    flushers: dict[tuple[Kind, bool], _Flusher],
) -> CachePersistenceLayer:
    backend = CACHE_BACKENDS[name]
    slot = (backend.kind, backend.cluster)
    if slot not in flushers:
        nodes = pool.cluster(backend.kind) if backend.cluster else [pool.standalone(backend.kind)]
        flushers[slot] = _Flusher(nodes)
    try:
        flushers[slot].flush()
    except redis.ConnectionError as exc:  # pragma: no cover - a dead server is a failure
        raise RuntimeError(f"{backend.kind} server is gone") from exc
    if name not in layers:
        layers[name] = CachePersistenceLayer.from_url(backend.url(pool))
    return layers[name]


def _make_fixture(name: str) -> object:
    @pytest.fixture(name=f"store_{name}")
    async def store_fixture(
        cache_servers: ServerPool,
        _cache_layers: dict[str, CachePersistenceLayer],
        _cache_flushers: dict[tuple[Kind, bool], _Flusher],
    ) -> CachePersistenceLayer:
        return await _fresh_store(name, cache_servers, _cache_layers, _cache_flushers)

    store_fixture.__doc__ = f"A flushed {name} store ({CACHE_BACKENDS[name]})."
    return store_fixture


for _name in BACKENDS:
    globals()[f"store_{_name}"] = _make_fixture(_name)
