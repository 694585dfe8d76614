"""A model of the idempotency state machine, checked step by step against the engine.

Hypothesis drives two engines (two "processes", each on its own event loop) over one
in-memory store, with a fake clock that both the records and the loops' timers follow.
Rules start calls (whose functions block until a later rule ends them with a result,
an exception or a cancellation), and move the clock forward, optionally with one
engine "frozen" (its loop does not run, so its leases are not renewed). After every
step the model and the real system must agree on: each call's outcome, executions per
key, every stored record, and that no claim is left without a running owner.

The lease keeper's timing is not modelled: renewals are observed in the store and must
only extend the owner's own claim, never past now + lease, and a live engine's claims
never lapse (checked after each clock step on every engine that is not frozen).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyValidationError,
)
from aioidempotency.persistence import InMemoryPersistenceLayer
from tests.faults.scale import pick
from tests.faults.stepping import FunctionGate
from tests.helpers import WrapperStore

pytestmark = pytest.mark.timeout(pick(ci=300, full=3600))

BASE = 1_800_000_000.0
LEASE = 3600.0
"""Lease in fake seconds: the keeper's timer (every lease/6) never fires in real time."""
EXPIRES = 4 * 3600
KEYS = 3
ENGINES = 2
STEP_TIMEOUT = 10.0
"""Real seconds a rule may wait for a call to reach its function or to finish."""


class FnError(Exception):
    """The function's own failure."""


class FakeTime:
    """The fake clock: epoch seconds for the engines and the store, and an offset that
    the event loops add to their monotonic time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return BASE + self.offset


class FakeTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose timers follow the fake clock (real time plus its offset)."""

    def __init__(self, clock: FakeTime) -> None:
        super().__init__()
        self._fake = clock

    def time(self) -> float:
        return super().time() + self._fake.offset


@dataclasses.dataclass
class ModelRecord:
    status: RecordStatus
    expiry: int
    in_progress: int | None  # epoch ms
    variant: int
    owner: int | None = None  # model call id of an in-progress claim
    value: str | None = None

    def claimable(self, now: float) -> bool:
        expired = int(now) > self.expiry
        orphaned = (
            self.status is RecordStatus.INPROGRESS
            and self.in_progress is not None
            and self.in_progress < int(now * 1000)
        )
        return expired or orphaned


@dataclasses.dataclass
class ModelCall:
    id: int
    engine: int
    key: int
    variant: int
    task: asyncio.Task[Any]
    gate: FunctionGate
    owner_token: str | None = None


class EngineMachine(RuleBasedStateMachine):
    """The rules; `setup` builds the system under test for one example."""

    def __init__(self) -> None:
        super().__init__()
        self.time = FakeTime()
        self.store = InMemoryPersistenceLayer(clock=self.time.now)
        self.counting = WrapperStore(self.store)  # counts what the engines ask
        self.loops = [FakeTimeLoop(self.time) for _ in range(ENGINES)]
        self.engines: list[IdempotencyEngine] = []
        self.lease: float | None = LEASE
        self.use_cache = False
        self.ids = itertools.count()
        self.records: dict[int, ModelRecord] = {}
        self.running: dict[int, ModelCall] = {}
        self.executions: Counter[int] = Counter()
        self.gates: list[tuple[int, FunctionGate]] = []
        self.tasks: list[tuple[int, asyncio.Task[Any]]] = []
        self.cached: list[dict[int, ModelRecord]] = [{} for _ in range(ENGINES)]
        self.values = itertools.count(1)

    # -- setup ---------------------------------------------------------------------

    @initialize(use_cache=st.booleans(), lease=st.sampled_from([LEASE, None]))
    def setup(self, use_cache: bool, lease: float | None) -> None:
        self.use_cache = use_cache
        self.lease = lease
        config = IdempotencyConfig(
            event_key_jmespath="k",
            payload_validation_jmespath="v",
            expires_after_seconds=EXPIRES,
            in_progress_lease_seconds=lease,
            use_local_cache=use_cache,
        )
        self.engines = [
            IdempotencyEngine(self.counting, config, key_prefix="model", clock=self.time.now)
            for _ in range(ENGINES)
        ]

    def teardown(self) -> None:
        # every call still running (also one the model did not expect to run) ends here
        for index, loop in enumerate(self.loops):
            tasks = [task for engine, task in self.tasks if engine == index and not task.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=STEP_TIMEOUT))
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: no "never retrieved" noise
            self.drain(index)
            loop.close()

    # -- helpers ---------------------------------------------------------------------

    def key(self, index: int) -> str:
        return self.engines[0].idempotency_key({"k": index, "v": 0})

    def stored(self, index: int) -> DataRecord | None:
        # read the store's dict: `get()` would drop expired records, changing its state
        return self.store.table._records.get(self.key(index))

    def store_ops(self) -> int:
        """Store operations so far, but renewals (the lease keeper may renew other
        calls' claims whenever a loop runs)."""
        counts = self.counting.counts
        return sum(counts.values()) - counts["renew"]

    def drive(self, engine: int, *waits: Any) -> None:
        """Run `engine`'s loop until one of `waits` is done (bounded in real time)."""
        loop = self.loops[engine]

        async def until() -> None:
            futures = [asyncio.ensure_future(w) for w in waits]
            done, pending = await asyncio.wait(
                futures, timeout=STEP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            for future, wait in zip(futures, waits, strict=True):
                if future in pending and future is not wait:  # only the helpers made here
                    future.cancel()
            assert done, "the engine made no progress"

        loop.run_until_complete(until())

    def drain(self, engine: int) -> None:
        """Let `engine`'s loop run its due timers and what they start (renewals)."""
        loop = self.loops[engine]
        for _ in range(20):  # in-memory store: each step needs a few iterations at most
            loop.run_until_complete(asyncio.sleep(0))

    def sync_renewals(self, engine: int, *, live: bool) -> None:
        """Take renewals the keeper made into the model, checking that each only
        extended its owner's claim, never beyond now + lease; `live`: the engine's loop
        has just run, so none of its claims may have lapsed."""
        now = self.time.now()
        for call in self.running.values():
            if call.engine != engine:
                continue
            model = self.records.get(call.key)
            if model is None or model.owner != call.id:
                continue
            real = self.stored(call.key)
            assert real is not None
            assert real.owner == call.owner_token
            if self.lease is None:
                assert real.in_progress_expiry_timestamp is None
                continue
            assert real.in_progress_expiry_timestamp is not None
            assert model.in_progress is not None
            assert model.in_progress <= real.in_progress_expiry_timestamp
            assert real.in_progress_expiry_timestamp <= int((now + self.lease) * 1000)
            model.in_progress = real.in_progress_expiry_timestamp
            if live and int(now) <= model.expiry:
                assert not model.claimable(now), f"a live engine let claim {call.id} lapse"

    def predict(self, engine: int, key: int, variant: int) -> tuple[str, Any]:
        """What a new call on `engine` for (`key`, `variant`) must do now."""
        now = self.time.now()
        if self.use_cache:
            cached = self.cached[engine].get(key)
            if cached is not None and int(now) > cached.expiry:
                del self.cached[engine][key]
                cached = None
            if cached is not None:
                if cached.variant != variant:
                    return "error", IdempotencyValidationError
                return "cache", cached.value
        for call in self.running.values():
            if call.engine == engine and call.key == key:  # joins its own process' flight
                if call.variant != variant:
                    return "error", IdempotencyValidationError
                return "error", IdempotencyAlreadyInProgressError
        record = self.records.get(key)
        if record is None or record.claimable(now):
            return "run", None
        if record.variant != variant:
            return "error", IdempotencyValidationError
        if record.status is RecordStatus.COMPLETED:
            return "replay", record.value
        return "error", IdempotencyAlreadyInProgressError

    # -- rules -------------------------------------------------------------------------

    @rule(
        engine=st.integers(0, ENGINES - 1),
        key=st.integers(0, KEYS - 1),
        variant=st.sampled_from([0, 0, 0, 1]),
    )
    def call(self, engine: int, key: int, variant: int) -> None:
        """A call (first or duplicate) on `key`; its function blocks until finished."""
        expected, detail = self.predict(engine, key, variant)
        now = self.time.now()
        gate = FunctionGate(timeout=None)  # the fake clock jumps; `drive` bounds waits
        payload = {"k": key, "v": variant}
        ops_before = self.store_ops()
        task = self.loops[engine].create_task(self.engines[engine].run(payload, gate))
        self.tasks.append((engine, task))
        self.gates.append((key, gate))
        self.drive(engine, task, gate.entered.wait())
        self.sync_renewals(engine, live=False)
        call = ModelCall(next(self.ids), engine, key, variant, task, gate)
        if expected == "run":
            assert gate.entered.is_set(), f"expected the function to run, got {task!r}"
            assert not task.done()
            self.executions[key] += 1
            in_progress = None if self.lease is None else int((now + self.lease) * 1000)
            self.records[key] = ModelRecord(
                RecordStatus.INPROGRESS, int(now) + EXPIRES, in_progress, variant, owner=call.id
            )
            real = self.stored(key)
            assert real is not None
            call.owner_token = real.owner
            self.running[call.id] = call
            return
        assert task.done(), f"expected {expected} {detail}, the call is still running"
        assert not gate.entered.is_set()
        if expected == "error":
            error = task.exception()
            assert type(error) is detail, f"expected {detail.__name__}, got {error!r}"
        else:
            assert task.exception() is None, task.exception()
            assert task.result() == detail
            if expected == "replay" and self.use_cache:
                self.cached[engine][key] = self.records[key]
            if expected == "cache":
                assert self.store_ops() == ops_before, "cache hit did I/O"

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data(), how=st.sampled_from(["value", "error", "cancel"]))
    def finish(self, data: st.DataObject, how: str) -> None:
        """End a running call's function: it returns, raises, or the call is cancelled."""
        call = self.running.pop(data.draw(st.sampled_from(sorted(self.running))))
        now = self.time.now()
        record = self.records.get(call.key)
        owned = record is not None and record.owner == call.id
        value = f"{call.key}:{next(self.values)}"
        if how == "value":
            call.gate.release(value)
        elif how == "error":
            call.gate.release(error=FnError())
        else:
            call.task.cancel()
        self.drive(call.engine, call.task)
        assert call.task.done()
        if how == "cancel":
            assert call.task.cancelled()
        elif how == "error":
            assert type(call.task.exception()) is FnError
        elif owned:
            assert call.task.exception() is None, call.task.exception()
            assert call.task.result() == value
        else:
            error = call.task.exception()
            assert isinstance(error, IdempotencyClaimLostError), error
            assert error.result == value
        # the model's effect on the store
        if how == "value" and owned:
            assert record is not None
            done = ModelRecord(
                RecordStatus.COMPLETED, int(now) + EXPIRES, None, call.variant, value=value
            )
            self.records[call.key] = done
            if self.use_cache:
                self.cached[call.engine][call.key] = done
        elif how != "value":
            if owned:
                del self.records[call.key]
            self.cached[call.engine].pop(call.key, None)
        self.drain(call.engine)
        self.sync_renewals(call.engine, live=False)

    @rule(
        seconds=st.sampled_from([1.0, 700.0, 1300.0, LEASE + 1, EXPIRES + 1]),
        frozen=st.sampled_from([None, 0, 1]),
    )
    def advance(self, seconds: float, frozen: int | None) -> None:
        """Move the clock; every engine but `frozen` runs its due timers (renewals)."""
        self.time.offset += seconds
        for engine in range(ENGINES):
            if engine != frozen:
                self.drain(engine)
                self.sync_renewals(engine, live=True)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def executions_match(self) -> None:
        for key in range(KEYS):
            runs = sum(gate.runs for gate_key, gate in self.gates if gate_key == key)
            assert runs == self.executions[key], f"key {key}: {runs} executions"

    @invariant()
    def records_match(self) -> None:
        if not self.engines:
            return
        tokens = {call.owner_token for call in self.running.values()}
        for key in range(KEYS):
            model = self.records.get(key)
            real = self.stored(key)
            if model is None:
                assert real is None, f"key {key}: store has {real}, model has nothing"
                continue
            assert real is not None, f"key {key}: model has {model}, store has nothing"
            assert real.status is model.status
            assert real.expiry_timestamp == model.expiry
            prepared = self.engines[0].prepare_call(
                {"k": key, "v": model.variant}, key_source=self.call
            )
            assert prepared is not None
            assert real.payload_hash == prepared.payload_hash
            if model.status is RecordStatus.COMPLETED:
                assert real.response_json() == model.value
            else:
                assert real.in_progress_expiry_timestamp == model.in_progress
                # no claim without a running owner
                assert real.owner in tokens, f"key {key}: claim of {real.owner} has no owner"


EngineMachine.TestCase.settings = settings(
    max_examples=pick(ci=60, full=400),
    stateful_step_count=pick(ci=25, full=50),
    deadline=None,
    database=None,  # no example database in the work tree
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineModel = EngineMachine.TestCase
