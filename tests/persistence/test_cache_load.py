"""Exactly once under load: 4 processes x 250 concurrent calls over 50 keys on one
server, redis-py and glide clients side by side. Each execution INCRs a counter in the
server itself, so the count does not depend on any process's memory."""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from typing import Any

import pytest

from tests.servers.redis import Kind, ServerPool

PROCESSES = 4
CALLS_PER_PROCESS = 250
KEYS = 50
CLIENTS = ["redis", "redis", "glide", "glide"]


async def _work(
    host: str, port: int, client: str, atomic: bool, prefix: str, index: int
) -> list[Any]:
    import redis.asyncio as aioredis

    from aioidempotency import IdempotencyConfig, IdempotencyEngine
    from aioidempotency._async.cache import CachePersistenceLayer

    query = f"client={client}&atomic={str(atomic).lower()}&timeout=10"
    layer = CachePersistenceLayer.from_url(f"redis://{host}:{port}?{query}")
    config = IdempotencyConfig(wait_for_in_progress_seconds=60, wait_poll_interval_seconds=0.01)
    engine = IdempotencyEngine(layer, config, key_prefix=prefix)
    counters = aioredis.Redis(host=host, port=port)

    async def call(n: int) -> Any:
        order = n % KEYS

        async def execute() -> dict[str, int]:
            await counters.incr(f"{prefix}:executions:{order}")
            return {"order": order, "process": index}

        return await engine.run({"order": order}, execute)

    try:
        return await asyncio.gather(*(call(n) for n in range(CALLS_PER_PROCESS)))
    finally:
        await counters.aclose()
        await layer.aclose()


def _worker(args: tuple[str, int, str, bool, str, int]) -> list[Any]:
    return asyncio.run(_work(*args))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "atomic"),
    [("valkey", True), ("redis", False)],
    ids=["valkey-atomic", "redis-protocol"],
)
async def test_every_key_executes_once_across_processes(
    cache_servers: ServerPool, kind: Kind, atomic: bool
) -> None:
    server = cache_servers.standalone(kind)
    prefix = f"load-{uuid.uuid4().hex[:8]}"
    jobs = [(server.host, server.port, CLIENTS[i], atomic, prefix, i) for i in range(PROCESSES)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        pending = pool.map_async(_worker, jobs)
        results = await asyncio.to_thread(pending.get, 120)

    with server.admin() as admin:
        counts = [admin.get(f"{prefix}:executions:{order}") for order in range(KEYS)]
    assert counts == [b"1"] * KEYS
    # Every call of a key got the one stored result, whichever process ran it.
    winners: dict[int, int] = {}
    for per_process in results:
        assert len(per_process) == CALLS_PER_PROCESS
        for result in per_process:
            assert winners.setdefault(result["order"], result["process"]) == result["process"]
    assert sorted(winners) == list(range(KEYS))
