"""A primary is killed while calls run: errors are transient and the same store recovers.

Errors raised while a replica takes over must be marked transient
(`IdempotencyPersistenceConnectionError`, ``.transient is True``) so callers
and the middleware can retry, and the store object in use must work again once the
cluster is back, without being rebuilt. Keys whose record reached the replica before
the kill must not run again; keys acknowledged but not yet replicated may (that loss is
`test_cluster_durability.py`'s subject) and are only counted.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import pytest
import redis.asyncio as aioredis

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyPersistenceLayerError,
)
from aioidempotency.persistence import store_from_url
from tests.faults.cluster import SCALE, ReplicatedCluster, Workload, scaled, stored_runs
from tests.servers.redis import Kind

pytestmark = pytest.mark.timeout(180)

KINDS: list[Kind] = ["valkey", "redis"] if SCALE == "full" else ["valkey"]
CLIENTS = ["redis", "glide"]
WORKERS = 8
WARM_UP_CALLS = scaled(ci=40, full=200)
CALLS_AFTER_RECOVERY = scaled(ci=60, full=300)
RECOVERY_SECONDS = 30.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("client", CLIENTS)
async def test_failover_errors_are_transient_and_the_store_recovers(
    counter: aioredis.Redis, client: str, kind: Kind
) -> None:
    prefix = f"fo-{client}-{uuid.uuid4().hex[:8]}"
    with ReplicatedCluster.start(kind) as cluster:
        seed = cluster.nodes[0]
        victim = next(p for p in cluster.primaries() if p is not seed)
        replica = cluster.replica_of(victim)
        store = store_from_url(f"{seed.url}?cluster=true&client={client}")
        engine = IdempotencyEngine(
            store, IdempotencyConfig(wait_for_in_progress_seconds=0), key_prefix=prefix
        )
        workload = Workload(counter, prefix)
        # Every key is in the victim's slots, so every call meets the failover.
        ranges = cluster.slot_ranges(victim)

        def on_victim(label: str) -> bool:
            slot = cluster.slot(engine.idempotency_key(Workload.payload(label)))
            return any(low <= slot <= high for low, high in ranges)

        labels = filter(on_victim, (f"k{i}" for i in itertools.count()))
        try:
            killed_at = recovered_at = 0.0
            streak = 0
            succeeded = 0
            warm = asyncio.Event()
            stop = asyncio.Event()

            async def worker() -> None:
                nonlocal streak, succeeded
                while not stop.is_set():
                    call = await workload.call(engine, next(labels), 0)
                    if call.error is None:
                        succeeded += 1
                        if succeeded >= WARM_UP_CALLS:
                            warm.set()
                        if recovered_at and call.started > recovered_at:
                            streak += 1
                            if streak >= CALLS_AFTER_RECOVERY:
                                stop.set()
                    elif recovered_at and call.started > recovered_at:
                        streak = 0

            async def conductor() -> None:
                nonlocal killed_at, recovered_at
                await warm.wait()
                killed_at = time.monotonic()
                cluster.kill(victim)
                await asyncio.to_thread(cluster.wait_primary, replica, RECOVERY_SECONDS)
                recovered_at = time.monotonic()

            workers = [asyncio.ensure_future(worker()) for _ in range(WORKERS)]
            await asyncio.wait_for(conductor(), RECOVERY_SECONDS + 10)
            try:
                await asyncio.wait_for(stop.wait(), RECOVERY_SECONDS)
            finally:
                stop.set()
                await asyncio.gather(*workers)

            storm = list(workload.calls)
            errors = [call for call in storm if call.error is not None]
            # Once more per key: a record the replica had must replay, not run again.
            limit = asyncio.Semaphore(WORKERS)

            async def again(label: str) -> None:
                async with limit:
                    await workload.call(engine, label, 1)

            called = sorted({call.label for call in storm})
            await asyncio.gather(*(again(label) for label in called))
            keys = {engine.idempotency_key(Workload.payload(label)): label for label in called}
            stored = {keys[key]: run for key, run in stored_runs(cluster, keys).items()}
            findings = await workload.findings(stored)
        finally:
            await store.aclose()

    first_error = min((call.started for call in errors), default=killed_at)
    last_error = max((call.ended for call in errors), default=killed_at)
    lost = {entry.split(":")[0] for entry in findings.returned_not_stored}
    reran = [entry for entry in findings.double_runs if entry.split(":")[0] not in lost]
    locked = [
        call.label
        for call in workload.calls[len(storm) :]
        if isinstance(call.error, IdempotencyAlreadyInProgressError)
    ]
    slowest = max(call.ended - call.started for call in storm)
    print(
        f"\n[{kind} {client}] failover took {recovered_at - killed_at:.2f}s; "
        f"slowest call {slowest:.2f}s; errors for "
        f"{last_error - first_error:.2f}s ({len(errors)} of {len(storm)} calls); "
        f"acknowledged-not-replicated={len(lost)} locked-after={len(locked)} "
        f"{findings.summary()}"
    )
    assert not findings.foreign_errors, findings.foreign_errors[:5]
    not_transient = [
        f"{call.label}: {error!r} <- {error.__cause__!r}"
        for call in errors
        if (error := call.error) is not None  # all of `errors`
        and not (isinstance(error, IdempotencyPersistenceLayerError) and error.transient)
    ]
    assert not not_transient, not_transient[:5]
    # The same store object recovered: the last CALLS_AFTER_RECOVERY calls succeeded.
    assert streak >= CALLS_AFTER_RECOVERY
    # Keys whose record survived on the promoted replica ran once.
    assert not reran, reran[:5]
    assert not findings.split_results or all(
        entry.split(":")[0] in lost for entry in findings.split_results
    ), findings.split_results[:5]
    assert not findings.claim_lost_but_stored, findings.claim_lost_but_stored[:5]
