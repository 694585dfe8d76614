"""Fixtures of the fault suite: servers to kill, proxies to break, and the scale.

- `make_server(kind="redis", aof=False)`: a fresh `ManagedServer` of the test's own.
- `make_proxy(host, port)`: a `FaultProxy` in front of any target.
- `redis_proxied` / `valkey_proxied`: a fresh server behind a fresh proxy (a
  `ProxiedServer`: `.server`, `.proxy`, `.url(query)`).
- `proxied_moto`: a proxy in front of the session's moto server.

Everything is stopped at teardown, whatever state the test left it in (frozen, killed,
refusing). Every test of this directory carries the `faults` marker; counts come from
`tests.faults.scale` (``AIOIDEM_FAULT_SCALE``). The fault table of the outage scenarios
is printed at the end of the run (and written to ``$AIOIDEM_FAULT_TABLE`` if set).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.faults.proxy import FaultProxy
from tests.faults.rigs import (
    RIG_KINDS,
    Rig,
    drop_dynamodb_rig,
    make_cache_rig,
    make_dynamodb_rig,
)
from tests.faults.servers import ManagedServer
from tests.servers.moto import MotoServer
from tests.servers.redis import Kind, ServerPool

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: fault-injection tests (AIOIDEM_FAULT_SCALE=ci|full)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault table the outage scenarios filled (and save it when asked)."""
    from tests.faults.rigs import TABLE

    if not TABLE.rows:
        return
    terminalreporter.write_sep("=", "fault table")
    terminalreporter.write_line(TABLE.markdown())
    target = os.environ.get("AIOIDEM_FAULT_TABLE")
    if target:
        Path(target).write_text(TABLE.markdown() + "\n")


@dataclasses.dataclass(frozen=True)
class ProxiedServer:
    """A server and a proxy in front of it: clients under test go through `proxy`,
    assertions go to `server.admin()` on the real port."""

    server: ManagedServer
    proxy: FaultProxy

    def url(self, query: str = "") -> str:
        """Store URL through the proxy, e.g. ``url("timeout=0.5&atomic=true")``."""
        scheme = "valkey" if self.server.kind == "valkey" else "redis"
        auth = f":{self.server.password}@" if self.server.password else ""
        base = f"{scheme}://{auth}{self.proxy.host}:{self.proxy.port}"
        return f"{base}?{query}" if query else base


MakeServer = Callable[..., ManagedServer]
MakeProxy = Callable[[str, int], FaultProxy]


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    """Factory: ``make_server("valkey", aof=True)``; all stopped at teardown."""
    servers: list[ManagedServer] = []

    def make(
        kind: Kind = "redis", *, aof: bool = False, extra: tuple[str, ...] = ()
    ) -> ManagedServer:
        server = ManagedServer(kind, aof=aof, extra=extra)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def make_proxy() -> Iterator[MakeProxy]:
    """Factory: ``make_proxy(host, port)``; all closed at teardown."""
    proxies: list[FaultProxy] = []

    def make(host: str, port: int) -> FaultProxy:
        proxy = FaultProxy(host, port)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.fixture
def redis_proxied(make_server: MakeServer, make_proxy: MakeProxy) -> ProxiedServer:
    """A fresh redis-server (persistence off) behind a fresh proxy."""
    server = make_server("redis")
    return ProxiedServer(server, make_proxy(server.host, server.port))


@pytest.fixture
def valkey_proxied(make_server: MakeServer, make_proxy: MakeProxy) -> ProxiedServer:
    """A fresh valkey-server (persistence off) behind a fresh proxy."""
    server = make_server("valkey")
    return ProxiedServer(server, make_proxy(server.host, server.port))


@pytest.fixture
def proxied_moto(moto_server: MotoServer, make_proxy: MakeProxy) -> FaultProxy:
    """A proxy in front of the session's moto server (endpoint ``http://host:port``)."""
    return make_proxy(moto_server.host, moto_server.port)


@pytest.fixture(scope="module")
def counter_pool() -> Iterator[ServerPool]:
    """A standalone server of the module's own, outside any cluster under test."""
    pool = ServerPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
async def counter(counter_pool: ServerPool) -> AsyncIterator[aioredis.Redis]:
    """A client of `counter_pool`'s Valkey, where cluster tests count executions (a
    failover in the cluster cannot lose a count there)."""
    server = counter_pool.standalone("valkey")
    client = aioredis.Redis(host=server.host, port=server.port)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=RIG_KINDS)
async def rig(
    request: pytest.FixtureRequest, make_server: MakeServer, make_proxy: MakeProxy
) -> AsyncIterator[Rig]:
    kind = request.param
    if kind == "dynamodb":
        moto = request.getfixturevalue("moto_server")
        proxy = make_proxy(moto.host, moto.port)
        built = await make_dynamodb_rig(
            moto.endpoint_url, proxy, request.getfixturevalue("aws_session")
        )
    else:
        server = make_server("valkey" if kind == "valkey_glide" else "redis")
        proxy = make_proxy(server.host, server.port)
        built = await make_cache_rig(kind, server, proxy)
    try:
        yield built
    finally:
        await built.aclose()
        if kind == "dynamodb":
            await drop_dynamodb_rig(built)
