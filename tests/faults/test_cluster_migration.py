"""A slot range moves between primaries while duplicates of every key call the engine.

An earlier version of the store, on redis-py's `RedisCluster`, ran 3-19 of ~280 keys
twice during a migration, let raw `AttributeError`s surface as store errors and
reported completions that were stored as `IdempotencyClaimLostError`. Here each
key is called by 3 lanes (an engine with its own store and client each, like three
processes) in repeated passes for as long as the migration runs, then once more after
it. Every run of the function is counted on a standalone server. Expected: no key runs
twice, every error is an `IdempotencyError` with the client's error chained (no cycle)
and marked transient, no completion that was stored is called lost, and every caller
that returned got the stored result.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from aioidempotency import CachePersistenceLayer, IdempotencyConfig, IdempotencyEngine
from aioidempotency.exceptions import IdempotencyPersistenceLayerError
from aioidempotency.persistence import PersistenceLayer, store_from_url
from tests.faults.cluster import SCALE, ReplicatedCluster, Workload, scaled, stored_run
from tests.servers.redis import Kind

pytestmark = pytest.mark.timeout(240)

KINDS: list[Kind] = ["valkey", "redis"] if SCALE == "full" else ["valkey"]
CLIENTS = ["redis-url", "redis-user", "glide-url"]
LANES = 3
KEYS = scaled(ci=40, full=280)
SLOTS_MOVED = scaled(ci=40, full=300)
WINDOW = 4  # keys in flight at once in the background passes (each with LANES calls)
MAX_PASSES = scaled(ci=2, full=50)
STORM_SECONDS = 90.0
HANDSHAKE_SECONDS = 30.0


@pytest.fixture(scope="module", params=KINDS)
def cluster(request: pytest.FixtureRequest) -> Iterator[ReplicatedCluster]:
    with ReplicatedCluster.start(request.param) as cluster:
        yield cluster


class Lanes:
    """One store (own client) and engine per lane, built the way `client` says."""

    def __init__(self, cluster: ReplicatedCluster, client: str, prefix: str) -> None:
        self.client = client
        self.stores: list[PersistenceLayer] = []
        self.raw: list[Any] = []
        node = cluster.nodes[0]
        config = IdempotencyConfig(wait_for_in_progress_seconds=0)
        for _lane in range(LANES):
            if client == "redis-url":
                store = store_from_url(f"{node.url}?cluster=true&client=redis")
            elif client == "glide-url":
                store = store_from_url(f"{node.url}?cluster=true&client=glide")
            else:
                raw = aioredis.RedisCluster(host=node.host, port=node.port)
                self.raw.append(raw)
                store = CachePersistenceLayer(client=raw)
            self.stores.append(store)
        self.engines = [
            IdempotencyEngine(store, config, key_prefix=prefix) for store in self.stores
        ]

    async def aclose(self) -> None:
        for store in self.stores:
            await store.aclose()
        for raw in self.raw:
            await raw.aclose()


def labels_in_slots(
    cluster: ReplicatedCluster, engine: IdempotencyEngine, slots: set[int], count: int
) -> list[tuple[int, str, str]]:
    """`count` (slot, label, key) whose keys fall in `slots`, in slot order."""
    found: list[tuple[int, str, str]] = []
    for index in range(count * 16384):
        label = f"k{index}"
        key = engine.idempotency_key(Workload.payload(label))
        slot = cluster.slot(key)
        if slot in slots:
            found.append((slot, label, key))
            if len(found) == count:
                return sorted(found)
    raise AssertionError("not enough keys in the moved slots")


@pytest.mark.parametrize("client", CLIENTS)
async def test_slot_migration_runs_no_key_twice(
    cluster: ReplicatedCluster, counter: aioredis.Redis, client: str
) -> None:
    prefix = f"mig-{client}-{uuid.uuid4().hex[:8]}"
    lanes = Lanes(cluster, client, prefix)
    workload = Workload(counter, prefix)
    try:
        primaries = cluster.primaries()
        source = max(primaries, key=lambda p: sum(h - lo + 1 for lo, h in cluster.slot_ranges(p)))
        target = next(p for p in primaries if p is not source)
        low, high = cluster.slot_ranges(source)[0]
        slots = list(range(low, min(high, low + SLOTS_MOVED - 1) + 1))
        chosen = labels_in_slots(cluster, lanes.engines[0], set(slots), KEYS)

        # Warm the clients up (topology discovery) before the storm.
        for lane, engine in enumerate(lanes.engines):
            await workload.call(engine, f"warm{lane}", lane)

        async def one_key(label: str) -> None:
            await asyncio.gather(
                *(workload.call(engine, label, lane) for lane, engine in enumerate(lanes.engines))
            )

        # The migration thread stops in each half-moved state of a slot that holds keys
        # until every lane has called those keys (events, not timing).
        loop = asyncio.get_running_loop()
        by_slot: dict[int, list[str]] = collections.defaultdict(list)
        for slot, label, _key in chosen:
            by_slot[slot].append(label)
        requests: asyncio.Queue[tuple[int, threading.Event]] = asyncio.Queue()

        def on_slot(slot: int, phase: str) -> None:
            if slot not in by_slot:
                return
            served = threading.Event()
            loop.call_soon_threadsafe(requests.put_nowait, (slot, served))
            if not served.wait(HANDSHAKE_SECONDS):
                raise RuntimeError(f"no calls on slot {slot} ({phase}) in time")

        async def serve() -> None:
            while True:
                slot, served = await requests.get()
                try:
                    await asyncio.gather(*(one_key(label) for label in by_slot[slot]))
                finally:
                    served.set()

        server = asyncio.ensure_future(serve())
        migration = asyncio.ensure_future(
            asyncio.to_thread(cluster.migrate_slots, source, target, slots, on_slot=on_slot)
        )
        window = asyncio.Semaphore(WINDOW)

        async def bounded(label: str) -> None:
            async with window:
                await one_key(label)

        # Meanwhile, passes over all keys in key order interleave at random.
        started = time.monotonic()
        passes = 0
        deadline = started + STORM_SECONDS
        while not migration.done() and passes < MAX_PASSES and time.monotonic() < deadline:
            await asyncio.gather(*(bounded(label) for _slot, label, _key in chosen))
            passes += 1
        storm_seconds = time.monotonic() - started
        try:
            moved = await asyncio.wait_for(migration, STORM_SECONDS)
        finally:
            server.cancel()
        migration_seconds = time.monotonic() - started
        cluster.wait_ok()
        # After the migration: once more per key; a stored result must replay.
        await asyncio.gather(*(bounded(label) for _slot, label, _key in chosen))

        stored = {label: stored_run(cluster, key) for _slot, label, key in chosen}
        for lane in range(LANES):
            label = f"warm{lane}"
            key = lanes.engines[0].idempotency_key(Workload.payload(label))
            stored[label] = stored_run(cluster, key)
        findings = await workload.findings(stored)
        print(
            f"\n[{cluster.kind} {client}] keys={len(chosen)} slots={len(slots)} "
            f"passes={passes} keys_moved={moved} passes_s={storm_seconds:.1f} "
            f"migration_s={migration_seconds:.1f} total_s={time.monotonic() - started:.1f} "
            f"{findings.summary()}"
        )
        assert all(cluster.primary_for(key) is target for _slot, _label, key in chosen)
        assert not findings.foreign_errors, findings.foreign_errors[:5]
        assert not findings.double_runs, findings.double_runs[:5]
        assert not findings.split_results, findings.split_results[:5]
        assert not findings.returned_not_stored, findings.returned_not_stored[:5]
        assert not findings.claim_lost_but_stored, findings.claim_lost_but_stored[:5]
        assert not findings.cause_cycles, findings.cause_cycles[:3]
        # A redirection or a slot in motion is worth a retry: never a permanent error.
        permanent = [
            f"{call.label}: {call.error!r}"
            for call in workload.calls
            if isinstance(call.error, IdempotencyPersistenceLayerError) and not call.error.transient
        ]
        assert not permanent, permanent[:3]
    finally:
        await lanes.aclose()
