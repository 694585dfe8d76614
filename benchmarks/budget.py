"""The async engine's CPU per call, split by where it goes: ``python -m benchmarks.budget``.

For the in-memory store and Valkey (valkey-glide and redis-py asyncio, atomic path),
first executions and replays, one call at a time and 100 at once, it measures the
CPU a call costs this process and splits it into the engine, the store adapter, the
client library, the event loop and the rest.

How:

- Each case runs in interleaved rounds; in every round, an unprofiled pass and then a
  profiled pass of the same number of calls, back to back.
- The unprofiled pass gives the truth: CPU per call of the whole process
  (`time.process_time`) and of the main thread (`time.thread_time`), where the event
  loop, the engine, the store adapter and the clients' Python code run. The rest of
  the process is other threads: valkey-glide's native core (its Rust runtime), for
  the other cases next to nothing. It is reported as "client, native threads".
- The profiled pass runs under cProfile with `time.thread_time` as its timer, so that
  the native threads' CPU is not charged to whatever Python function the main thread
  was in. Every function's own time goes to the category of its module (below); a
  function of the standard library, a builtin or another package (json, hashlib,
  socket sends, glide's cffi calls, ...) is charged to the category of its callers,
  in proportion to the time each caller spent in it (climbing further up while the
  caller has no category).
- The profiler's overhead is subtracted: a calibration measures what one profiled
  function call costs (a trivial function called with and without the profiler, in
  this run); each function's own time loses its number of calls times that. The
  categories are then scaled so that they add up to the unprofiled pass's main-thread
  CPU per call (medians of the rounds): the profile gives the split, the unprofiled
  pass the total.

Categories: *engine* ``aioidempotency._async.engine`` and the modules it calls
(``_calls``, ``_keys``, ``_records``, ``_events``, ``_local_cache``, ``_async.flights``,
``_async.lease``); *store adapter* the store modules (``_async.cache``,
``_async.cache_clients``, ``_async.cache_paths``, ``_async.clients``, ``_async.glide``,
``_async.redis``, ``_async.dynamodb``, ``_async.memory``, ``_lua``, ``_memory_table``,
...); *aioidempotency, other* every other module of the package (the decorator,
serialization, configuration); *client* ``glide``, ``glide_shared``, ``redis``,
``hiredis``; *event loop* ``asyncio`` and ``selectors``; *other* the benchmark's own
driver, the decorated function, and what could not be traced to a category.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import re
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import Bench, Budget, Spec
from benchmarks.machine import LoadWatch
from benchmarks.report import portable, publish
from benchmarks.servers import DUMMY_AWS_ENV, ChildServer, running_valkey

__all__ = ["CATEGORIES", "categorize", "main", "split_profile"]

CATEGORIES = (
    "engine",
    "store adapter",
    "aioidempotency, other",
    "client",
    "event loop",
    "other",
)
_ENGINE = re.compile(
    r"aioidempotency/(_async/engine|_calls|_keys|_records|_events|_local_cache"
    r"|_async/flights|_async/lease)\.py$"
)
_ADAPTER = re.compile(
    r"aioidempotency/(_async/(cache|cache_clients|cache_paths|clients|glide|redis|dynamodb"
    r"|dynamodb_client|memory|store)|_lua|_memory_table|_dynamodb_items|_cache_errors"
    r"|_contract)\.py$"
)
_CLIENT = re.compile(r"/(glide|glide_shared|redis|hiredis)/")
_LOOP = re.compile(r"/asyncio/|/selectors\.py$|select\.epoll|_asyncio\.")
_OWN = re.compile(r"/benchmarks/")
Func = tuple[str, int, str]


def categorize(func: Func) -> str | None:
    """The category of a profiled function, or None for the standard library, a builtin
    or another package (charged to its callers)."""
    filename, _, name = func
    path = filename.replace("\\", "/")
    if _ENGINE.search(path):
        return "engine"
    if _ADAPTER.search(path):
        return "store adapter"
    if "/aioidempotency/" in path:
        return "aioidempotency, other"
    if _CLIENT.search(path):
        return "client"
    if _LOOP.search(path) or (filename == "~" and _LOOP.search(name)):
        return "event loop"
    if _OWN.search(path):
        return "other"  # the driver, the decorated function
    return None  # the standard library, builtins, other packages (glide's cffi, sniffio)


def split_profile(
    raw: dict[Func, tuple[Any, ...]],
    *,
    per_call_overhead: float = 0.0,
    modules: dict[str, float] | None = None,
) -> dict[str, float]:
    """Seconds of own time per category (profiler overhead subtracted per function call);
    `modules`, if given, receives the same seconds per ``category: module file``."""
    totals: dict[str, float] = defaultdict(float)

    def charge(func: Func, amount: float, depth: int, first: bool) -> None:
        category = categorize(func)
        if category is not None:
            totals[category] += amount
            if modules is not None:
                name = func[2] if func[0] == "~" else _short(func[0])
                modules[f"{category}: {name}"] = modules.get(f"{category}: {name}", 0.0) + amount
            return
        callers: dict[Func, tuple[Any, ...]] = raw.get(func, (0, 0, 0, 0, {}))[4]
        if depth > 30 or not callers:
            totals["other"] += amount
            return
        # Own time of `func` under each caller (first step), else its cumulative time.
        weights = {c: float(v[2] if first else v[3]) for c, v in callers.items()}
        total = sum(weights.values())
        if total <= 0:
            weights = {c: 1.0 for c in callers}
            total = float(len(callers))
        for caller, weight in weights.items():
            charge(caller, amount * weight / total, depth + 1, False)

    for func, (_, calls, own, _, _) in raw.items():
        charge(func, max(0.0, own - calls * per_call_overhead), 0, True)
    return {name: totals.get(name, 0.0) for name in CATEGORIES}


def _short(filename: str) -> str:
    path = filename.replace("\\", "/")
    return re.sub(r"^.*/(site-packages|src|lib/python3\.\d+)/", "", path)


def _calibrate(rounds: int = 5, calls: int = 200_000) -> float:
    """Thread CPU seconds that cProfile adds to one call of a trivial Python function."""

    def nothing() -> None:
        return None

    def loop() -> None:
        for _ in range(calls):
            nothing()

    estimates = []
    for _ in range(rounds):
        start = time.thread_time()
        loop()
        plain = time.thread_time() - start
        profiler = cProfile.Profile(time.thread_time)
        start = time.thread_time()
        profiler.runcall(loop)
        profiled = time.thread_time() - start
        estimates.append(max(0.0, (profiled - plain) / calls))
    return statistics.median(estimates)


def case_specs() -> list[Spec]:
    """In-memory, glide and redis-py (atomic path); first and replay; c=1 and c=100."""
    specs = []
    for scenario in ("first", "replay"):
        for c in (1, 100):
            specs.append(Spec("in-memory", "aioidempotency", "in-memory", "", "async", c, scenario))
            for client in ("glide", "redis-py"):
                specs.append(
                    Spec("valkey", "aioidempotency", client, "atomic", "async", c, scenario)
                )
    return specs


async def _drive(call: Callable[[str], Awaitable[Any]], keys: list[str], workers: int) -> None:
    feed = iter(keys)

    async def worker() -> None:
        for key in feed:
            await call(key)

    await asyncio.gather(*(worker() for _ in range(workers)))


class _Case:
    """One case's target, its keys and what its passes measured."""

    def __init__(self, bench: Bench, spec: Spec, calls: int) -> None:
        self.bench, self.spec, self.calls = bench, spec, calls
        self.target = bench.target(spec)
        self.passes = 0
        self.pool: list[str] = []
        if spec.scenario == "replay":
            self.pool = [f"budget/{spec.id}/r{n}" for n in range(500)]
            bench._prepare(self.target, self.pool)
        self.process_us: list[float] = []
        self.thread_us: list[float] = []
        self.profiled_thread_us: list[float] = []
        self.server_us: list[float] = []
        self.requests: list[float] = []
        self.profile: dict[Func, tuple[Any, ...]] = {}

    def keys(self, count: int) -> list[str]:
        self.passes += 1
        if self.pool:
            return [self.pool[n % len(self.pool)] for n in range(count)]
        return [f"budget/{self.spec.id}/p{self.passes}/{n}" for n in range(count)]

    def run(self, count: int, profiler: cProfile.Profile | None = None) -> tuple[float, float]:
        """Run `count` calls; (process, main thread) CPU seconds."""
        keys = self.keys(count)
        loop = self.bench.loop
        process, thread = time.process_time(), time.thread_time()
        if profiler is not None:
            profiler.enable()
        loop.run_until_complete(_drive(self.target.call, keys, self.spec.concurrency))
        if profiler is not None:
            profiler.disable()
        return time.process_time() - process, time.thread_time() - thread

    def round(self, server: ChildServer | None) -> None:
        requests, server_cpu = self.target.requests(), _cpu(server)
        process, thread = self.run(self.calls)
        self.process_us.append(process / self.calls * 1e6)
        self.thread_us.append(thread / self.calls * 1e6)
        self.requests.append((self.target.requests() - requests) / self.calls)
        if server is not None:
            self.server_us.append((_cpu(server) - server_cpu) / self.calls * 1e6)
        profiler = cProfile.Profile(time.thread_time)
        _, thread = self.run(self.calls, profiler)
        self.profiled_thread_us.append(thread / self.calls * 1e6)
        raw: dict[Func, tuple[Any, ...]] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        _merge(self.profile, raw)

    def result(self, overhead: float, rounds: int) -> dict[str, Any]:
        modules: dict[str, float] = {}
        split = split_profile(self.profile, per_call_overhead=overhead, modules=modules)
        traced = sum(split.values())
        thread = statistics.median(self.thread_us)
        process = statistics.median(self.process_us)
        scale = thread / (traced / (self.calls * rounds) * 1e6) if traced > 0 else 0.0
        row: dict[str, Any] = {
            "id": self.spec.id,
            "store": "in-memory" if self.spec.client == "in-memory" else "Valkey",
            "client": self.spec.client,
            "scenario": self.spec.scenario,
            "concurrency": self.spec.concurrency,
            "calls_per_round": self.calls,
            "process_cpu_us": round(process, 1),
            "process_cpu_us_rounds": [round(v, 1) for v in self.process_us],
            "main_thread_cpu_us": round(thread, 1),
            "profiled_main_thread_cpu_us": round(statistics.median(self.profiled_thread_us), 1),
            "native_threads_us": round(max(0.0, process - thread), 1),
            "requests_per_call": round(statistics.median(self.requests), 3),
            "server_cpu_us": round(statistics.median(self.server_us), 1)
            if self.server_us
            else None,
        }
        per_call = 1e6 * scale / (self.calls * rounds)
        row["split_us"] = {name: round(seconds * per_call, 1) for name, seconds in split.items()}
        top = sorted(modules.items(), key=lambda item: -item[1])[:25]
        row["modules_us"] = {name: round(seconds * per_call, 1) for name, seconds in top}
        return row


def _cpu(server: ChildServer | None) -> float:
    return server.cpu_seconds() if server is not None else 0.0


def _merge(into: dict[Func, tuple[Any, ...]], raw: dict[Func, tuple[Any, ...]]) -> None:
    """Add one profile's stats to another (calls, own and cumulative time, callers)."""
    for func, (cc, nc, tt, ct, callers) in raw.items():
        if func not in into:
            into[func] = (cc, nc, tt, ct, dict(callers))
            continue
        occ, onc, ott, oct_, ocallers = into[func]
        for caller, values in callers.items():
            old = ocallers.get(caller)
            ocallers[caller] = (
                values if old is None else tuple(a + b for a, b in zip(old, values, strict=True))
            )
        into[func] = (occ + cc, onc + nc, ott + tt, oct_ + ct, ocallers)


def render(doc: dict[str, Any]) -> str:
    """The budget as a Markdown table."""
    header = [
        "store, client", "scenario", "c", "CPU us/call (process)", "main thread",
        *CATEGORIES[:3], "client (Python)", "client (native threads)", *CATEGORIES[4:],
        "profiled / unprofiled",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in doc["cases"]:
        split = row["split_us"]
        overhead = row["profiled_main_thread_cpu_us"] / row["main_thread_cpu_us"]
        cells = [
            f"{row['store']}, {row['client']}" if row["store"] != "in-memory" else "in-memory",
            row["scenario"],
            str(row["concurrency"]),
            f"{row['process_cpu_us']:.1f}",
            f"{row['main_thread_cpu_us']:.1f}",
            *(f"{split[name]:.1f}" for name in CATEGORIES[:3]),
            f"{split['client']:.1f}",
            f"{row['native_threads_us']:.1f}",
            *(f"{split[name]:.1f}" for name in CATEGORIES[4:]),
            f"{overhead:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def _maybe_valkey(needed: bool) -> Iterator[ChildServer | None]:
    if not needed:
        yield None
        return
    with running_valkey() as server:
        yield server


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.budget", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per pass (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--smoke", action="store_true", help="50 calls, 1 round (seconds)")
    parser.add_argument("--only", default="", help="only the cases whose id contains this")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.smoke:
        args.calls, args.rounds = 50, 1
    for name, value in DUMMY_AWS_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    specs = [s for s in case_specs() if args.only in s.id]
    watch = LoadWatch()
    started = time.perf_counter()
    with _maybe_valkey(any(s.group == "valkey" for s in specs)) as valkey:
        bench = Bench(Budget(smoke=args.smoke), valkey, None)
        try:
            cases = [_Case(bench, spec, args.calls) for spec in specs]
            for case in cases:  # warm up: connections, scripts loaded, caches filled
                case.run(min(args.calls, 200))
            overhead = _calibrate()
            for _ in range(args.rounds):
                for case in cases:
                    case.round(valkey if case.spec.group == "valkey" else None)
            rows = [case.result(overhead, args.rounds) for case in cases]
        finally:
            bench.close()
    command = " ".join(["python -m benchmarks.budget", *(sys.argv[1:] if argv is None else argv)])
    doc: dict[str, Any] = {
        "meta": {
            "command": command.strip(),
            "seconds": round(time.perf_counter() - started, 1),
            "calls_per_pass": args.calls,
            "rounds": args.rounds,
            "profiler_overhead_us_per_function_call": round(overhead * 1e6, 3),
            "load": watch.summary(),
        },
        "cases": rows,
    }
    publish(doc, args.json, render(portable(doc)), watch.sentence())
    print(f"Profiler overhead subtracted: {overhead * 1e6:.3f} us per profiled function call.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
