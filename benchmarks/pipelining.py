"""Automatic pipelining, measured: ``python -m benchmarks.pipelining``.

On one Valkey server, for glide and redis-py asyncio, at concurrency 1, 10, 100 and
1,000, first executions and replays (100 B), four cases measured back to back in every
round, in reverse order every other round (interleaved rounds, medians):

- the floor: the raw client, one command per request (``SET NX GET``, then ``SET`` of
  the completed record for a won claim);
- the pipelined floor: the same two commands per call, those of all calls in one loop
  turn sent as one non-atomic batch (`benchmarks.targets.floor_glide_pipelined`);
- aioidempotency (async engine, atomic path) without and with ``auto_pipeline=True``.

Calls per second, p50 and p99 latency per call, and the client's CPU per call (this
process). Each case runs for ``--seconds``; the machine is noisy, so compare within a
round's medians, not across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import PIPELINED, UNPIPELINED, Bench, Budget, Spec
from benchmarks.machine import LoadWatch
from benchmarks.report import portable, publish
from benchmarks.servers import running_valkey

__all__ = ["CLIENTS", "CONCURRENCY", "case_specs", "main", "render"]

CLIENTS = ("glide", "redis-py")
CONCURRENCY = (1, 10, 100, 1000)
SCENARIOS = ("first", "replay")
#: The four cases of a row, in the order they run and are shown.
KINDS = ("floor", "floor pipelined", "ours", "ours pipelined")


@dataclasses.dataclass(frozen=True)
class _PipeliningBudget(Budget):
    """Each case for `seconds` (a few calls in a smoke run), no memory pass."""

    seconds: float = 1.0

    def duration_of(self, spec: Spec) -> float:
        return 0.3 if self.smoke else self.seconds

    def max_calls(self, spec: Spec) -> int:
        return max(30, 2 * spec.concurrency) if self.smoke else 10**7

    def warmup_calls(self, spec: Spec) -> int:
        return spec.concurrency if self.smoke else max(2 * spec.concurrency, 100)

    def memory_calls(self, spec: Spec) -> int:
        return 0


def _spec(client: str, kind: str, concurrency: int, scenario: str) -> Spec:
    library = "floor" if kind.startswith("floor") else "aioidempotency"
    if library == "floor":
        variant = PIPELINED if kind.endswith("pipelined") else ""
    else:  # ours: turned off, or on (the default) as its own store
        variant = PIPELINED if kind.endswith("pipelined") else UNPIPELINED
    path = "" if library == "floor" else "atomic"
    return Spec("valkey", library, client, path, "async", concurrency, scenario, variant=variant)


def case_specs(concurrency: Sequence[int] = CONCURRENCY) -> list[tuple[str, Spec]]:
    """(kind, spec) of every case, in the order a round runs them."""
    return [
        (kind, _spec(client, kind, c, scenario))
        for client in CLIENTS
        for scenario in SCENARIOS
        for c in concurrency
        for kind in KINDS
    ]


def _round_order(specs: list[tuple[str, Spec]], index: int) -> list[Spec]:
    """The cases of round `index`: each row's four back to back, in reverse order every
    other round (so that no case always runs first or last of its row)."""
    ordered = [spec for _, spec in specs]
    if index % 2 == 0:
        return ordered
    rows = [ordered[i : i + len(KINDS)] for i in range(0, len(ordered), len(KINDS))]
    return [spec for row in rows for spec in reversed(row)]


def _median(cases: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(float(c[field]) for c in cases))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipelining", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per case and round")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=list(CONCURRENCY), help="levels to run"
    )
    parser.add_argument("--smoke", action="store_true", help="a few calls, 1 round (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.smoke:
        args.rounds = 1
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    specs = case_specs(args.concurrency)
    budget = _PipeliningBudget(smoke=args.smoke, seconds=args.seconds)
    watch = LoadWatch()
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {spec.id: [] for _, spec in specs}
    with running_valkey() as valkey:
        bench = Bench(budget, valkey, None)
        try:
            for index in range(args.rounds):
                for spec in _round_order(specs, index):
                    case = bench.measure(spec)
                    if case["errors"]:
                        raise RuntimeError(f"{spec.id}: {case['first_error']}")
                    runs[spec.id].append(case)
        finally:
            bench.close()
    rows = []
    for kind, spec in specs:
        cases = runs[spec.id]
        rows.append(
            {
                "id": spec.id,
                "kind": kind,
                "client": spec.client,
                "scenario": spec.scenario,
                "concurrency": spec.concurrency,
                "calls_per_s": round(_median(cases, "calls_per_s"), 1),
                "p50_us": round(_median(cases, "p50_us"), 1),
                "p99_us": round(_median(cases, "p99_us"), 1),
                "cpu_us_per_call": round(_median(cases, "cpu_us_per_call"), 1),
                "requests_per_call": _median(cases, "requests_per_call"),
                "rounds_calls_per_s": [c["calls_per_s"] for c in cases],
            }
        )
    command = " ".join(
        ["python -m benchmarks.pipelining", *(sys.argv[1:] if argv is None else argv)]
    )
    doc: dict[str, Any] = {
        "meta": {
            "command": command.strip(),
            "seconds": round(time.perf_counter() - started, 1),
            "rounds": args.rounds,
            "load": watch.summary(),
        },
        "cases": rows,
    }
    publish(doc, args.json, render(portable(doc)), watch.sentence())
    return 0


def render(doc: dict[str, Any]) -> str:
    """One row per client, scenario and concurrency: calls/s of the four cases, then
    p50/p99 (us) of ours without and with pipelining, and its effect."""
    by_key: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for row in doc["cases"]:
        key = (row["client"], row["scenario"], row["concurrency"])
        by_key.setdefault(key, {})[row["kind"]] = row
    lines = [
        "| client | scenario | c | floor calls/s | floor pipelined | ours | ours pipelined "
        "| pipelined / not | ours p50 us, off / on | ours p99 us, off / on "
        "| client CPU us/call, off / on |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (client, scenario, c), kinds in by_key.items():
        off, on = kinds["ours"], kinds["ours pipelined"]
        lines.append(
            f"| {client} | {scenario} | {c:,} | {kinds['floor']['calls_per_s']:,.0f} | "
            f"{kinds['floor pipelined']['calls_per_s']:,.0f} | {off['calls_per_s']:,.0f} | "
            f"{on['calls_per_s']:,.0f} | {on['calls_per_s'] / off['calls_per_s']:.2f}x | "
            f"{off['p50_us']:,.0f} / {on['p50_us']:,.0f} | "
            f"{off['p99_us']:,.0f} / {on['p99_us']:,.0f} | "
            f"{off['cpu_us_per_call']:,.0f} / {on['cpu_us_per_call']:,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
