"""The measuring loops: N async workers on one event loop, or N threads.

A run hands call numbers out from a shared counter until it has made `max_calls`
calls or its time is up; each worker times its own calls. CPU time is the process's
(`time.process_time`, every thread of this process, servers excluded: they are child
processes). A memory pass repeats a short run under `tracemalloc` and reports the
peak of Python allocations above what was allocated before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["KeyStream", "Refused", "RunStats", "run_async", "run_threads"]


class Refused(Exception):
    """A floor call that found the key in progress (the libraries raise their own)."""


def _refused_types() -> tuple[type[BaseException], ...]:
    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyAlreadyInProgressError as PowertoolsInProgress,
    )

    from aioidempotency import IdempotencyAlreadyInProgressError

    return (Refused, IdempotencyAlreadyInProgressError, PowertoolsInProgress)


REFUSED: tuple[type[BaseException], ...] = ()


@dataclasses.dataclass(frozen=True)
class KeyStream:
    """Which key call number `n` of a pass uses.

    - ``first``: a new key every call;
    - ``replay`` and ``cache-hit``: the `pool` keys completed before the run, in turn;
    - ``duplicates``: `group` consecutive calls share a key, so that about `group`
      calls of one key are in flight together.
    """

    scenario: str
    prefix: str
    pool: int = 1
    group: int = 1

    def replay_keys(self) -> list[str]:
        return [f"{self.prefix}:r{i}" for i in range(self.pool)]

    def key(self, tag: str, n: int) -> str:
        if self.scenario == "first":
            return f"{self.prefix}:{tag}{n}"
        if self.scenario == "duplicates":
            return f"{self.prefix}:{tag}d{n // self.group}"
        return f"{self.prefix}:r{n % self.pool}"


@dataclasses.dataclass
class RunStats:
    """What one pass measured."""

    calls: int = 0
    ok: int = 0
    refused: int = 0
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    latencies_ns: list[int] = dataclasses.field(default_factory=list)
    requests: int = 0
    executed: int = 0
    server_cpu_seconds: float | None = None
    peak_bytes: int | None = None

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def percentile_us(self, q: float) -> float:
        if not self.latencies_ns:
            return math.nan
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index] / 1000

    def note(self, exc: BaseException) -> None:
        global REFUSED
        if not REFUSED:
            REFUSED = _refused_types()
        if isinstance(exc, REFUSED):
            self.refused += 1
        else:
            self.errors += 1
            if not self.first_error:
                self.first_error = f"{type(exc).__name__}: {exc}"[:300]


@dataclasses.dataclass
class _Plan:
    stream: KeyStream
    tag: str
    max_calls: int
    duration: float


async def _async_pass(
    call: Callable[[str], Awaitable[Any]], plan: _Plan, concurrency: int
) -> RunStats:
    stats = RunStats()
    numbers = itertools.count()
    stream, tag = plan.stream, plan.tag
    deadline = time.perf_counter() + plan.duration
    clock = time.perf_counter_ns
    now = time.perf_counter

    async def worker() -> None:
        latencies = stats.latencies_ns
        while True:
            n = next(numbers)
            if n >= plan.max_calls or now() > deadline:
                return
            key = stream.key(tag, n)
            start = clock()
            try:
                await call(key)
            except Exception as exc:
                stats.note(exc)
            else:
                stats.ok += 1
            latencies.append(clock() - start)

    cpu = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stats.seconds = time.perf_counter() - wall
    stats.cpu_seconds = time.process_time() - cpu
    stats.calls = len(stats.latencies_ns)
    return stats


def _thread_pass(call: Callable[[str], Any], plan: _Plan, threads: int) -> RunStats:
    stats = RunStats()
    numbers = itertools.count()
    lock = threading.Lock()
    stream, tag = plan.stream, plan.tag
    deadline = time.perf_counter() + plan.duration
    clock = time.perf_counter_ns
    now = time.perf_counter
    start_line = threading.Barrier(threads + 1)

    def worker() -> None:
        latencies: list[int] = []
        ok = 0
        start_line.wait()
        while True:
            n = next(numbers)
            if n >= plan.max_calls or now() > deadline:
                break
            key = stream.key(tag, n)
            start = clock()
            try:
                call(key)
            except Exception as exc:
                with lock:
                    stats.note(exc)
            else:
                ok += 1
            latencies.append(clock() - start)
        with lock:
            stats.latencies_ns.extend(latencies)
            stats.ok += ok

    pool = [threading.Thread(target=worker, name=f"bench-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    cpu = time.process_time()
    wall = time.perf_counter()
    start_line.wait()
    for thread in pool:
        thread.join()
    stats.seconds = time.perf_counter() - wall
    stats.cpu_seconds = time.process_time() - cpu
    stats.calls = len(stats.latencies_ns)
    return stats


def _deltas(
    stats: RunStats,
    before: tuple[int, int, float],
    requests: Callable[[], int],
    executed: Callable[[], int],
    server_cpu: Callable[[], float] | None,
) -> None:
    stats.requests = requests() - before[0]
    stats.executed = executed() - before[1]
    if server_cpu is not None:
        stats.server_cpu_seconds = server_cpu() - before[2]


async def run_async(
    call: Callable[[str], Awaitable[Any]],
    stream: KeyStream,
    *,
    concurrency: int,
    duration: float,
    max_calls: int,
    warmup_calls: int,
    memory_calls: int,
    requests: Callable[[], int],
    executed: Callable[[], int],
    server_cpu: Callable[[], float] | None = None,
) -> RunStats:
    """Warm up, measure, then (if `memory_calls`) measure peak memory in a short pass.

    `requests()` and `executed()` read the target's counters of store requests and of
    function bodies run; the timed pass's share of each is kept, and so is that of
    `server_cpu()`, the CPU seconds of the store's server process when it has one.
    """
    if warmup_calls:
        await _async_pass(call, _Plan(stream, "w", warmup_calls, math.inf), concurrency)
    before = requests(), executed(), server_cpu() if server_cpu else 0.0
    stats = await _async_pass(call, _Plan(stream, "t", max_calls, duration), concurrency)
    _deltas(stats, before, requests, executed, server_cpu)
    if memory_calls:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            await _async_pass(call, _Plan(stream, "m", memory_calls, math.inf), concurrency)
            stats.peak_bytes = max(0, tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
    return stats


def run_threads(
    call: Callable[[str], Any],
    stream: KeyStream,
    *,
    threads: int,
    duration: float,
    max_calls: int,
    warmup_calls: int,
    memory_calls: int,
    requests: Callable[[], int],
    executed: Callable[[], int],
    server_cpu: Callable[[], float] | None = None,
) -> RunStats:
    """`run_async` for a sync callable, from `threads` threads (1 = sequential)."""
    if warmup_calls:
        _thread_pass(call, _Plan(stream, "w", warmup_calls, math.inf), threads)
    before = requests(), executed(), server_cpu() if server_cpu else 0.0
    stats = _thread_pass(call, _Plan(stream, "t", max_calls, duration), threads)
    _deltas(stats, before, requests, executed, server_cpu)
    if memory_calls:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            _thread_pass(call, _Plan(stream, "m", memory_calls, math.inf), threads)
            stats.peak_bytes = max(0, tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
    return stats
