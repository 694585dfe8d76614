"""What the async decorator costs when it makes no request: ``python -m benchmarks.overhead``.

One call at a time on one event loop (``await f(event=...)``), 100 B event and result:

- *direct*: the undecorated function, the baseline;
- *no key*: `@idempotent_function_async` whose ``event_key_jmespath`` finds nothing in
  the event, so the function runs unprotected (the warning is filtered out, as an
  application that has seen it once would);
- *disabled*: ``POWERTOOLS_IDEMPOTENCY_DISABLED=1`` (the warning filtered out too);
- *cache hit*: ``use_local_cache=True``, every call a hit of the engine's local cache.

Interleaved rounds (each case once per round, in reverse order every other round),
medians: calls/s, wall and CPU time per call. Then one cProfile pass per decorated case
(``time.thread_time`` as its timer): the functions with the most own time, with the
profiler's per-call overhead left in, so the split is a proportion, not a budget.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aioidempotency import IdempotencyConfig, IdempotencyDisabledWarning, idempotent_function_async
from aioidempotency.persistence import InMemoryPersistenceLayer
from benchmarks.machine import LoadWatch
from benchmarks.report import portable, publish

__all__ = ["CASES", "main", "render"]

CASES = ("direct", "no key", "disabled", "cache hit")
CACHE_HIT_FLOOR = 150_000
"""Calls/s a local-cache hit must reach (the async engine, one call at a time)."""
NO_KEY_FLOOR = 0.9
"""A call without a key, as a fraction of the direct call's calls/s."""

EVENT = {"order_id": "o-1", "blob": "x" * 100}
Call = Callable[[], Awaitable[Any]]


async def work(event: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": event["order_id"], "blob": event["blob"]}


def _calls() -> dict[str, Call]:
    def decorated(config: IdempotencyConfig) -> Callable[..., Awaitable[Any]]:
        store = InMemoryPersistenceLayer()
        return idempotent_function_async(
            data_keyword_argument="event", persistence_store=store, config=config
        )(work)

    no_key = decorated(IdempotencyConfig(event_key_jmespath="customer_id"))
    disabled = decorated(IdempotencyConfig())
    hit = decorated(IdempotencyConfig(use_local_cache=True))

    async def call_disabled() -> Any:
        os.environ["POWERTOOLS_IDEMPOTENCY_DISABLED"] = "1"
        try:
            return await disabled(event=EVENT)
        finally:
            del os.environ["POWERTOOLS_IDEMPOTENCY_DISABLED"]

    return {
        "direct": lambda: work(event=EVENT),
        "no key": lambda: no_key(event=EVENT),
        "disabled": call_disabled,
        "cache hit": lambda: hit(event=EVENT),
    }


async def _time(call: Call, n: int) -> tuple[float, float]:
    """Seconds of wall clock and of this thread's CPU for `n` calls."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        await call()
    return time.perf_counter() - wall, time.thread_time() - cpu


async def _profile(call: Call, n: int, top: int) -> list[dict[str, Any]]:
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    for _ in range(n):
        await call()
    profile.disable()
    stats = pstats.Stats(profile)
    total = sum(row[2] for row in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]  # type: ignore[attr-defined]
    return [
        {
            "function": f"{Path(file).name}:{line}({name})",
            "own_share": round(own / total, 3) if total else 0.0,
            "calls_per_call": round(calls / n, 2),
        }
        for (file, line, name), (_, calls, own, _, _) in rows
    ]


async def _measure(rounds: int, calls: int, profile_calls: int) -> dict[str, Any]:
    cases = _calls()
    for call in cases.values():  # warm up (and complete the cache hit's record)
        await _time(call, 200)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for index in range(rounds):
        order = list(cases) if index % 2 == 0 else list(reversed(cases))
        for name in order:
            runs[name].append(await _time(cases[name], calls))
    rows = []
    direct = statistics.median(calls / wall for wall, _ in runs["direct"])
    for name, measured in runs.items():
        rate = statistics.median(calls / wall for wall, _ in measured)
        rows.append(
            {
                "case": name,
                "calls_per_s": round(rate, 1),
                "wall_us_per_call": round(1e6 / rate, 2),
                "cpu_us_per_call": round(
                    statistics.median(cpu for _, cpu in measured) / calls * 1e6, 2
                ),
                "vs_direct": round(rate / direct, 3),
                "rounds_calls_per_s": [round(calls / wall, 1) for wall, _ in measured],
            }
        )
    profiles = {
        name: await _profile(cases[name], profile_calls, 12) for name in ("no key", "cache hit")
    }
    return {"cases": rows, "profiles": profiles}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--calls", type=int, default=20_000, help="calls per case and round")
    parser.add_argument("--smoke", action="store_true", help="a few calls, 1 round (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.smoke:
        args.rounds, args.calls = 1, 200
    warnings.filterwarnings("ignore", message="No idempotency key value found")
    warnings.filterwarnings("ignore", category=IdempotencyDisabledWarning)
    watch = LoadWatch()
    started = time.perf_counter()
    figures = asyncio.run(_measure(args.rounds, args.calls, max(args.calls // 4, 50)))
    command = " ".join(["python -m benchmarks.overhead", *(sys.argv[1:] if argv is None else argv)])
    doc: dict[str, Any] = {
        "meta": {
            "command": command.strip(),
            "seconds": round(time.perf_counter() - started, 1),
            "rounds": args.rounds,
            "calls": args.calls,
            "load": watch.summary(),
        },
        **figures,
    }
    publish(doc, args.json, render(portable(doc)), watch.sentence())
    return 0


def render(doc: dict[str, Any]) -> str:
    """The cases against the direct call and the floors, then each profile's top."""
    rows = {row["case"]: row for row in doc["cases"]}
    lines = [
        "| case | calls/s | wall us/call | CPU us/call | vs direct | floor |",
        "|---|---|---|---|---|---|",
    ]
    floors = {
        "no key": f">= {NO_KEY_FLOOR:g}x direct: "
        + ("PASS" if rows["no key"]["vs_direct"] >= NO_KEY_FLOOR else "MISS"),
        "cache hit": f">= {CACHE_HIT_FLOOR:,} calls/s: "
        + ("PASS" if rows["cache hit"]["calls_per_s"] >= CACHE_HIT_FLOOR else "MISS"),
    }
    for name in CASES:
        row = rows[name]
        lines.append(
            f"| {name} | {row['calls_per_s']:,.0f} | {row['wall_us_per_call']:.2f} | "
            f"{row['cpu_us_per_call']:.2f} | {row['vs_direct']:.3f} | {floors.get(name, '-')} |"
        )
    for name, top in doc["profiles"].items():
        lines += ["", f"Profile of *{name}* (share of own CPU time, calls per call):", ""]
        lines += ["| function | share | calls/call |", "|---|---|---|"]
        lines += [
            f"| `{row['function']}` | {row['own_share']:.0%} | {row['calls_per_call']:g} |"
            for row in top
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
