"""Randomized histories on a Valkey cluster while a slot range moves and a primary fails over.

Worker processes (``python -m tests.faults.test_cluster_history worker``: the workers of
`tests.faults.history` on a cluster store) make random calls, some cancelled, some under
a tiny `asyncio.wait_for`, some whose function fails, on a few hundred keys of a 3 + 3
Valkey cluster (`ReplicatedCluster`). Meanwhile the test moves the slots holding one
primary's keys to a second primary, one step per few requests the workers make there;
with a slot half-moved (MIGRATING on the source, IMPORTING on the target) it freezes the
third primary (SIGSTOP) until the cluster has promoted its replica, then thaws it and
goes on while the old primary rejoins as a replica. Every execution is counted on a
standalone server; afterwards `tests.faults.history.check` checks invariants 1-5 of
docs/reliability.md on the recorded history.

Clients: valkey-glide built from a URL, redis-py's `RedisCluster` built from a URL, and
a `RedisCluster` the user builds and passes to `CachePersistenceLayer`. In each run two
groups of workers, on keys of their own, go through the same faults:

- with ``wait_replicas=1``: a claim or a completion is acknowledged only once the
  replica has it, so the failover loses none of them: every invariant is asserted;
- without it: replication is asynchronous, so the failover may lose a claim, a result
  or a release the primary had acknowledged, and invariants 1-3 may break (a key runs
  again, a returned result is no longer stored, a lost release leaves the claim). Those
  violations are recorded and printed as lost writes, NOT asserted; invariant 5 (typed,
  bounded errors) and the server-side counters must hold either way.

One line per group is printed (``pytest -s``), and the reports, with every violation and
the calls of up to 5 keys that broke an invariant, are saved to ``cluster-history.json``
in the test's tmp path. CI size: 1 seed, 2 workers x 2,500 calls on 60 keys per group;
``AIOIDEM_FAULT_SCALE=full``: 3 seeds, 3 workers x 3,000 calls on 300 keys per group.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency import CachePersistenceLayer
from aioidempotency.persistence import (
    InMemoryPersistenceLayer,
    PersistenceLayer,
    store_from_url,
)
from tests.faults.cluster import ClusterNode, ReplicatedCluster, wait_until
from tests.faults.history import (
    CallEntry,
    HistoryReport,
    RedisCounters,
    Spec,
    check,
    entries_from,
    final_state,
    read_spec,
    run_worker,
    write_entries,
    write_spec,
)
from tests.faults.scale import pick
from tests.faults.servers import ManagedServer

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CLIENTS = ["redis-url", "redis-user", "glide-url"]
SEEDS = pick(ci=[11], full=[11, 23, 37])
SIZE = pick(
    ci={"workers": 2, "calls": 2500, "keys": 60, "slots": 12},
    full={"workers": 3, "calls": 3000, "keys": 300, "slots": 32},
)
"""Per group: worker processes, calls per worker, keys; and at most how many slots move."""
DURABILITY = [1, 0]
"""The groups of a run: ``wait_replicas=1``, and none."""
CLIENT_TIMEOUT = 1.0
"""Socket / request timeout of the clients under test (seconds)."""
WAIT_TIMEOUT = 0.5
"""`wait_timeout` of the durable group: how long a claim or completion waits for the replica."""
WORKER_TIMEOUT = 300.0
PROGRESS_TIMEOUT = 30.0
"""How long the faults wait for the workers' first executions before failing."""
STEP_REQUESTS = 10
"""Key lookups on the source and the target per step of the migration."""
STEP_SECONDS = 0.2
"""How long a step of the migration waits for them, at most."""
FAILOVER_TIMEOUT = 20.0
MUST_HOLD_WITHOUT_WAIT = ("[5]", "[counters]")
"""What must hold when the failover may lose acknowledged writes (see the docstring)."""

MakeServer = Callable[..., ManagedServer]


# -- the store each client kind makes (worker processes and the checking test alike) -------


def make_store(info: dict[str, Any]) -> tuple[PersistenceLayer, aioredis.RedisCluster | None]:
    """The store `info` describes, and the client the user passed to it (to close after
    the store: a store does not close a client it was given)."""
    wait = int(info["wait_replicas"])
    host, port = info["host"], int(info["port"])
    if info["client"] == "redis-user":
        raw = aioredis.RedisCluster(
            host=host,
            port=port,
            socket_timeout=CLIENT_TIMEOUT,
            socket_connect_timeout=CLIENT_TIMEOUT,
        )
        store = CachePersistenceLayer(client=raw, wait_replicas=wait, wait_timeout=WAIT_TIMEOUT)
        return store, raw
    library = {"redis-url": "redis", "glide-url": "glide"}[info["client"]]
    durable = f"&wait_replicas={wait}&wait_timeout={WAIT_TIMEOUT}" if wait else ""
    url = f"redis://{host}:{port}?cluster=true&client={library}&timeout={CLIENT_TIMEOUT}"
    return store_from_url(url + durable), None


async def _worker(spec: Spec, worker: int) -> list[CallEntry]:
    store, raw = make_store(spec.store)
    try:
        return await run_worker(
            spec, worker, lambda: store, lambda _store: RedisCounters(spec.store["counter_url"])
        )
    finally:
        if raw is not None:
            await raw.aclose()


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.test_cluster_history")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run one worker of a spec, write its history")
    worker.add_argument("--spec", type=Path, required=True)
    worker.add_argument("--worker", type=int, required=True)
    worker.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    entries = asyncio.run(_worker(read_spec(args.spec), args.worker))
    write_entries(entries, args.out)
    print(f"worker {args.worker}: {len(entries)} calls", flush=True)
    return 0


@dataclasses.dataclass
class Group:
    """The workers of one durability setting in a run, on keys (a prefix) of their own,
    counting their executions on a counter server of their own."""

    wait_replicas: int
    spec: Spec
    counter: ManagedServer
    directory: Path
    entries: list[CallEntry] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return (
            f"{self.spec.store['client']} {'wait_replicas=1' if self.wait_replicas else 'no wait'}"
        )

    def idempotency_keys(self) -> list[str]:
        """The idempotency key of each of the group's payloads, by index."""
        engine = self.spec.engine(InMemoryPersistenceLayer(), self.spec.seeds[0])
        return [engine.idempotency_key(self.spec.payload(i)) for i in range(self.spec.keys)]


async def run_groups(
    groups: list[Group],
    workers: int,
    during: Callable[[list[asyncio.Future[Any]]], Awaitable[None]],
) -> None:
    """Run `workers` worker processes per group while `during()` runs; fills each group's
    `entries` with its workers' histories."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    procs: list[tuple[Group, Path, asyncio.subprocess.Process]] = []
    for group in groups:
        group.directory.mkdir(parents=True, exist_ok=True)
        write_spec(group.spec, group.directory / "spec.json")
    for worker in range(workers):  # the groups' workers interleaved: they start alike
        for group in groups:
            spec_path = group.directory / "spec.json"
            out = group.directory / f"worker-{worker}.jsonl"
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.faults.test_cluster_history",
                "worker",
                "--spec",
                str(spec_path),
                "--worker",
                str(worker),
                "--out",
                str(out),
                cwd=REPO,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            procs.append((group, out, proc))
    waits = [asyncio.ensure_future(proc.communicate()) for _, _, proc in procs]
    try:
        await during(list(waits))
        _done, pending = await asyncio.wait(waits, timeout=WORKER_TIMEOUT)
        assert not pending, "a worker did not finish in time"
    finally:
        for _, _, proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for (group, out, proc), wait in zip(procs, waits, strict=True):
        output = wait.result()[0].decode(errors="replace")
        assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{output[-4000:]}"
        group.entries.extend(entries_from(out))


# -- the faults ----------------------------------------------------------------------------


@dataclasses.dataclass
class Faults:
    """Who plays which part in one run, and when each fault began and ended
    (`time.monotonic()`, the clock of the workers' histories)."""

    source: ClusterNode
    target: ClusterNode
    victim: ClusterNode
    replica: ClusterNode
    slots: list[int]
    freeze_slot: int
    migration_started: float = 0.0
    frozen: float = 0.0
    promoted: float = 0.0
    thawed: float = 0.0
    migrated: float = 0.0
    stable: float = 0.0
    keys_moved: int = 0

    def timeline(self, first: float, last: float) -> str:
        """When each fault happened, in seconds after the first call (the last ended at
        `last`)."""
        moments = {
            "migration": self.migration_started,
            "frozen": self.frozen,
            "promoted": self.promoted,
            "thawed": self.thawed,
            "migrated": self.migrated,
            "stable": self.stable,
            "last call ended": last,
        }
        return ", ".join(f"{name} {at - first:+.2f}s" for name, at in moments.items())

    def line(self) -> str:
        return (
            f"migration {self.migrated - self.migration_started:.1f}s "
            f"({len(self.slots)} slots, {self.keys_moved} keys moved), "
            f"promotion {self.promoted - self.frozen:.1f}s after the freeze, "
            f"stable {self.stable - self.thawed:.1f}s after the thaw"
        )


def executions(server: ManagedServer) -> int:
    """How many executions the workers have counted so far (INCRs on the counter server)."""
    with server.admin(timeout=2.0) as client:
        stats = client.info("commandstats")
    # Valkey counts INCR under its alias INCRBY
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_incr", "cmdstat_incrby")
    )


def lookups(clients: list[redis.Redis]) -> int:
    """Key lookups (hits and misses) the nodes of `clients` have served: the workers'
    requests, and the migration's own reads of the keys it moves."""
    total = 0
    for client in clients:
        stats = client.info("stats")
        total += int(stats.get("keyspace_hits", 0)) + int(stats.get("keyspace_misses", 0))
    return total


def next_requests(clients: list[redis.Redis], after: int, done: threading.Event) -> int:
    """Wait until the nodes of `clients` have served `STEP_REQUESTS` more lookups than
    `after`, for at most `STEP_SECONDS` (or until the workers are done); returns the
    count then."""
    deadline = time.monotonic() + STEP_SECONDS
    while True:
        seen = lookups(clients)
        if seen >= after + STEP_REQUESTS or done.is_set() or time.monotonic() > deadline:
            return seen
        done.wait(0.002)  # polling interval of a bounded wait on other processes


def migrate_and_fail_over(
    cluster: ReplicatedCluster, faults: Faults, done: threading.Event
) -> None:
    """The migration, with the failover inside it (runs in a thread).

    Each half-moved state of each slot waits for more requests by the workers
    (`next_requests`), so the migration spreads over the calls instead of finishing in
    a few milliseconds; at `faults.freeze_slot`'s MIGRATING state the victim is frozen
    until its replica is the primary everywhere, then thawed."""
    with faults.source.admin() as source, faults.target.admin() as target:
        busy = [source, target]
        seen = lookups(busy)

        def on_slot(slot: int, phase: str) -> None:
            nonlocal seen
            seen = next_requests(busy, seen, done)
            if slot == faults.freeze_slot and phase == "migrating":
                faults.frozen = time.monotonic()
                cluster.freeze(faults.victim)
                cluster.wait_primary(faults.replica, FAILOVER_TIMEOUT)
                faults.promoted = time.monotonic()
                cluster.thaw(faults.victim)
                faults.thawed = time.monotonic()

        faults.migration_started = time.monotonic()
        faults.keys_moved = cluster.migrate_slots(
            faults.source, faults.target, faults.slots, on_slot=on_slot, tell_others=False
        )
    faults.migrated = time.monotonic()
    cluster.wait_stable(FAILOVER_TIMEOUT)
    faults.stable = time.monotonic()


async def conduct(
    cluster: ReplicatedCluster,
    faults: Faults,
    groups: list[Group],
    waits: list[asyncio.Future[Any]],
) -> None:
    """Once every group has made a quarter of its keys' first executions, migrate and
    fail over while the workers go on."""
    done = threading.Event()
    watcher = asyncio.ensure_future(asyncio.wait(waits))
    watcher.add_done_callback(lambda _: done.set())

    def warm() -> bool:
        return done.is_set() or all(
            executions(group.counter) >= group.spec.keys // 4 for group in groups
        )

    try:
        await asyncio.to_thread(wait_until, warm, "the workers' first executions", PROGRESS_TIMEOUT)
        if not done.is_set():  # else the test fails on the workers' output, or below
            await asyncio.to_thread(migrate_and_fail_over, cluster, faults, done)
    finally:
        watcher.cancel()


def cast_parts(cluster: ReplicatedCluster, seed: int) -> tuple[ClusterNode, ...]:
    """(source, target, victim): the primaries by port, rotated by the seed."""
    primaries = sorted(cluster.primaries(), key=lambda node: node.port)
    assert len(primaries) == 3, primaries
    turn = seed % 3
    return tuple(primaries[turn:] + primaries[:turn])


# -- the test ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[ReplicatedCluster]:
    """One cluster for the module: each run's frozen primary comes back as a replica."""
    with ReplicatedCluster.start("valkey") as cluster:
        yield cluster


VIOLATION_KEY = re.compile(r"^\[(\w+)\] key (\d+):")


def broken_keys(violations: list[str], invariant: str) -> set[int]:
    """The keys `violations` name for `invariant` ("1", "2", "3")."""
    keys = set()
    for violation in violations:
        match = VIOLATION_KEY.match(violation)
        if match and match.group(1) == invariant:
            keys.add(int(match.group(2)))
    return keys


async def judge(
    group: Group, faults: Faults, missed: list[str]
) -> tuple[HistoryReport, dict[str, Any]]:
    """Check the group's history; split off what lost writes may break (no `wait_replicas`);
    returns the report (its violations: what must not happen) and a summary, and adds
    to `missed` each fault no call of the group met."""
    spec = group.spec
    seed = spec.seeds[0]
    entries = group.entries
    assert len(entries) == spec.calls * SIZE["workers"], f"{group.name}: calls are missing"
    store, raw = make_store(spec.store)
    counters = RedisCounters(spec.store["counter_url"])
    try:
        counts, records = await final_state(spec, store, counters, seed)
    finally:
        await counters.aclose()
        await store.aclose()
        if raw is not None:
            await raw.aclose()
    report = check(group.name, seed, entries, counts, records)
    every = list(report.violations)
    lost: dict[str, int] = {}
    if not group.wait_replicas:
        report.violations = [v for v in every if v.startswith(MUST_HOLD_WITHOUT_WAIT)]
        lost = dict(Counter(v.split(" ", 1)[0] for v in every if v not in report.violations))
    broken = sorted({key for n in ("1", "2", "3") for key in broken_keys(every, n)})
    frozen = [e for e in entries if e.start < faults.promoted and e.end > faults.frozen]
    moving = [e for e in entries if e.start < faults.migrated and e.end > faults.migration_started]
    after = [e for e in entries if e.start > faults.migrated]
    summary = {
        **report.as_dict(),
        "client": spec.store["client"],
        "wait_replicas": group.wait_replicas,
        "keys_run_twice": len(broken_keys(every, "1")),
        "lost_writes": lost,
        "every_violation": every,
        "calls_during_failover": len(frozen),
        "calls_during_migration": len(moving),
        "calls_after_migration": len(after),
        "faults": faults.line(),
        "broken_keys_calls": {
            key: [
                dataclasses.asdict(e)
                for e in sorted(entries, key=lambda e: e.start)
                if e.key == key
            ]
            for key in broken[:5]
        },
    }
    out = group.directory / "cluster-history.json"
    out.write_text(json.dumps(summary, indent=2))
    print(
        f"\nCLUSTER-HISTORY {report.line()}; keys run twice: {summary['keys_run_twice']}; "
        f"lost writes (not asserted): {lost or 'none'}; calls during the failover "
        f"{len(frozen)}, during the migration {len(moving)}, after it {len(after)}"
    )
    # The faults met this group's workload (asserted once every group is judged).
    timeline = faults.timeline(min(e.start for e in entries), max(e.end for e in entries))
    if not frozen:
        missed.append(f"{group.name}: no call was in flight during the failover ({timeline})")
    if not moving:
        missed.append(f"{group.name}: no call was in flight during the migration ({timeline})")
    if not after:
        missed.append(f"{group.name}: the workers finished before the migration ({timeline})")
    return report, summary


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("client", CLIENTS)
async def test_cluster_history_through_migration_and_failover(
    cluster: ReplicatedCluster, make_server: MakeServer, client: str, seed: int, tmp_path: Path
) -> None:
    started = time.monotonic()
    await asyncio.to_thread(cluster.wait_stable)
    source, target, victim = cast_parts(cluster, seed)
    run = uuid.uuid4().hex[:8]
    groups = []
    for wait in DURABILITY:
        counter = make_server("valkey")
        store = {
            "client": client,
            "host": source.host,
            "port": source.port,
            "wait_replicas": wait,
            "counter_url": counter.url.replace("valkey://", "redis://"),
        }
        spec = Spec(
            store=store,
            seeds=[seed],
            calls=SIZE["calls"],
            keys=SIZE["keys"],
            prefix=f"chist-{run}-w{wait}",
        )
        groups.append(Group(wait, spec, counter, tmp_path / f"wait-{wait}"))
    # The slots holding the source's keys move (at most SIZE["slots"]); the freeze comes
    # with the last but one, so the workers, stalled by it, still have calls to make
    # once the replica took over and the last slots moved.
    on_source = sorted(
        {
            slot
            for group in groups
            for slot in map(cluster.slot, group.idempotency_keys())
            if any(low <= slot <= high for low, high in cluster.slot_ranges(source))
        }
    )
    slots = on_source[: SIZE["slots"]]
    assert len(slots) >= 3, "too few keys on the source"
    faults = Faults(
        source=source,
        target=target,
        victim=victim,
        replica=cluster.replica_of(victim),
        slots=slots,
        freeze_slot=slots[-2],
    )

    await run_groups(groups, SIZE["workers"], lambda waits: conduct(cluster, faults, groups, waits))
    assert faults.stable, "the workers finished before the faults began"
    missed: list[str] = []
    judged = [await judge(group, faults, missed) for group in groups]
    print(f"CLUSTER-HISTORY faults: {faults.line()}; {time.monotonic() - started:.1f}s")
    assert not missed, "\n".join(missed)

    moved = set(slots)
    assert all(
        cluster.primary_for(key) is target
        for group in groups
        for key in group.idempotency_keys()
        if cluster.slot(key) in moved
    ), "the moved keys are not on the target"
    assert cluster.primary_of(victim) is faults.replica, (
        "the old primary is not its replica's replica"
    )
    broken = [f"{report.store}: {v}" for report, _ in judged for v in report.violations]
    assert not broken, f"{len(broken)} violations:\n" + "\n".join(broken[:25])
    for report, _ in judged:
        assert report.executions > 0, f"{report.store}: no function ran"


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
