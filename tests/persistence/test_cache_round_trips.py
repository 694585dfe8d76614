"""Round trips per engine call on Redis/Valkey, counted twice: by a wrapper around the
store's client (one call = one round trip) and by the server (`INFO commandstats`).

Atomic path: a replay is 1 round trip, a first execution 2, an orphan takeover 3 (the
claim script returns the stale record, Python classifies it, a second run replaces it
only if unchanged; then the completion). Protocol path: a replay is 2 (the reference
needs 3), a first execution 3 (completion reads the record to check it is still ours).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from aioidempotency import (
    IdempotencyAlreadyInProgressError,
    IdempotencyConfig,
    IdempotencyEngine,
)
from aioidempotency._async.cache import (
    CachePersistenceLayer,
    LuaScript,
    RedisPyCacheClient,
    ScriptingCacheClient,
)
from aioidempotency._async.glide import GlideCacheClient
from tests.servers.redis import Server, ServerPool

#: Round trips per case: (atomic path, protocol path).
EXPECTED = {
    "first execution": (2, 3),
    "replay": (1, 2),
    "duplicate in progress": (1, 2),
    "failure (release)": (2, 3),
    "orphan takeover": (3, 6),
}
TOP_LEVEL = {True: ("evalsha", "eval"), False: ("get", "set", "del")}


class CountingClient:
    """Delegates to a real client and counts each call (each is one round trip)."""

    def __init__(self, inner: ScriptingCacheClient) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()

    async def get(self, name: str) -> bytes | str | None:
        self.calls["get"] += 1
        return await self.inner.get(name)

    async def set(self, name: str, value: str, *, ex: int | None = None, nx: bool = False) -> Any:
        self.calls["set"] += 1
        return await self.inner.set(name, value, ex=ex, nx=nx)

    async def delete(self, *names: str) -> Any:
        self.calls["delete"] += 1
        return await self.inner.delete(*names)

    async def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        self.calls["script"] += 1
        return await self.inner.run_script(script, key, args)


def server_commands(server: Server, names: Sequence[str]) -> int:
    with server.admin() as admin:
        stats = admin.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)


def reset_stats(server: Server) -> None:
    with server.admin() as admin:
        admin.config_resetstat()


@pytest.fixture(params=["redis-redispy", "redis-glide", "valkey-redispy", "valkey-glide"])
async def raw_client(
    request: pytest.FixtureRequest, cache_servers: ServerPool
) -> AsyncIterator[tuple[Server, ScriptingCacheClient]]:
    kind, client = request.param.split("-")
    server = cache_servers.standalone(kind)
    inner: ScriptingCacheClient
    if client == "glide":
        inner = await GlideCacheClient.connect(server.host, server.port)
    else:
        inner = RedisPyCacheClient(aioredis.Redis(host=server.host, port=server.port), owned=True)
    yield server, inner
    assert isinstance(inner, (GlideCacheClient, RedisPyCacheClient))
    await inner.aclose()


async def ok() -> str:
    return "ok"


async def fail() -> str:
    raise RuntimeError("boom")


Call = Callable[[], Awaitable[Any]]


async def _nothing() -> None:
    return None


async def prepare(case: str, engine: IdempotencyEngine, server: Server) -> tuple[Call, Call]:
    """Set `case` up; return the call to measure and what to await after counting."""
    payload = {"order": uuid.uuid4().hex}
    if case == "replay":
        await engine.run(payload, ok)
    elif case == "orphan takeover":
        now = time.time()
        crashed = {
            "status": "INPROGRESS",
            "expiration": int(now) + 600,
            "in_progress_expiration": int(now * 1000) - 1000,
        }
        with server.admin() as admin:
            admin.set(engine.idempotency_key(payload), json.dumps(crashed), ex=600)
    elif case == "failure (release)":

        async def failing() -> None:
            with pytest.raises(RuntimeError):
                await engine.run(payload, fail)

        return failing, _nothing
    elif case == "duplicate in progress":
        started, release = asyncio.Event(), asyncio.Event()

        async def held() -> str:
            started.set()
            await asyncio.wait_for(release.wait(), 10)
            return "ok"

        first = asyncio.create_task(engine.run(payload, held))
        await asyncio.wait_for(started.wait(), 10)

        # Another process: an engine of its own, so the refusal comes from the store.
        other = IdempotencyEngine(engine.persistence_store, key_prefix=engine.key_prefix)

        async def duplicate() -> None:
            with pytest.raises(IdempotencyAlreadyInProgressError):
                await other.run(payload, ok)

        async def finish_first() -> None:
            release.set()
            assert await first == "ok"

        return duplicate, finish_first
    return (lambda: engine.run(payload, ok)), _nothing


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "protocol"])
@pytest.mark.parametrize("case", list(EXPECTED))
async def test_round_trips_per_case(
    raw_client: tuple[Server, ScriptingCacheClient], case: str, atomic: bool
) -> None:
    server, inner = raw_client
    counting = CountingClient(inner)
    layer = CachePersistenceLayer(counting, atomic=atomic)
    engine = IdempotencyEngine(layer, IdempotencyConfig(), key_prefix="round-trips")
    # Cache the scripts on the server first: the first use of each costs one more
    # round trip (EVALSHA answered NOSCRIPT, then EVAL).
    await engine.run({"warm-up": uuid.uuid4().hex}, ok)
    with pytest.raises(RuntimeError):
        await engine.run({"warm-up": uuid.uuid4().hex}, fail)

    call, after = await prepare(case, engine, server)
    counting.calls.clear()
    reset_stats(server)
    await call()
    client_side = sum(counting.calls.values())
    server_side = server_commands(server, TOP_LEVEL[atomic])
    await after()

    expected = EXPECTED[case][0 if atomic else 1]
    assert client_side == expected, counting.calls
    assert server_side == expected
