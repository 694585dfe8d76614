"""Randomized history test, in the spirit of Jepsen: workers, a shared store, a checker.

Each worker runs one `IdempotencyEngine` over a shared store and makes calls on a few
dozen (or hundred) keys, some cancelled after a random number of loop iterations, some
under a tiny `asyncio.wait_for`, some whose function fails. The function counts its
executions on the server side (Redis ``INCR``; DynamoDB ``UpdateItem ADD``; a locked
dict for the in-memory store) and returns a value naming its execution. Every call is
written to a history file. `check` then reads the histories, the server's counters and
the stored records, and checks invariants 1-5 of docs/reliability.md.

Run a worker by hand with ``python -m tests.faults.history worker --spec SPEC.json
--worker 0 --out history-0.jsonl`` (the spec is what `write_spec` writes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import IdempotencyError, IdempotencyPersistenceLayerError
from aioidempotency.persistence import PersistenceLayer

__all__ = [
    "CallEntry",
    "Counters",
    "HistoryReport",
    "MemoryCounters",
    "Spec",
    "check",
    "run_worker",
]

CALL_BOUND = 30.0
"""No call may take longer than this (seconds): invariant 5, no unbounded wait."""
DRAIN_TIMEOUT = 30.0
"""How long a worker waits, before it exits, for the engine's background cleanup."""


class FnError(Exception):
    """The function's own failure (chosen at random, or its counter was unreachable)."""


class Counters(Protocol):
    """Server-side execution counters, one per key."""

    async def incr(self, name: str) -> int: ...

    async def read(self, names: Iterable[str]) -> dict[str, int]: ...

    async def aclose(self) -> None: ...


class MemoryCounters:
    """Counters for the in-memory store: a dict behind a lock, shared by threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    async def incr(self, name: str) -> int:
        with self._lock:
            self._counts[name] += 1
            return self._counts[name]

    async def read(self, names: Iterable[str]) -> dict[str, int]:
        with self._lock:
            return {name: self._counts[name] for name in names}

    async def aclose(self) -> None:
        return None


class RedisCounters:
    """``INCR exec:{name}`` on the store's own server (redis-py asyncio)."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._client = redis.asyncio.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0
        )

    async def incr(self, name: str) -> int:
        return int(await self._client.incr(f"exec:{name}"))

    async def read(self, names: Iterable[str]) -> dict[str, int]:
        names = list(names)
        values = await self._client.mget([f"exec:{name}" for name in names]) if names else []
        return {name: int(value or 0) for name, value in zip(names, values, strict=True)}

    async def raw(self, key: str) -> bytes | None:
        """The value under `key` as this server holds it (read by redis-py)."""
        value = await self._client.get(key)
        return None if value is None else value.encode() if isinstance(value, str) else value

    async def aclose(self) -> None:
        await self._client.aclose()


class DynamoDBCounters:
    """``UpdateItem ADD n :one`` on an item per key of a counter table."""

    def __init__(self, store: Any, table: str) -> None:
        self._store = store
        self._table = table

    async def incr(self, name: str) -> int:
        client = await self._store.client()
        reply = await client.update_item(
            TableName=self._table,
            Key={"id": {"S": f"exec:{name}"}},
            UpdateExpression="ADD #n :one",
            ExpressionAttributeNames={"#n": "n"},
            ExpressionAttributeValues={":one": {"N": "1"}},
            ReturnValues="UPDATED_NEW",
        )
        return int(reply["Attributes"]["n"]["N"])

    async def read(self, names: Iterable[str]) -> dict[str, int]:
        client = await self._store.client()
        counts = {}
        for name in names:
            reply = await client.get_item(
                TableName=self._table, Key={"id": {"S": f"exec:{name}"}}, ConsistentRead=True
            )
            item = reply.get("Item")
            counts[name] = int(item["n"]["N"]) if item else 0
        return counts

    async def aclose(self) -> None:
        return None


@dataclasses.dataclass
class Spec:
    """What the workers of one run do, and against which store."""

    store: dict[str, Any]  # {"kind": "cache", "url": ...} or {"kind": "dynamodb", ...}
    seeds: list[int]
    calls: int  # per worker and seed
    keys: int
    prefix: str
    concurrency: int = 8
    lease: float | None = 60.0
    wait_for_in_progress: float = 0.0

    def config(self) -> IdempotencyConfig:
        return IdempotencyConfig(
            in_progress_lease_seconds=self.lease,
            wait_for_in_progress_seconds=self.wait_for_in_progress,
            wait_poll_interval_seconds=0.01,
        )

    def engine(self, store: PersistenceLayer, seed: int) -> IdempotencyEngine:
        return IdempotencyEngine(store, self.config(), key_prefix=f"{self.prefix}-s{seed}")

    def payload(self, index: int) -> dict[str, int]:
        return {"k": index}

    @staticmethod
    def counter_name(seed: int, index: int) -> str:
        return f"{seed}:{index}"


def write_spec(spec: Spec, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(spec)))


def read_spec(path: Path) -> Spec:
    return Spec(**json.loads(path.read_text()))


@dataclasses.dataclass
class CallEntry:
    """One call as a worker saw it."""

    worker: int
    seed: int
    call: int
    key: int
    mode: str  # plain, cancel, wait_for, fail
    start: float  # time.monotonic(): one clock for all processes of the machine
    end: float = 0.0
    outcome: str = ""  # "returned" or the exception's type name
    idempotency_error: bool = False
    chained: bool = True  # a store error carries the client's exception as __cause__
    value: str | None = None  # what a call that returned got
    attempted: bool = False  # the function started
    execution: str | None = None  # the value its execution returns, once counted
    exec_start: float | None = None
    exec_end: float | None = None


def _classify(entry: CallEntry, error: BaseException) -> None:
    entry.outcome = type(error).__name__
    entry.idempotency_error = isinstance(error, IdempotencyError)
    if isinstance(error, IdempotencyPersistenceLayerError):
        entry.chained = error.__cause__ is not None


async def run_worker(
    spec: Spec,
    worker: int,
    make_store: Callable[[], PersistenceLayer],
    make_counters: Callable[[PersistenceLayer], Counters],
) -> list[CallEntry]:
    """Run this worker's calls for every seed; return its history."""
    store = make_store()
    counters = make_counters(store)
    history: list[CallEntry] = []
    try:
        for seed in spec.seeds:
            engine = spec.engine(store, seed)
            rng = random.Random(seed * 1_000 + worker)
            await _run_seed(spec, worker, seed, engine, counters, rng, history)
            drain: Callable[..., Awaitable[bool]] | None = getattr(engine, "drain", None)
            if drain is not None:
                await drain(DRAIN_TIMEOUT)
        await _wait_for_background()
    finally:
        await counters.aclose()
        await store.aclose()
    return history


async def _wait_for_background() -> None:
    """Let the engine's background releases and completions finish (bounded)."""
    current = asyncio.current_task()
    others = {task for task in asyncio.all_tasks() if task is not current}
    if others:
        await asyncio.wait(others, timeout=DRAIN_TIMEOUT)


async def _run_seed(
    spec: Spec,
    worker: int,
    seed: int,
    engine: IdempotencyEngine,
    counters: Counters,
    rng: random.Random,
    history: list[CallEntry],
) -> None:
    async def one(entry: CallEntry, cancel_after: int, timeout: float, delay: int) -> None:
        name = spec.counter_name(seed, entry.key)

        async def fn() -> str:
            entry.attempted = True
            entry.exec_start = time.monotonic()
            try:
                try:
                    count = await counters.incr(name)
                except Exception as exc:
                    raise FnError("the execution counter is unreachable") from exc
                entry.execution = f"{seed}:{entry.key}:{count}"
                for _ in range(delay):
                    await asyncio.sleep(0)
                if entry.mode == "fail":
                    raise FnError(entry.execution)
                return entry.execution
            finally:
                entry.exec_end = time.monotonic()

        payload = spec.payload(entry.key)
        try:
            if entry.mode == "cancel":
                task = asyncio.ensure_future(engine.run(payload, fn))
                for _ in range(cancel_after):
                    await asyncio.sleep(0)
                task.cancel()
                result = await task
            elif entry.mode == "wait_for":
                result = await asyncio.wait_for(engine.run(payload, fn), timeout)
            else:
                result = await engine.run(payload, fn)
            entry.outcome = "returned"
            entry.value = result
        except asyncio.CancelledError as exc:
            task_self = asyncio.current_task()
            if task_self is not None and getattr(task_self, "cancelling", int)():
                raise  # this worker itself is being cancelled
            _classify(entry, exc)
        except BaseException as exc:
            _classify(entry, exc)
        finally:
            entry.end = time.monotonic()

    pending: set[asyncio.Task[None]] = set()
    for number in range(spec.calls):
        draw = rng.random()
        mode = (
            "cancel"
            if draw < 0.2
            else "wait_for"
            if draw < 0.4
            else "fail"
            if draw < 0.5
            else "plain"
        )
        entry = CallEntry(
            worker=worker,
            seed=seed,
            call=number,
            key=rng.randrange(spec.keys),
            mode=mode,
            start=time.monotonic(),
        )
        history.append(entry)
        work = one(entry, rng.randrange(16), rng.uniform(0.0, 0.01), rng.randrange(4))
        if len(pending) >= spec.concurrency:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        entry.start = time.monotonic()
        pending.add(asyncio.ensure_future(work))
    if pending:
        await asyncio.wait(pending)


# -- the checker ---------------------------------------------------------------------------


@dataclasses.dataclass
class HistoryReport:
    """What one run did and every invariant it broke (empty `violations`: all held)."""

    store: str
    seed: int
    calls: int = 0
    executions: int = 0
    keys: int = 0
    keys_locked: int = 0
    keys_completed: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    longest_call: float = 0.0

    def line(self) -> str:
        errors = ", ".join(f"{name} {count}" for name, count in sorted(self.errors.items()))
        return (
            f"{self.store} seed {self.seed}: {self.calls} calls, {self.executions} executions "
            f"on {self.keys} keys ({self.keys_completed} completed), "
            f"{self.keys_locked} keys left locked, longest call {self.longest_call:.2f}s, "
            f"errors: {errors or 'none'}; violations: {len(self.violations)}"
        )

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["errors"] = dict(self.errors)
        data["summary"] = self.line()
        return data


ALLOWED_BY_MODE = {
    "cancel": {"CancelledError"},
    "wait_for": {"TimeoutError"},
    "fail": {"FnError"},
    "plain": set(),
}
"""Non-idempotency errors each kind of call may end with (plus FnError when the counter
was unreachable, which the function raises itself)."""


def check(
    store_name: str,
    seed: int,
    entries: list[CallEntry],
    counters: dict[int, int],
    records: dict[int, DataRecord | str | None],
) -> HistoryReport:
    """Check invariants 1-5 on one seed's history, counters and final records."""
    report = HistoryReport(store=store_name, seed=seed, calls=len(entries), keys=len(records))
    bad = report.violations
    by_key: dict[int, list[CallEntry]] = defaultdict(list)
    for entry in entries:
        by_key[entry.key].append(entry)
        outcome = entry.outcome
        report.longest_call = max(report.longest_call, entry.end - entry.start)
        if outcome != "returned":
            report.errors[outcome] += 1
        # invariant 5: typed errors, chained, bounded
        if not outcome:
            bad.append(f"[5] call {entry.worker}/{entry.call} has no recorded end")
        elif outcome != "returned" and not entry.idempotency_error:
            allowed = ALLOWED_BY_MODE[entry.mode] | {"FnError"}
            if outcome not in allowed:
                bad.append(f"[5] call {entry.worker}/{entry.call} ({entry.mode}) raised {outcome}")
        if not entry.chained:
            bad.append(f"[5] call {entry.worker}/{entry.call}: {outcome} without its cause")
        if entry.end - entry.start > CALL_BOUND:
            bad.append(f"[5] call {entry.worker}/{entry.call} took {entry.end - entry.start:.1f}s")

    for key, record in records.items():
        calls = by_key.get(key, [])
        executed = [entry for entry in calls if entry.execution is not None]
        attempted = [entry for entry in calls if entry.attempted]
        count = counters.get(key, 0)
        report.executions += count
        # every execution the server counted was seen by a worker (and vice versa)
        if not len(executed) <= count <= len(attempted):
            bad.append(
                f"[counters] key {key}: server counted {count} executions, workers saw "
                f"{len(executed)} counted and {len(attempted)} started"
            )
        stored: str | None = None
        if isinstance(record, str):  # invariant 5: a key no call can use any more
            bad.append(f"[5] key {key}: unusable record: {record}")
            continue
        if record is not None and record.status is RecordStatus.INPROGRESS:
            report.keys_locked += 1  # invariant 3
            bad.append(f"[3] key {key}: left locked by {record.owner}")
        elif record is not None:
            report.keys_completed += 1
            stored = record.response_json()
        # invariant 2: every normal return is the stored result
        for entry in calls:
            if entry.outcome == "returned" and entry.value != stored:
                bad.append(
                    f"[2] key {key}: call {entry.worker}/{entry.call} returned {entry.value!r}, "
                    f"stored is {stored!r}"
                )
        # invariant 1: every execution but the stored one belongs to a call that failed
        # or was interrupted before its completion landed
        for entry in executed:
            if entry.execution != stored and entry.outcome == "returned":
                bad.append(f"[1] key {key}: execution {entry.execution} returned but is not stored")
        if stored is not None and not any(entry.execution == stored for entry in executed):
            bad.append(f"[2] key {key}: stored result {stored!r} comes from no seen execution")
        # invariant 1: no execution starts once a completed result was returned
        returned_at = [entry.end for entry in calls if entry.outcome == "returned"]
        if returned_at:
            first_return = min(returned_at)
            for entry in executed:
                if entry.exec_start is not None and entry.exec_start > first_return:
                    bad.append(
                        f"[1] key {key}: execution {entry.execution} started after a call had "
                        "returned the stored result"
                    )
        # invariant 1: executions of one key never overlap (one live claim at a time)
        spans = sorted(
            (entry.exec_start, entry.exec_end, entry.execution)
            for entry in attempted
            if entry.exec_start is not None and entry.exec_end is not None
        )
        for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(spans):
            if start_b < end_a:
                bad.append(f"[1] key {key}: executions {name_a} and {name_b} overlapped")
    return report


def entries_from(path: Path) -> list[CallEntry]:
    return [CallEntry(**json.loads(line)) for line in path.read_text().splitlines() if line]


def write_entries(entries: list[CallEntry], path: Path) -> None:
    with path.open("w") as out:
        for entry in entries:
            out.write(json.dumps(dataclasses.asdict(entry)) + "\n")


# -- stores from a spec (worker processes and the checking test build them alike) -----------


def store_factory(spec: Spec) -> Callable[[], PersistenceLayer]:
    info = spec.store
    if info["kind"] == "cache":
        from aioidempotency._async.cache import CachePersistenceLayer

        return lambda: CachePersistenceLayer.from_url(info["url"])
    if info["kind"] == "dynamodb":
        from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer

        return lambda: DynamoDBPersistenceLayer(info["table"], endpoint_url=info["endpoint"])
    raise ValueError(f"no worker processes for store kind {info['kind']!r}")


def counters_factory(spec: Spec) -> Callable[[PersistenceLayer], Counters]:
    info = spec.store
    if info["kind"] == "cache":
        return lambda _store: RedisCounters(info["counter_url"])
    if info["kind"] == "dynamodb":
        return lambda store: DynamoDBCounters(store, info["counter_table"])
    raise ValueError(f"no counters for store kind {info['kind']!r}")


async def final_state(
    spec: Spec, store: PersistenceLayer, counters: Counters, seed: int
) -> tuple[dict[int, int], dict[int, DataRecord | str | None]]:
    """The server's counters and the stored records of one seed's keys (a text saying
    what is wrong, for a record the store cannot read)."""
    engine = spec.engine(store, seed)
    names = {index: spec.counter_name(seed, index) for index in range(spec.keys)}
    counts = await counters.read(names.values())
    records: dict[int, DataRecord | str | None] = {}
    for index in range(spec.keys):
        key = engine.idempotency_key(spec.payload(index))
        try:
            records[index] = await store.get(key)
        except IdempotencyError as exc:
            # unusable for this client: show what the server holds, read by another one
            raw = getattr(counters, "raw", None)
            held = await raw(key) if raw is not None else "(not read)"
            records[index] = f"{type(exc).__name__}: {exc}; the server holds {held!r}"
    return {index: counts[name] for index, name in names.items()}, records


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.history")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run one worker of a spec, write its history")
    worker.add_argument("--spec", type=Path, required=True)
    worker.add_argument("--worker", type=int, required=True)
    worker.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = read_spec(args.spec)
    entries = asyncio.run(
        run_worker(spec, args.worker, store_factory(spec), counters_factory(spec))
    )
    write_entries(entries, args.out)
    print(f"worker {args.worker}: {len(entries)} calls", flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(_main(sys.argv[1:]))
