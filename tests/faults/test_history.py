"""Randomized histories on every store kind, checked against invariants 1-5.

Worker processes (threads for the in-memory store) share one store; see
`tests.faults.history` for what they do and what is checked. Three seeds per run; the
Redis/Valkey runs are repeated with the server restarted twice mid-run, with
``appendonly yes`` + ``appendfsync always`` (every acknowledged write survives).

Each run prints one summary line per seed (``pytest -s``) and writes them, with the
violations, to ``history-<run>.json`` in the test's tmp path.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency.persistence import InMemoryPersistenceLayer, PersistenceLayer
from tests.faults.history import (
    CallEntry,
    HistoryReport,
    MemoryCounters,
    Spec,
    check,
    counters_factory,
    entries_from,
    final_state,
    run_worker,
    store_factory,
    write_spec,
)
from tests.faults.scale import is_full, pick
from tests.faults.servers import ManagedServer
from tests.servers.moto import MotoServer

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SEEDS = [11, 23, 37]
WORKER_TIMEOUT = 300.0

MakeServer = Callable[..., ManagedServer]


def sizes(slow_store: bool = False) -> dict[str, int]:
    """Workers, calls per worker and seed, keys: CI-sized unless AIOIDEM_FAULT_SCALE=full."""
    if slow_store:  # moto serves one request at a time
        return pick(
            ci={"workers": 2, "calls": 25, "keys": 15},
            full={"workers": 3, "calls": 400, "keys": 150},
        )
    return pick(
        ci={"workers": 2, "calls": 100, "keys": 50},
        full={"workers": 4, "calls": 1000, "keys": 300},
    )


def spec_for(store: dict[str, Any], *, slow_store: bool = False, **extra: Any) -> Spec:
    size = sizes(slow_store)
    return Spec(
        store=store,
        seeds=SEEDS,
        calls=size["calls"],
        keys=size["keys"],
        prefix=f"history-{uuid.uuid4().hex[:8]}",
        **extra,
    )


def report_runs(name: str, reports: list[HistoryReport], tmp_path: Path) -> None:
    """Print one line per seed and save the reports; fail on any violation."""
    out = tmp_path / f"history-{name}.json"
    out.write_text(json.dumps([report.as_dict() for report in reports], indent=2))
    for report in reports:
        print(f"\nHISTORY {report.line()}")
    broken = [f"seed {r.seed}: {v}" for r in reports for v in r.violations]
    assert not broken, f"{len(broken)} violations (see {out}):\n" + "\n".join(broken[:25])
    for report in reports:
        assert report.executions > 0, "no function ran: the run tested nothing"


async def check_all(
    name: str,
    spec: Spec,
    workers: int,
    entries: list[CallEntry],
    store: PersistenceLayer,
    counters: Any,
) -> list[HistoryReport]:
    """Check each seed of a run; every call of every worker must be in the history."""
    reports = []
    for seed in spec.seeds:
        mine = [entry for entry in entries if entry.seed == seed]
        expected = spec.calls * workers
        assert len(mine) == expected, f"seed {seed}: {len(mine)} of {expected} calls recorded"
        counts, records = await final_state(spec, store, counters, seed)
        reports.append(check(name, seed, mine, counts, records))
    return reports


async def run_processes(
    spec: Spec,
    workers: int,
    tmp_path: Path,
    during: Callable[[list[Any]], Awaitable[None]] | None = None,
) -> list[CallEntry]:
    """Run `workers` worker processes on `spec`; `during()` runs meanwhile (faults)."""
    spec_path = tmp_path / "spec.json"
    write_spec(spec, spec_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    procs = []
    outs = []
    for worker in range(workers):
        out = tmp_path / f"worker-{worker}.jsonl"
        outs.append(out)
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.faults.history",
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
        )
    waits = [asyncio.ensure_future(proc.communicate()) for proc in procs]
    try:
        if during is not None:
            await during(waits)
        _done, pending = await asyncio.wait(waits, timeout=WORKER_TIMEOUT)
        assert not pending, "a worker did not finish in time"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, wait in zip(procs, waits, strict=True):
        output = wait.result()[0].decode(errors="replace")
        assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{output[-4000:]}"
    entries: list[CallEntry] = []
    for out in outs:
        entries.extend(entries_from(out))
    return entries


# -- in-memory store: worker threads, one loop each ---------------------------------------------


async def test_history_memory(tmp_path: Path) -> None:
    spec = spec_for({"kind": "memory"})
    store = InMemoryPersistenceLayer()
    counters = MemoryCounters()
    workers = sizes()["workers"] + 1
    histories: list[list[CallEntry]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def thread_main(worker: int) -> None:
        try:
            histories[worker] = asyncio.run(
                run_worker(spec, worker, lambda: store, lambda _store: counters)
            )
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=thread_main, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()

    def join_all() -> None:
        for thread in threads:
            thread.join(WORKER_TIMEOUT)

    await asyncio.to_thread(join_all)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    entries = [entry for history in histories for entry in history]
    reports = []
    for seed in spec.seeds:
        mine = [entry for entry in entries if entry.seed == seed]
        assert len(mine) == spec.calls * workers
        counts, records = await final_state(spec, store, counters, seed)
        reports.append(check("memory (threads)", seed, mine, counts, records))
    report_runs("memory", reports, tmp_path)


# -- Redis / Valkey: worker processes on a server of the test's own -----------------------------

CACHE_RUNS = {
    "valkey_glide_atomic": ("valkey", "client=glide&atomic=true"),
    "redis_redispy_atomic": ("redis", "client=redis&atomic=true"),
    "redis_protocol": ("redis", "client=redis&atomic=false"),
}


async def restart_twice(server: ManagedServer, spec: Spec, waits: list[Any]) -> None:
    """Restart the server twice while the workers run: each time once the keyspace has
    grown by half a seed's keys since the last restart (progress, seen on the server;
    without AOF a restart empties it)."""
    loop = asyncio.get_running_loop()
    baseline = 0
    for round_ in range(2):
        threshold = baseline + spec.keys // 2
        deadline = loop.time() + WORKER_TIMEOUT
        while not all(wait.done() for wait in waits):
            size = await asyncio.to_thread(_dbsize, server)
            if size >= threshold or loop.time() > deadline:
                break
            await asyncio.sleep(0.02)  # observing progress, bounded by the deadline
        if all(wait.done() for wait in waits):
            raise AssertionError(f"the workers finished before restart {round_ + 1}")
        await asyncio.to_thread(server.restart)
        baseline = await asyncio.to_thread(_dbsize, server)


def _dbsize(server: ManagedServer) -> int:
    try:
        with server.admin(timeout=1.0) as client:
            return int(client.dbsize())
    except Exception:  # restarting: no progress to see
        return 0


SCENARIOS = {
    "steady": (False, False),
    "aof-restarts": (True, True),
    "restarts-no-aof": (True, False),
}
"""Scenario: (restart the server twice, with AOF). Without AOF a restart loses records."""
MUST_HOLD_WITHOUT_AOF = ("[3]", "[5]", "[counters]")
"""What must hold even when a restart loses every record: no key left locked, typed and
bounded errors, and every execution counted (the counters live on a second server).
Invariants 1 and 2 cannot: a lost COMPLETED record lets the key run again, and a lost
claim lets a duplicate run alongside the first call."""

CACHE_CASES = [
    pytest.param(name, scenario, id=f"{name}-{scenario}")
    for name in CACHE_RUNS
    for scenario in SCENARIOS
    if scenario != "restarts-no-aof" or name == "redis_redispy_atomic" or is_full()
]


@pytest.mark.parametrize(("name", "scenario"), CACHE_CASES)
async def test_history_cache(
    name: str, scenario: str, make_server: MakeServer, tmp_path: Path
) -> None:
    kind, query = CACHE_RUNS[name]
    restarts, aof = SCENARIOS[scenario]
    server = make_server(kind, aof=aof)
    counter_server = server if aof or not restarts else make_server("redis")
    url = f"{server.url}?{query}&timeout=1"
    counter_url = counter_server.url.replace("valkey://", "redis://")
    spec = spec_for({"kind": "cache", "url": url, "counter_url": counter_url})
    during = (lambda waits: restart_twice(server, spec, waits)) if restarts else None
    workers = sizes()["workers"]
    entries = await run_processes(spec, workers, tmp_path, during)
    store = store_factory(spec)()
    counters = counters_factory(spec)(store)
    try:
        reports = await check_all(name, spec, workers, entries, store, counters)
    finally:
        await counters.aclose()
        await store.aclose()
    for report in reports:
        report.store = f"{name} ({scenario})"
    if restarts:
        assert server.starts == 3
    if restarts and not aof:
        for report in reports:
            broken = [v for v in report.violations if not v.startswith(MUST_HOLD_WITHOUT_AOF)]
            report.violations = [
                v for v in report.violations if v.startswith(MUST_HOLD_WITHOUT_AOF)
            ]
            lost = Counter(v.split(" ", 1)[0] for v in broken)
            print(f"\nHISTORY {report.store} seed {report.seed}: data loss broke {dict(lost)}")
    report_runs(f"{name}-{scenario}", reports, tmp_path)


# -- DynamoDB on moto ------------------------------------------------------------------------------


async def test_history_dynamodb(moto_server: MotoServer, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:10]
    table, counter_table = f"history-{suffix}", f"history-counters-{suffix}"
    admin = DynamoDBPersistenceLayer(table, endpoint_url=moto_server.endpoint_url)
    await admin.create_table(exist_ok=False)
    counter_admin = DynamoDBPersistenceLayer(counter_table, endpoint_url=moto_server.endpoint_url)
    await counter_admin.create_table(exist_ok=False)
    await counter_admin.aclose()
    store_info = {
        "kind": "dynamodb",
        "table": table,
        "counter_table": counter_table,
        "endpoint": moto_server.endpoint_url,
    }
    spec = spec_for(store_info, slow_store=True)
    workers = sizes(slow_store=True)["workers"]
    entries = await run_processes(spec, workers, tmp_path)
    counters = counters_factory(spec)(admin)
    try:
        reports = await check_all("dynamodb_simple", spec, workers, entries, admin, counters)
    finally:
        client = await admin.client()
        for name in (table, counter_table):
            await client.delete_table(TableName=name)
        await admin.aclose()
    report_runs("dynamodb", reports, tmp_path)
