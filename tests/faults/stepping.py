"""Pause a store operation, or the user's function, at a chosen point, so that a test
can interrupt an idempotent call exactly there.

`SteppingStore` wraps any store. `pause(method, phase)` arms a `Gate` for the next
call of `method`: phase ``"before"`` holds the call before it reaches the inner store,
``"after"`` holds it once the inner store has answered but before the answer returns
to the engine (the write landed, the reply did not). The test awaits `Gate.reached`,
interrupts the call, then opens the gate. `FunctionGate` does the same inside the
function under test. Everything is driven by asyncio events; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from aioidempotency._records import DataRecord
from aioidempotency.persistence import ClaimResult, PersistenceLayer

__all__ = ["FunctionGate", "Gate", "Landed", "Phase", "SteppingStore"]

T = TypeVar("T")
Phase = Literal["before", "after"]
Method = Literal["claim", "get", "complete", "release", "renew"]

GATE_TIMEOUT = 30.0
"""Longest a paused operation waits for its gate to open (a test bug must not hang)."""


async def wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Wait for `event`, at most `timeout` seconds (TimeoutError after).

    Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives
    together with the event, and these gates exist to deliver cancellations exactly.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    if not done:
        raise TimeoutError(f"gate not opened within {timeout}s")


class Gate:
    """One pause point: `reached` is set when an operation arrives, `open()` lets it go.

    Opening with ``raise_=error`` makes the operation raise ``error`` instead of going on.
    `passed` is set once the operation left the gate (whether it went on or raised), and
    `cancelled` tells whether it was cancelled while waiting there.
    """

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.passed = asyncio.Event()
        self._open = asyncio.Event()
        self._error: BaseException | None = None
        self.cancelled = False

    def open(self, raise_: BaseException | None = None) -> None:
        """Let the paused operation continue (or raise `raise_`)."""
        self._error = raise_
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait_reached(self, timeout: float = GATE_TIMEOUT) -> None:
        """Return once an operation arrived at the gate; TimeoutError after `timeout`."""
        await asyncio.wait_for(self.reached.wait(), timeout)

    async def hold(self) -> None:
        """Called by the paused operation: wait until opened (bounded)."""
        self.reached.set()
        try:
            await wait_event(self._open, GATE_TIMEOUT)
        except asyncio.CancelledError:
            self.cancelled = True
            self.passed.set()
            raise
        self.passed.set()
        if self._error is not None:
            raise self._error


@dataclasses.dataclass(frozen=True)
class Landed:
    """One operation the inner store answered without an error."""

    method: str
    key: str
    owner: str | None
    result: Any = None


class SteppingStore(PersistenceLayer):
    """Delegates to `inner`, pausing armed operations at their gates.

    `landed` lists, in order, every operation the inner store completed (so a test knows
    whether a completion reached the server); `claims` maps each owner token the engine
    used to the key it claimed (whether or not it won).
    """

    def __init__(self, inner: PersistenceLayer) -> None:
        self.inner = inner
        self.landed: list[Landed] = []
        self.claims: dict[str, str] = {}
        self._gates: dict[tuple[str, Phase], list[tuple[str | None, Gate]]] = {}
        self._every_gate: list[Gate] = []
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def pause(self, method: Method, phase: Phase, *, key: str | None = None) -> Gate:
        """Arm a gate for the next `method` call (on `key`, or any key) at `phase`."""
        gate = Gate()
        self._gates.setdefault((method, phase), []).append((key, gate))
        self._every_gate.append(gate)
        return gate

    def open_all(self) -> None:
        """Open every gate still armed or waiting (cleanup after a test)."""
        self._gates.clear()
        for gate in self._every_gate:
            if not gate.is_open:
                gate.open()

    def _take(self, method: str, phase: Phase, key: str) -> Gate | None:
        gates = self._gates.get((method, phase))
        if not gates:
            return None
        for index, (wanted, gate) in enumerate(gates):
            if wanted is None or wanted == key:
                del gates[index]
                return gate
        return None

    async def _step(
        self, method: str, key: str, owner: str | None, call: Callable[[], Awaitable[T]]
    ) -> T:
        self._in_flight += 1
        self._idle.clear()
        try:
            gate = self._take(method, "before", key)
            if gate is not None:
                await gate.hold()
            result = await call()
            self.landed.append(Landed(method, key, owner, result))
            gate = self._take(method, "after", key)
            if gate is not None:
                await gate.hold()
            return result
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def quiesce(self, timeout: float = GATE_TIMEOUT) -> None:
        """Return once no operation is inside this store (held or in flight)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    def landed_ops(self, method: str, key: str | None = None) -> list[Landed]:
        """The operations of `method` (on `key`) that reached the inner store."""
        return [op for op in self.landed if op.method == method and key in (None, op.key)]

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        key = record.idempotency_key
        if record.owner is not None:
            self.claims[record.owner] = key
        return await self._step(
            "claim", key, record.owner, lambda: self.inner.claim(record, now=now)
        )

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        return await self._step("get", key, None, lambda: self.inner.get(key, now=now))

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        await self._step(
            "complete",
            record.idempotency_key,
            owner,
            lambda: self.inner.complete(record, owner=owner),
        )

    async def release(self, key: str, *, owner: str) -> None:
        await self._step("release", key, owner, lambda: self.inner.release(key, owner=owner))

    async def renew(self, record: DataRecord) -> None:
        await self._step(
            "renew", record.idempotency_key, record.owner, lambda: self.inner.renew(record)
        )

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def aclose(self) -> None:
        """The inner store belongs to whoever built it; it stays open."""


class FunctionGate:
    """A gate inside the function under test.

    `entered` is set when the function starts; it then waits for `release(...)`, which
    says how it ends: return `value`, or raise `error` (any BaseException). The wait is
    bounded by `timeout` (None: unbounded, for loops whose clock a test moves).
    """

    def __init__(self, *, timeout: float | None = GATE_TIMEOUT) -> None:
        self.timeout = timeout
        self.entered = asyncio.Event()
        self.runs = 0
        self._go = asyncio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def release(self, value: Any = None, *, error: BaseException | None = None) -> None:
        """Let the function end (the first call wins; later ones do nothing)."""
        if self._go.is_set():
            return
        self._value = value
        self._error = error
        self._go.set()

    async def __call__(self) -> Any:
        self.runs += 1
        self.entered.set()
        await wait_event(self._go, self.timeout)
        if self._error is not None:
            raise self._error
        return self._value
