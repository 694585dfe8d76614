"""Failover after the replica lagged: acknowledged writes are lost without durability.

Replication is asynchronous, so a claim or a COMPLETED record that a primary
acknowledged and that its replica had not copied yet is gone once the replica is
promoted, and the key runs again with no error to anyone.

- `test_failover_loses_an_acknowledged_completion_without_durability` demonstrates the
  documented risk: it asserts that the record is gone and that the key runs again.
- The `wait_replicas` tests are written to the durability option
  (``wait_replicas=1&wait_timeout=0.5`` in the store URL: `WAIT` after the claim and the
  completion): with the replica paused the claim fails with a transient typed error and
  is released instead of being acknowledged; with the replica running the claim and the
  completion succeed and survive a failover.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from aioidempotency import CachePersistenceLayer, IdempotencyConfig, IdempotencyEngine
from aioidempotency.exceptions import IdempotencyError, IdempotencyPersistenceLayerError
from aioidempotency.persistence import PersistenceLayer
from tests.faults.cluster import ClusterNode, ReplicatedCluster, Workload, wait_until

pytestmark = pytest.mark.timeout(120)

CLIENTS = ["redis", "glide"]
DURABLE = "&wait_replicas=1&wait_timeout=0.5"
GETACK_BYTES = len(b"*3\r\n$8\r\nREPLCONF\r\n$6\r\nGETACK\r\n$1\r\n*\r\n")


@pytest.fixture
def cluster() -> Iterator[ReplicatedCluster]:
    with ReplicatedCluster.start("valkey") as cluster:
        yield cluster


def setup(
    cluster: ReplicatedCluster, client: str, store: PersistenceLayer, prefix: str
) -> tuple[IdempotencyEngine, str, str, ClusterNode, ClusterNode]:
    """An engine on `store`, and a label whose key lives on a primary other than the seed
    node the store connects to; returns (engine, label, key, primary, its replica)."""
    engine = IdempotencyEngine(
        store, IdempotencyConfig(wait_for_in_progress_seconds=0), key_prefix=prefix
    )
    seed = cluster.nodes[0]
    for label in (f"k{i}" for i in itertools.count()):
        key = engine.idempotency_key(Workload.payload(label))
        primary = cluster.primary_for(key)
        if primary is not seed:
            return engine, label, key, primary, cluster.replica_of(primary)
    raise AssertionError("unreachable")  # pragma: no cover


def url(cluster: ReplicatedCluster, client: str) -> str:
    return f"{cluster.nodes[0].url}?cluster=true&client={client}"


@pytest.mark.parametrize("client", CLIENTS)
async def test_failover_loses_an_acknowledged_completion_without_durability(
    cluster: ReplicatedCluster, counter: aioredis.Redis, client: str
) -> None:
    prefix = f"lost-{client}-{uuid.uuid4().hex[:8]}"
    store = CachePersistenceLayer.from_url(url(cluster, client))
    workload = Workload(counter, prefix)
    try:
        engine, label, key, primary, replica = setup(cluster, client, store, prefix)
        with cluster.pause_replication(replica):
            first = await workload.call(engine, label, 0)
            assert first.error is None, first.error
            stored = primary.get(key)
            assert stored is not None
            assert '"COMPLETED"' in stored  # acknowledged and stored
            cluster.kill(primary)
        cluster.failover(replica, takeover=True)
        cluster.wait_ok()
        # The documented risk: the promoted replica never saw the record ...
        assert replica.get(key) is None
        # ... so the same key runs a second time, and nobody is told.
        second = await workload.call(engine, label, 0)
        assert second.error is None, second.error
        assert second.result["run"] != first.result["run"]
        assert (await workload.executions())[label] == 2
    finally:
        await store.aclose()


@pytest.mark.parametrize("client", CLIENTS)
async def test_durable_claim_is_refused_and_released_while_the_replica_lags(
    cluster: ReplicatedCluster, counter: aioredis.Redis, client: str
) -> None:
    prefix = f"wait-{client}-{uuid.uuid4().hex[:8]}"
    store = CachePersistenceLayer.from_url(url(cluster, client) + DURABLE)
    workload = Workload(counter, prefix)
    try:
        engine, label, key, primary, replica = setup(cluster, client, store, prefix)
        with cluster.pause_replication(replica):
            call = await workload.call(engine, label, 0)
            # Not acknowledged: a transient typed error, and the function did not run.
            assert isinstance(call.error, IdempotencyError), call.error
            assert isinstance(call.error, IdempotencyPersistenceLayerError), repr(call.error)
            assert call.error.transient is True, repr(call.error)
            assert call.ran is None
            assert (await workload.executions()).get(label, 0) == 0
            # The claim the primary holds is released (the engine may do it in the
            # background: bounded poll).
            wait_until(lambda: primary.get(key) is None, f"release of {key}")
        cluster.wait_stable()
        # With the replica back, the same key runs once and is stored.
        again = await workload.call(engine, label, 0)
        assert again.error is None, repr(again.error)
        assert again.ran is not None
        assert (await workload.executions())[label] == 1
    finally:
        await store.aclose()


@pytest.mark.parametrize("client", CLIENTS)
async def test_durable_completion_survives_a_failover(
    cluster: ReplicatedCluster, counter: aioredis.Redis, client: str
) -> None:
    prefix = f"keep-{client}-{uuid.uuid4().hex[:8]}"
    store = CachePersistenceLayer.from_url(url(cluster, client) + DURABLE)
    workload = Workload(counter, prefix)
    try:
        engine, label, key, primary, replica = setup(cluster, client, store, prefix)
        first = await workload.call(engine, label, 0)
        # Acknowledged with WAIT: the replica had confirmed the completion before the
        # call returned. WAIT makes the primary send `REPLCONF GETACK *` after the write
        # it waits for, so the acknowledged offset may trail by that command alone;
        # without WAIT the replica confirms only on its once-a-second report.
        offset, acked = primary.replication_offsets()
        assert first.error is None, repr(first.error)
        assert acked
        assert offset - max(acked) <= GETACK_BYTES, (offset, acked)
        assert '"COMPLETED"' in (replica.get(key) or "")
        cluster.kill(primary)
        cluster.failover(replica, takeover=True)
        cluster.wait_ok()
        second = await workload.call(engine, label, 0)
        assert second.error is None, repr(second.error)
        assert second.ran is None  # replayed
        assert second.result == first.result
        assert (await workload.executions())[label] == 1
    finally:
        await store.aclose()
