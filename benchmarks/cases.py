"""The cases of a run, and the `Bench` that builds their targets and measures them.

Groups:

- ``in-memory``: no server; the library's own CPU per call (aioidempotency's
  `InMemoryPersistenceLayer` against Powertools on an equivalent dict layer), and what
  the engine's events cost (`EVENTS`: no listener, a no-op listener, DEBUG logging to a
  `NullHandler`).
- ``valkey``: one Valkey server; the floor (raw redis-py and glide), Powertools
  (sync redis-py) and aioidempotency (async and sync shim; redis-py and glide; atomic
  and protocol paths).
- ``valkey-replica``: a Valkey primary with one replica; aioidempotency (async, glide
  and redis-py, atomic path) with ``wait_replicas=0`` and ``wait_replicas=1``: what a
  synchronous replica acknowledgement (``WAIT``) costs.
- ``batch``: 100-record SQS batches on the ``valkey`` server, `process_batch_sync`
  (glide) against Powertools' `BatchProcessor` (`benchmarks.batch`); one call is one
  batch.
- ``valkey-cluster``: a 3-node Valkey cluster; the floor (raw glide and redis-py cluster
  clients) and aioidempotency (async, atomic path) at concurrency 100, first executions
  and replays, interleaved in every round.
- ``dynamodb``: one moto server; throughput is reported as a ratio to Powertools.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from aioidempotency import (
    CachePersistenceLayer,
    IdempotencyConfig,
    PersistenceLayer,
)
from aioidempotency._twins import as_sync_store
from benchmarks import batch
from benchmarks.counting import (
    RequestCounter,
    count_botocore,
    count_glide,
    count_glide_sync,
    count_redis_async,
    count_redis_sync,
)
from benchmarks.runner import KeyStream, RunStats, run_async, run_threads
from benchmarks.servers import ChildServer, ReplicatedValkey, ValkeyCluster
from benchmarks.targets import (
    PowertoolsMemoryLayer,
    Target,
    attach_counter,
    counting_memory_store,
    floor_dynamodb,
    floor_glide,
    floor_glide_pipelined,
    floor_glide_scripts,
    floor_redis_async,
    floor_redis_pipelined,
    floor_redis_sync,
    ours_async,
    ours_sync,
    powertools,
)

__all__ = [
    "BATCH",
    "CLUSTER",
    "EVENTS",
    "PIPELINED",
    "REPLICA",
    "UNPIPELINED",
    "WAIT",
    "Bench",
    "Budget",
    "Spec",
    "case_list",
    "needs_fresh_loop",
]

SIZES = (100, 10_000, 200_000)
CONCURRENCY = (1, 10, 100, 1000)
THREADS = 16
TABLE = "idempotency-bench"
REDIS_POOL = 100
SCENARIOS = ("first", "replay", "duplicates", "cache-hit")
REPLICA = "valkey-replica"
CLUSTER = "valkey-cluster"
BATCH = "batch"
WAIT = "wait_replicas=1"  # the variant of a valkey-replica case that waits for the replica
PIPELINED = "auto_pipeline"  # ours with auto_pipeline=True; the floor sending batches
UNPIPELINED = "no-auto_pipeline"  # ours with auto_pipeline=False (the default is on)
BATCH_WORK_MS = (0, 1, 5)
EVENTS = ("events-off", "events-noop", "events-debug", "events-otel")
"""Variants of the in-memory first call: no event listener and DEBUG off (the default
config, measured back to back with the others), a listener that does nothing, the
``aioidempotency`` loggers at DEBUG into a `logging.NullHandler`, and OpenTelemetry
(`instrument()` with the SDK's providers: every span sampled and exported to an
exporter that drops it, metrics read by an in-memory reader)."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """One case: who, on what, how many at once, which scenario, which payload size.

    `mode` is ``async`` (`concurrency` tasks on one event loop) or ``sync``
    (`concurrency` threads; 1 = sequential). `variant` marks a twin of a case with one
    setting changed (``no-lease``: ``in_progress_lease_seconds=None``; `WAIT`:
    ``wait_replicas=1``; `PIPELINED`: ``auto_pipeline=True``, and for the floor its
    commands sent as batches, see `benchmarks.pipelining`; `UNPIPELINED`:
    ``auto_pipeline=False``, the store's default being on). A `headline` case is
    measured in every round, back to back with the others (see `benchmarks.run`), and
    its median kept. `work_ms`: the I/O wait of each record of a batch case.
    """

    group: str
    library: str
    client: str
    path: str
    mode: str
    concurrency: int
    scenario: str
    payload: int = 100
    variant: str = ""
    headline: bool = False
    work_ms: int = 0

    @property
    def id(self) -> str:
        parts = [self.group, self.library, self.client, self.path or "-", self.mode]
        parts += [f"c{self.concurrency}", self.scenario, f"{self.payload}B"]
        if self.variant:
            parts.append(self.variant)
        if self.work_ms:
            parts.append(f"work{self.work_ms}ms")
        return "/".join(parts)


def _valkey_cases() -> Iterator[Spec]:
    v = "valkey"
    ours_clients = [("redis-py", "atomic"), ("redis-py", "protocol")]
    ours_clients += [("glide", "atomic"), ("glide", "protocol")]
    # The headline comparison first and back to back: same minute, same noise.
    yield Spec(v, "floor", "glide", "", "async", 100, "first", headline=True)
    yield Spec(v, "aioidempotency", "glide", "atomic", "async", 100, "first", headline=True)
    yield Spec(v, "powertools", "redis-py", "", "sync", THREADS, "first", headline=True)
    yield Spec(
        v, "aioidempotency", "glide", "atomic", "async", 100, "first", variant="no-lease",
        headline=True,
    )  # fmt: skip
    yield Spec(
        v, "floor", "glide", "atomic", "async", 100, "first", variant="scripts", headline=True
    )
    for scenario in ("first", "replay"):
        yield Spec(v, "floor", "redis-py", "", "sync", 1, scenario, headline=True)
        yield Spec(v, "powertools", "redis-py", "", "sync", 1, scenario, headline=True)
        yield Spec(v, "aioidempotency", "redis-py", "atomic", "sync", 1, scenario, headline=True)
    yield Spec(v, "aioidempotency", "glide", "atomic", "async", 1, "cache-hit", headline=True)
    # Everything else at 100 B.
    for scenario in ("first", "replay"):
        for concurrency in CONCURRENCY:
            for client in ("redis-py", "glide"):
                yield Spec(v, "floor", client, "", "async", concurrency, scenario)
            for client, path in ours_clients:
                yield Spec(v, "aioidempotency", client, path, "async", concurrency, scenario)
        for threads in (1, THREADS):
            yield Spec(v, "floor", "redis-py", "", "sync", threads, scenario)
            yield Spec(v, "powertools", "redis-py", "", "sync", threads, scenario)
            for client, path in ours_clients:
                yield Spec(v, "aioidempotency", client, path, "sync", threads, scenario)
    for concurrency in CONCURRENCY[1:]:
        for client in ("redis-py", "glide"):
            yield Spec(v, "floor", client, "", "async", concurrency, "duplicates")
        for client, path in ours_clients:
            yield Spec(v, "aioidempotency", client, path, "async", concurrency, "duplicates")
    yield Spec(v, "floor", "redis-py", "", "sync", THREADS, "duplicates")
    yield Spec(v, "powertools", "redis-py", "", "sync", THREADS, "duplicates")
    for client, path in ours_clients:
        yield Spec(v, "aioidempotency", client, path, "sync", THREADS, "duplicates")
    yield Spec(v, "powertools", "redis-py", "", "sync", 1, "cache-hit")
    for client in ("redis-py", "glide"):
        yield Spec(v, "aioidempotency", client, "atomic", "async", 1, "cache-hit")
        yield Spec(v, "aioidempotency", client, "atomic", "sync", 1, "cache-hit")
    yield Spec(v, "aioidempotency", "glide", "atomic", "async", 100, "cache-hit")
    # Payload sizes.
    for payload in SIZES[1:]:
        for scenario in ("first", "replay"):
            for concurrency in (1, 100):
                yield Spec(v, "floor", "glide", "", "async", concurrency, scenario, payload)
                yield Spec(
                    v, "aioidempotency", "glide", "atomic", "async", concurrency, scenario, payload
                )
            yield Spec(v, "aioidempotency", "redis-py", "atomic", "async", 100, scenario, payload)
            for threads in (1, THREADS):
                yield Spec(v, "floor", "redis-py", "", "sync", threads, scenario, payload)
                yield Spec(v, "powertools", "redis-py", "", "sync", threads, scenario, payload)
                yield Spec(
                    v, "aioidempotency", "redis-py", "atomic", "sync", threads, scenario, payload
                )


def _replica_cases() -> Iterator[Spec]:
    """Each case without and with ``wait_replicas=1``, back to back in every round."""
    for scenario in ("first", "replay"):
        for concurrency in (1, 100):
            for client in ("glide", "redis-py"):
                for variant in ("", WAIT):
                    yield Spec(
                        REPLICA, "aioidempotency", client, "atomic", "async", concurrency,
                        scenario, variant=variant, headline=True,
                    )  # fmt: skip


def _cluster_cases() -> Iterator[Spec]:
    """Each client's floor and aioidempotency (atomic path), back to back in every round."""
    for scenario in ("first", "replay"):
        for client in ("glide", "redis-py"):
            yield Spec(CLUSTER, "floor", client, "", "async", 100, scenario, headline=True)
            yield Spec(
                CLUSTER, "aioidempotency", client, "atomic", "async", 100, scenario,
                headline=True,
            )  # fmt: skip


def _batch_cases(smoke: bool) -> Iterator[Spec]:
    """process_batch_sync (glide, async def and plain def record handlers) and Powertools,
    on new records, at each amount of work per record (0 ms only in a smoke run)."""
    for work_ms in BATCH_WORK_MS[:1] if smoke else BATCH_WORK_MS:
        for path in ("async-def", "plain-def"):
            yield Spec(
                BATCH, "aioidempotency", "glide", path, "sync", 1, "first",
                headline=True, work_ms=work_ms,
            )  # fmt: skip
        yield Spec(
            BATCH, "powertools", "redis-py", "", "sync", 1, "first", headline=True, work_ms=work_ms
        )


def _memory_cases() -> Iterator[Spec]:
    m = "in-memory"
    for payload in SIZES:
        for scenario in ("first", "replay", "cache-hit"):
            if scenario == "cache-hit" and payload != SIZES[0]:
                continue
            yield Spec(m, "aioidempotency", "in-memory", "", "async", 1, scenario, payload)
            yield Spec(m, "powertools", "in-memory", "", "sync", 1, scenario, payload)
            if payload == SIZES[0]:
                yield Spec(m, "aioidempotency", "in-memory", "", "sync", 1, scenario, payload)
    yield Spec(m, "aioidempotency", "in-memory", "", "async", 1, "first", variant="no-lease")
    for variant in EVENTS:  # measured in every round, back to back: compare them
        yield Spec(
            m, "aioidempotency", "in-memory", "", "async", 1, "first", variant=variant,
            headline=True,
        )  # fmt: skip


def _dynamodb_cases() -> Iterator[Spec]:
    d = "dynamodb"
    for scenario in ("first", "replay"):
        for threads in (1, THREADS):
            yield Spec(d, "powertools", "boto3", "", "sync", threads, scenario)
            yield Spec(d, "aioidempotency", "aiobotocore", "", "sync", threads, scenario)
        for concurrency in CONCURRENCY:
            yield Spec(d, "floor", "aiobotocore", "", "async", concurrency, scenario)
            yield Spec(d, "aioidempotency", "aiobotocore", "", "async", concurrency, scenario)
    yield Spec(d, "powertools", "boto3", "", "sync", THREADS, "duplicates")
    yield Spec(d, "aioidempotency", "aiobotocore", "", "sync", THREADS, "duplicates")
    yield Spec(d, "aioidempotency", "aiobotocore", "", "async", 100, "duplicates")
    for payload in SIZES[1:]:
        for scenario in ("first", "replay"):
            yield Spec(d, "powertools", "boto3", "", "sync", 1, scenario, payload)
            yield Spec(d, "aioidempotency", "aiobotocore", "", "sync", 1, scenario, payload)
            yield Spec(d, "aioidempotency", "aiobotocore", "", "async", 10, scenario, payload)


def needs_fresh_loop(spec: Spec) -> bool:
    """True for glide off the bench's loop: the sync shim on glide and the batch cases
    (glide on the Lambda handler loop); they run last in their group, after
    `Bench.new_loop`."""
    return (spec.client == "glide" and spec.mode == "sync") or spec.group == BATCH


ALL_GROUPS = ("in-memory", "valkey", REPLICA, CLUSTER, BATCH, "dynamodb")


def case_list(groups: tuple[str, ...] = ALL_GROUPS, *, smoke: bool = False) -> list[Spec]:
    """Every case of a run, in the order they run (see `needs_fresh_loop`); a `smoke`
    run has fewer batch cases."""
    makers: dict[str, Callable[[], Iterator[Spec]]] = {
        "in-memory": _memory_cases,
        "valkey": _valkey_cases,
        REPLICA: _replica_cases,
        CLUSTER: _cluster_cases,
        BATCH: lambda: _batch_cases(smoke),
        "dynamodb": _dynamodb_cases,
    }
    specs: dict[str, Spec] = {}
    for group in groups:
        for spec in sorted(makers[group](), key=needs_fresh_loop):
            specs.setdefault(spec.id, spec)  # a headline case is not measured twice
    return list(specs.values())


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long and how many calls each case gets."""

    smoke: bool = False
    duration: float = 1.0
    headline_duration: float = 1.5
    rounds: int = 3
    memory_duration: float = 0.5
    replay_pool: int = 200

    def duration_of(self, spec: Spec) -> float:
        if self.smoke:
            return 0.5
        if spec.group in ("dynamodb", BATCH):
            return 20.0  # count-bound; a safety net only
        if spec.group == "in-memory":
            return self.memory_duration
        return self.headline_duration if spec.headline else self.duration

    def max_calls(self, spec: Spec) -> int:
        if spec.group == BATCH:  # batches of 100 records
            return 2 if self.smoke else {0: 20, 1: 10}.get(spec.work_ms, 6)
        if self.smoke:
            return 12 if spec.group == "dynamodb" else 30
        if spec.group == "dynamodb":
            return {1: 40, 10: 100, THREADS: 160, 100: 300}.get(spec.concurrency, 1000)
        return {100: 10**7, 10_000: 20_000}.get(spec.payload, 600)

    def warmup_calls(self, spec: Spec) -> int:
        if spec.group == BATCH:
            return 1
        if self.smoke:
            return min(spec.concurrency, 4)
        if spec.group == "dynamodb":
            return min(spec.concurrency, 20)
        return min(max(2 * spec.concurrency, 100), self.max_calls(spec))

    def memory_calls(self, spec: Spec) -> int:
        if spec.group == BATCH:
            return 1  # one batch
        if spec.group == "dynamodb" or (spec.library == "floor" and spec.group != "valkey"):
            return 0
        if self.smoke:
            return 4
        cap = {100: 2000, 10_000: 400}.get(spec.payload, 60)
        return min(max(spec.concurrency, 200), cap)

    def pool(self, spec: Spec) -> int:
        if self.smoke:
            return 4
        return 50 if spec.group == "dynamodb" else self.replay_pool


def _config(spec: Spec) -> IdempotencyConfig:
    return IdempotencyConfig(
        use_local_cache=spec.scenario == "cache-hit",
        in_progress_lease_seconds=None if spec.variant == "no-lease" else 60.0,
        on_event=_ignore if spec.variant == "events-noop" else None,
    )


def _ignore(event: object) -> None:
    """The no-op event listener of the ``events-noop`` variant."""


@contextlib.contextmanager
def _observing(spec: Spec) -> Iterator[None]:
    """What the ``events-debug`` and ``events-otel`` variants turn on while they run."""
    if spec.variant == "events-otel":
        with _opentelemetry():
            yield
        return
    with _logging_of(spec):
        yield


@contextlib.contextmanager
def _opentelemetry() -> Iterator[None]:
    """`instrument()` on the SDK's tracer and meter providers, undone afterwards."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from aioidempotency.integrations.opentelemetry import instrument

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(Dropped()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    stop = instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield
    finally:
        stop()
        tracer_provider.shutdown()
        meter_provider.shutdown()


@contextlib.contextmanager
def _logging_of(spec: Spec) -> Iterator[None]:
    """For the ``events-debug`` variant: the ``aioidempotency`` loggers at DEBUG into a
    `logging.NullHandler` (not propagated), as they were afterwards."""
    if spec.variant != "events-debug":
        yield
        return
    log = logging.getLogger("aioidempotency")
    handler = logging.NullHandler()
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


class Bench:
    """Builds each case's target on the run's servers and measures it.

    Async cases run on one long-lived event loop (glide clients are bound to the loop
    that made them); the sync shim's store lives on aioidempotency's background loop,
    the batch cases' on the Lambda handler loop (`end_batches` closes it).
    """

    def __init__(
        self,
        budget: Budget,
        valkey: ChildServer | None,
        moto: ChildServer | None,
        replicated: ReplicatedValkey | None = None,
        cluster: ValkeyCluster | None = None,
    ) -> None:
        self.budget = budget
        self.valkey = valkey
        self.moto = moto
        self.replicated = replicated
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self._clients: dict[str, tuple[Any, RequestCounter]] = {}
        self._stores: dict[str, PersistenceLayer] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._sync_closers: list[Callable[[], None]] = []
        self._table_ready = False
        self._measured = 0
        self._batch_store: tuple[CachePersistenceLayer, RequestCounter] | None = None

    # --- clients -----------------------------------------------------------------------
    def _shared(
        self, name: str, make: Callable[[RequestCounter], Any]
    ) -> tuple[Any, RequestCounter]:
        if name not in self._clients:
            counter = RequestCounter()
            self._clients[name] = (make(counter), counter)
        return self._clients[name]

    def _valkey_server(self) -> ChildServer:
        assert self.valkey is not None, "the valkey group needs a Valkey server"
        return self.valkey

    def _replica_primary(self) -> ChildServer:
        assert self.replicated is not None, f"the {REPLICA} group needs a replicated Valkey"
        return self.replicated.primary

    def _cluster_seed(self) -> ChildServer:
        assert self.cluster is not None, f"the {CLUSTER} group needs a Valkey cluster"
        return self.cluster.nodes[0]

    def _redis_cluster(self, counter: RequestCounter) -> Any:
        """redis.asyncio.RedisCluster: a pool per node, at most `REDIS_POOL` connections
        each (calls beyond wait for a free one)."""
        import redis.asyncio

        seed = self._cluster_seed()
        client = redis.asyncio.RedisCluster(
            host=seed.host, port=seed.port, max_connections=REDIS_POOL
        )
        self._closers.append(client.aclose)
        return count_redis_async(client, counter)

    async def _open_glide_cluster(self, counter: RequestCounter) -> Any:
        from glide import GlideClusterClient, GlideClusterClientConfiguration, NodeAddress

        seed = self._cluster_seed()
        config = GlideClusterClientConfiguration(
            [NodeAddress(seed.host, seed.port)], request_timeout=5000
        )
        return count_glide(await GlideClusterClient.create(config), counter)

    def _glide_cluster(self, counter: RequestCounter) -> Any:
        client = self.loop.run_until_complete(self._open_glide_cluster(counter))
        self._closers.append(client.close)
        return client

    def _moto_server(self) -> ChildServer:
        assert self.moto is not None, "the dynamodb group needs a moto server"
        return self.moto

    def _redis_async(self, counter: RequestCounter, server: ChildServer | None = None) -> Any:
        import redis.asyncio

        server = server or self._valkey_server()
        client = redis.asyncio.Redis(connection_pool=_blocking_pool(server))
        self._closers.append(client.aclose)
        return count_redis_async(client, counter)

    def _redis_sync(self, counter: RequestCounter, server: ChildServer | None = None) -> Any:
        import redis

        server = server or self._valkey_server()
        client = redis.Redis(host=server.host, port=server.port, max_connections=64)
        self._sync_closers.append(client.close)
        return count_redis_sync(client, counter)

    async def _open_glide(self, counter: RequestCounter, server: ChildServer | None = None) -> Any:
        from glide import GlideClient, GlideClientConfiguration, NodeAddress

        server = server or self._valkey_server()
        config = GlideClientConfiguration(
            [NodeAddress(server.host, server.port)], request_timeout=5000
        )
        return count_glide(await GlideClient.create(config), counter)

    def _glide(self, counter: RequestCounter, server: ChildServer | None = None) -> Any:
        client = self.loop.run_until_complete(self._open_glide(counter, server))
        self._closers.append(client.close)
        return client

    def _glide_sync(self, counter: RequestCounter, server: ChildServer | None = None) -> Any:
        from glide_sync import GlideClient, GlideClientConfiguration, NodeAddress

        server = server or self._valkey_server()
        config = GlideClientConfiguration(
            [NodeAddress(server.host, server.port)], request_timeout=5000
        )
        client = GlideClient.create(config)
        self._sync_closers.append(client.close)
        return count_glide_sync(client, counter)

    def _boto3(self, counter: RequestCounter) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(max_pool_connections=THREADS * 2)
        client = boto3.client("dynamodb", endpoint_url=self._moto_server().url, config=config)
        self._sync_closers.append(client.close)
        return count_botocore(client, counter)

    def _aiobotocore(self, counter: RequestCounter) -> Any:
        from aiobotocore.session import AioSession

        context = AioSession().create_client("dynamodb", endpoint_url=self._moto_server().url)
        client = self.loop.run_until_complete(context.__aenter__())

        async def close() -> None:
            await context.__aexit__(None, None, None)

        self._closers.append(close)
        return count_botocore(client, counter)

    def _ensure_table(self) -> None:
        if self._table_ready:
            return
        client, _ = self._shared("boto3", self._boto3)
        client.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        self._table_ready = True

    # --- aioidempotency stores -----------------------------------------------------------
    def _ours_store(self, spec: Spec) -> PersistenceLayer:
        if spec.client == "in-memory":
            return counting_memory_store(max_items=10**7)
        name = f"{spec.client}/{spec.path}/{spec.mode}"
        if spec.group == REPLICA:  # one store (and client) per wait_replicas setting
            name = f"{spec.group}/{spec.variant}/{name}"
        if spec.group == CLUSTER:
            name = f"{spec.group}/{name}"
        if spec.variant in (PIPELINED, UNPIPELINED):
            name = f"{name}/{spec.variant}"
        if name not in self._stores:
            self._stores[name] = self._open_store(spec)
        return self._stores[name]

    def _open_store(self, spec: Spec) -> PersistenceLayer:
        counter = RequestCounter()
        atomic = spec.path == "atomic"
        store: PersistenceLayer
        if spec.client == "aiobotocore":
            from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer

            self._ensure_table()
            dynamodb = DynamoDBPersistenceLayer(TABLE, endpoint_url=self._moto_server().url)
            if spec.mode == "async":
                count_botocore(self._in_loop(self.loop, dynamodb.client()), counter)
            else:  # sync code gets the store's boto3 twin
                count_botocore(as_sync_store(dynamodb).client(), counter)  # type: ignore[attr-defined]
            store = dynamodb
        elif spec.group == REPLICA:
            server = self._replica_primary()
            glide = spec.client == "glide"
            client = self._glide(counter, server) if glide else self._redis_async(counter, server)
            wait = 1 if spec.variant == WAIT else 0
            store = CachePersistenceLayer(client, atomic=atomic, wait_replicas=wait)
        elif spec.group == CLUSTER:
            glide = spec.client == "glide"
            client = self._glide_cluster(counter) if glide else self._redis_cluster(counter)
            store = CachePersistenceLayer(client, atomic=atomic)
        elif spec.mode == "async":
            client = self._glide(counter) if spec.client == "glide" else self._redis_async(counter)
            # The store's default (on) unless the case turns it off.
            pipelined = spec.variant != UNPIPELINED
            store = CachePersistenceLayer(client, atomic=atomic, auto_pipeline=pipelined)
        else:  # sync code: the native sync store, on the client Powertools users pass
            glide = spec.client == "glide"
            client = self._glide_sync(counter) if glide else self._redis_sync(counter)
            store = CachePersistenceLayer(client, atomic=atomic)
        if spec.mode == "async":
            self._closers.append(store.aclose)
        else:
            self._sync_closers.append(as_sync_store(store).close)
        return attach_counter(store, counter)

    def _in_loop(self, loop: asyncio.AbstractEventLoop, awaitable: Awaitable[Any]) -> Any:
        if loop is self.loop:
            return self.loop.run_until_complete(awaitable)

        async def wrapped() -> Any:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapped(), loop).result(timeout=30)

    # --- targets -------------------------------------------------------------------------
    def target(self, spec: Spec) -> Target:
        """The target of `spec`, on this run's clients."""
        if spec.group == BATCH:
            return self._batch(spec)
        if spec.library == "aioidempotency":
            store = self._ours_store(spec)
            make = ours_async if spec.mode == "async" else ours_sync
            return make(store, _config(spec), spec.payload)
        if spec.library == "powertools":
            return self._powertools(spec)
        return self._floor(spec)

    def _powertools(self, spec: Spec) -> Target:
        local_cache = spec.scenario == "cache-hit"
        layer: Any
        if spec.client == "in-memory":
            layer = PowertoolsMemoryLayer()
            counter = layer.operations
        elif spec.group == "valkey":
            from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
                RedisCachePersistenceLayer,
            )

            client, counter = self._shared("redis-sync/powertools", self._redis_sync)
            layer = RedisCachePersistenceLayer(client=client)
        else:
            from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer

            self._ensure_table()
            client, counter = self._shared("boto3", self._boto3)
            layer = DynamoDBPersistenceLayer(table_name=TABLE, boto3_client=client)
        return powertools(
            layer, lambda: counter.value, local_cache=local_cache, payload=spec.payload
        )

    def _batch(self, spec: Spec) -> Target:
        """A batch of 100 new records per call (`benchmarks.batch`) on the valkey server."""
        ran = RequestCounter()
        if spec.library == "powertools":
            from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
                RedisCachePersistenceLayer,
            )

            client, counter = self._shared("redis-sync/batch", self._redis_sync)
            run = batch.powertools(RedisCachePersistenceLayer(client=client), spec.work_ms, ran)
            return batch.batch_target(run, ran, lambda: counter.value)
        if self._batch_store is None:
            store_counter = RequestCounter()

            async def open_client() -> Any:  # on the Lambda handler loop
                return await self._open_glide(store_counter)

            store = CachePersistenceLayer(client_factory=open_client)
            self._batch_store = store, store_counter
        store, counter = self._batch_store
        run = batch.ours(store, spec.work_ms, plain=spec.path == "plain-def", ran=ran)
        return batch.batch_target(run, ran, lambda: counter.value)

    def end_batches(self) -> None:
        """Close the Lambda handler loop of the batch cases, and their store with it.

        glide reads every client's replies on the first loop that opened one, as long as
        that loop lives (see `new_loop`); closing this one lets the sync shim's glide
        client, measured next, read its own replies on its own loop.
        """
        from aioidempotency.aws_lambda import handler_loop

        handler_loop.close()  # awaits the store's aclose() (process_batch_sync asked it)
        self._batch_store = None

    def _floor(self, spec: Spec) -> Target:
        if spec.group == CLUSTER:
            if spec.client == "glide":
                client, counter = self._shared("glide-cluster/floor", self._glide_cluster)
                return floor_glide(client, counter, spec.payload)
            client, counter = self._shared("redis-cluster/floor", self._redis_cluster)
            return floor_redis_async(client, counter, spec.payload)
        if spec.variant == "scripts":
            client, counter = self._shared("glide/floor", self._glide)
            return floor_glide_scripts(client, counter, spec.payload)
        if spec.variant == PIPELINED and spec.client == "glide":
            client, counter = self._shared("glide/floor", self._glide)
            return floor_glide_pipelined(client, counter, spec.payload)
        if spec.variant == PIPELINED:
            client, counter = self._shared("redis-async/floor", self._redis_async)
            return floor_redis_pipelined(client, counter, spec.payload)
        if spec.client == "glide":
            client, counter = self._shared("glide/floor", self._glide)
            return floor_glide(client, counter, spec.payload)
        if spec.client == "aiobotocore":
            self._ensure_table()
            client, counter = self._shared("aiobotocore/floor", self._aiobotocore)
            return floor_dynamodb(client, counter, TABLE, spec.payload)
        if spec.mode == "async":
            client, counter = self._shared("redis-async/floor", self._redis_async)
            return floor_redis_async(client, counter, spec.payload)
        client, counter = self._shared("redis-sync/floor", self._redis_sync)
        return floor_redis_sync(client, counter, spec.payload)

    # --- measuring -----------------------------------------------------------------------
    def _prepare(self, target: Target, keys: list[str]) -> None:
        """Complete `keys` before a replay or cache-hit run (untimed)."""
        if target.is_async:

            async def complete_all() -> None:
                gate = asyncio.Semaphore(20)

                async def one(key: str) -> None:
                    async with gate:
                        await target.call(key)

                await asyncio.gather(*(one(key) for key in keys))

            self.loop.run_until_complete(complete_all())
        else:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(target.call, keys))

    def measure(self, spec: Spec) -> dict[str, Any]:
        """Run one case; its figures as a JSON-able dict."""
        budget = self.budget
        target = self.target(spec)
        stream = KeyStream(
            spec.scenario,
            prefix=f"{spec.id}#{self._measured}",  # fresh keys for every measurement
            pool=budget.pool(spec),
            group=spec.concurrency,
        )
        self._measured += 1
        if spec.scenario in ("replay", "cache-hit"):
            self._prepare(target, stream.replay_keys())
        options: dict[str, Any] = {
            "duration": budget.duration_of(spec),
            "max_calls": budget.max_calls(spec),
            "warmup_calls": budget.warmup_calls(spec),
            "memory_calls": budget.memory_calls(spec),
            "requests": target.requests,
            "executed": lambda: target.executed.value,
            "server_cpu": self._server_cpu(spec),
        }
        stats: RunStats
        with _observing(spec):
            if target.is_async:
                stats = self.loop.run_until_complete(
                    run_async(target.call, stream, concurrency=spec.concurrency, **options)
                )
            else:
                stats = run_threads(target.call, stream, threads=spec.concurrency, **options)
        if spec.group in ("valkey", BATCH, REPLICA, CLUSTER):
            self._flush(spec)
        return _figures(spec, stats)

    def _server(self, spec: Spec) -> ChildServer | None:
        """The server of `spec`'s store (the primary for the replicated group)."""
        if spec.group == REPLICA:
            return None if self.replicated is None else self.replicated.primary
        return {"valkey": self.valkey, BATCH: self.valkey, "dynamodb": self.moto}.get(spec.group)

    def _server_cpu(self, spec: Spec) -> Callable[[], float] | None:
        if spec.group == CLUSTER:  # the three nodes together
            return None if self.cluster is None else self.cluster.cpu_seconds
        server = self._server(spec)
        if server is None or not Path(f"/proc/{server.process.pid}/stat").exists():
            return None
        return server.cpu_seconds

    def _flush(self, spec: Spec) -> None:
        servers = [self._server(spec)]
        if spec.group == CLUSTER:
            servers = list(self.cluster.nodes) if self.cluster is not None else []
        for server in servers:
            if server is not None:
                name = f"redis-sync/admin/{server.port}"
                client, _ = self._shared(name, functools.partial(self._redis_sync, server=server))
                client.flushall()

    def new_loop(self) -> None:
        """Close the clients bound to the bench's event loop, the loop, and start a new one.

        valkey-glide 2.6 delivers every response of the process through one pipe whose
        reader sits on the loop that created the first glide client; a glide client on
        another loop (the sync shim's background loop) only gets answers while that
        first loop runs. Closing the first loop makes glide move the reader to the next
        loop that creates a client, so the sync shim's glide client is measured as it
        runs in a process that uses glide only through the shim.
        """
        self._close_loop_clients()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
        self.loop = asyncio.new_event_loop()

    def _close_loop_clients(self) -> None:
        for close in reversed(self._closers):
            try:
                self.loop.run_until_complete(close())
            except Exception as exc:  # closing must not hide the results
                print(f"warning: closing a client failed: {exc!r}")
        self._closers.clear()
        for name in [n for n in self._clients if n.split("/")[0] in _LOOP_BOUND]:
            del self._clients[name]
        for name in [n for n in self._stores if n.endswith("/async")]:
            del self._stores[name]

    def close(self) -> None:
        """Close every client this bench opened, then its loop."""
        if self._batch_store is not None:
            self.end_batches()
        self._close_loop_clients()
        for close_sync in reversed(self._sync_closers):
            try:
                close_sync()
            except Exception as exc:
                print(f"warning: closing a client failed: {exc!r}")
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def _blocking_pool(server: ChildServer) -> Any:
    """redis-py 8's asyncio pool refuses a 101st connection (`MaxConnectionsError`);
    a blocking pool of 100 makes call 101 wait for a free connection instead."""
    import redis.asyncio

    return redis.asyncio.BlockingConnectionPool(
        host=server.host, port=server.port, max_connections=REDIS_POOL, timeout=30
    )


_LOOP_BOUND = frozenset({"glide", "aiobotocore", "redis-async", "glide-cluster", "redis-cluster"})


def _figures(spec: Spec, stats: RunStats) -> dict[str, Any]:
    calls = stats.calls
    per_call: float | int | None = None
    if calls:
        per_call = stats.requests // calls if stats.requests % calls == 0 else None
        if per_call is None:
            per_call = round(stats.requests / calls, 3)
    return {
        "id": spec.id,
        "group": spec.group,
        "library": spec.library,
        "client": spec.client,
        "path": spec.path,
        "mode": spec.mode,
        "concurrency": spec.concurrency,
        "scenario": spec.scenario,
        "payload_bytes": spec.payload,
        "variant": spec.variant,
        "headline": spec.headline,
        "work_ms": spec.work_ms,
        "calls": calls,
        "seconds": round(stats.seconds, 4),
        "calls_per_s": round(stats.calls_per_second, 1),
        "p50_us": _rounded(stats.percentile_us(0.50)),
        "p99_us": _rounded(stats.percentile_us(0.99)),
        "requests": stats.requests,
        "requests_per_call": per_call,
        "cpu_us_per_call": round(stats.cpu_seconds / calls * 1e6, 1) if calls else None,
        "server_cpu_us_per_call": (
            None
            if stats.server_cpu_seconds is None or not calls
            else round(stats.server_cpu_seconds / calls * 1e6, 1)
        ),
        "peak_kib": None if stats.peak_bytes is None else round(stats.peak_bytes / 1024, 1),
        "executed": stats.executed,
        "replayed": stats.ok - stats.executed,
        "refused": stats.refused,
        "errors": stats.errors,
        "first_error": stats.first_error,
    }


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 1)
