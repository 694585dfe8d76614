"""Run the benchmarks: ``python -m benchmarks.run [--smoke] [--out benchmarks/results]``.

Starts its own Valkey (a single server, a primary with one replica, a 3-node cluster)
and moto servers on free ports of 127.0.0.1, measures every case of `benchmarks.cases` in one
process, writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``, and
stops the servers.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import importlib.metadata
import os
import platform
import pstats
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import (
    ALL_GROUPS,
    BATCH,
    CLUSTER,
    REPLICA,
    Bench,
    Budget,
    Spec,
    case_list,
    needs_fresh_loop,
)
from benchmarks.machine import LoadWatch
from benchmarks.report import write_docs, write_results
from benchmarks.runner import KeyStream
from benchmarks.servers import (
    DUMMY_AWS_ENV,
    ChildServer,
    running_moto,
    running_replicated_valkey,
    running_valkey,
    running_valkey_cluster,
)

__all__ = ["main"]

GROUPS = ALL_GROUPS
_DISTRIBUTIONS = (
    "aioidempotency",
    "aws-lambda-powertools",
    "redis",
    "valkey-glide",
    "aiobotocore",
    "boto3",
    "moto",
)


def _versions(valkey: ChildServer | None) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if valkey is not None:
        versions["valkey-server"] = valkey.version.split(" v=")[-1].split(" ")[0]
    return versions


def _machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, {model}"


def _profile(bench: Bench, spec: Spec, calls: int) -> list[dict[str, Any]]:
    """cProfile `calls` calls of an in-memory case: the top functions by own time."""
    target = bench.target(spec)
    stream = KeyStream(spec.scenario, prefix=f"profile/{spec.id}", pool=100, group=1)
    if spec.scenario in ("replay", "cache-hit"):
        bench._prepare(target, stream.replay_keys())
    keys = [stream.key("p", n) for n in range(calls)]
    profiler = cProfile.Profile()
    if target.is_async:

        async def run_all() -> None:
            for key in keys:
                await target.call(key)

        profiler.enable()
        bench.loop.run_until_complete(run_all())
        profiler.disable()
    else:
        profiler.enable()
        for key in keys:
            target.call(key)
        profiler.disable()
    raw: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, function), (_, _, own, cumulative, _) in raw.items():
        short = re.sub(r"^.*/(site-packages|src|lib/python3\.\d+)/", "", filename)
        rows.append(
            {
                "function": f"{short}:{line}({function})",
                "own_us": own / calls * 1e6,
                "cum_us": cumulative / calls * 1e6,
            }
        )
    rows.sort(key=lambda r: -float(r["own_us"]))
    return [
        {**r, "own_us": round(r["own_us"], 2), "cum_us": round(r["cum_us"], 2)} for r in rows[:12]
    ]


def _show(case: dict[str, Any], prefix: str) -> None:
    print(
        f"{prefix} {case['id']:<75} {case['calls_per_s']:>10,.0f}/s "
        f"req/call={case['requests_per_call']} errors={case['errors']}",
        flush=True,
    )


def _headline_rounds(
    bench: Bench, specs: list[Spec], rounds: int, *, quiet: bool, fresh: bool = False
) -> dict[str, dict[str, Any]]:
    """Measure the headline cases `rounds` times, interleaved; keep each one's median.

    The cases that the floors (or a ratio: wait/no-wait, batch/Powertools) compare run
    back to back in every round, so that a burst of load from elsewhere on the machine
    hits all of them alike. `fresh`: the headline cases that need a fresh loop (the
    batch cases), measured once `Bench.new_loop` has run.
    """
    headline = [s for s in specs if s.headline and needs_fresh_loop(s) == fresh]
    runs: dict[str, list[dict[str, Any]]] = {s.id: [] for s in headline}
    for number in range(1, rounds + 1):
        for spec in headline:
            case = bench.measure(spec)
            runs[spec.id].append(case)
            if not quiet:
                _show(case, f"[round {number}/{rounds}]")
    chosen = {}
    for spec_id, cases in runs.items():
        ordered = sorted(cases, key=lambda c: float(c["calls_per_s"]))
        median = dict(ordered[len(ordered) // 2])
        median["rounds_calls_per_s"] = [c["calls_per_s"] for c in cases]
        chosen[spec_id] = median
    return chosen


PROFILED = (
    Spec("in-memory", "aioidempotency", "in-memory", "", "async", 1, "first"),
    Spec("in-memory", "aioidempotency", "in-memory", "", "async", 1, "cache-hit"),
    Spec("in-memory", "aioidempotency", "in-memory", "", "sync", 1, "first"),
    Spec("in-memory", "powertools", "in-memory", "", "sync", 1, "first"),
)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few calls per case, batches at 0 ms of work only (seconds)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: benchmarks/results; a temporary one for --smoke)",
    )
    parser.add_argument(
        "--groups",
        default=None,
        help=f"comma-separated subset of {GROUPS} (default: all; a smoke run leaves out "
        f"{CLUSTER}, whose glide cluster client crashed a CI smoke run once with SIGSEGV)",
    )
    parser.add_argument("--only", default="", help="run only the cases whose id contains this")
    parser.add_argument("--quiet", action="store_true", help="no line per case")
    parser.add_argument(
        "--docs", type=Path, default=None, help="also write the summary page here (Markdown)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.groups is None:
        args.groups = ",".join(g for g in GROUPS if not (args.smoke and g == CLUSTER))
    groups = tuple(g for g in args.groups.split(",") if g)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        print(f"unknown groups: {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.out is None:  # a smoke run never overwrites the committed results
        smoke = args.smoke
        args.out = (
            Path(tempfile.mkdtemp(prefix="aioidem-bench-")) if smoke else Path("benchmarks/results")
        )
    for name, value in DUMMY_AWS_ENV.items():
        os.environ.setdefault(name, value)
    # Powertools warns on every call without a Lambda context; Redis layer deprecation.
    warnings.filterwarnings("ignore", module="aws_lambda_powertools")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    specs = [s for s in case_list(groups, smoke=args.smoke) if args.only in s.id]
    budget = Budget(smoke=args.smoke, rounds=1 if args.smoke else 3)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    watch = LoadWatch()
    results: list[dict[str, Any]] = []
    profiles: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        valkey = (
            stack.enter_context(running_valkey())
            if any(s.group in ("valkey", BATCH) for s in specs)
            else None
        )
        replicated = (
            stack.enter_context(running_replicated_valkey())
            if any(s.group == REPLICA for s in specs)
            else None
        )
        cluster = (
            stack.enter_context(running_valkey_cluster())
            if any(s.group == CLUSTER for s in specs)
            else None
        )
        moto = (
            stack.enter_context(running_moto())
            if any(s.group == "dynamodb" for s in specs)
            else None
        )
        bench = Bench(budget, valkey, moto, replicated, cluster)
        stack.callback(bench.close)
        measured = _headline_rounds(bench, specs, budget.rounds, quiet=args.quiet)
        fresh = False
        for index, spec in enumerate(specs, 1):
            if needs_fresh_loop(spec) and not fresh:
                bench.new_loop()
                fresh = True
                # The batch cases first: their glide client is then the first one of
                # the process since the old loop closed, as in a Lambda function.
                measured |= _headline_rounds(
                    bench, specs, budget.rounds, quiet=args.quiet, fresh=True
                )
                if any(s.group == BATCH for s in specs):
                    bench.end_batches()
            case = measured.get(spec.id) or bench.measure(spec)
            results.append(case)
            if not args.quiet and spec.id not in measured:
                _show(case, f"[{index:3}/{len(specs)}]")
        if "in-memory" in groups and not args.only:
            for spec in PROFILED:
                profiles[spec.id] = _profile(bench, spec, 50 if args.smoke else 5000)
        seen = valkey or (replicated.primary if replicated else None)
        versions = _versions(seen or (cluster.nodes[0] if cluster else None))
    command = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    doc: dict[str, Any] = {
        "meta": {
            "command": command.strip(),
            "smoke": args.smoke,
            "started": started.strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(time.perf_counter() - clock, 1),
            "machine": _machine(),
            "load": watch.summary(),
            "versions": versions,
            "groups": list(groups),
        },
        "cases": results,
        "profiles": profiles,
    }
    paths = write_results(doc, args.out)
    if args.docs is not None:
        write_docs(doc, args.docs, chart=paths.get("png"))
        paths["docs"] = args.docs
    for floor in doc["floors"]:
        print(f"{floor['status']:>4}  {floor['floor']}: {floor['measured']}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
