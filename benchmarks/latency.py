"""A call's latency on a real network, modelled and checked: ``python -m benchmarks.latency``.

One call at a time (concurrency 1), first executions and replays, 100 B. For each case
it measures, against local servers (interleaved rounds, medians):

- the round trips a call needs: the requests its client sends to the store, counted
  on the client side (every request of these cases is its own round trip: none of
  them pipelines);
- the client CPU a call costs (`time.process_time` of this process: library and
  client; the servers are child processes).

The model: ``latency(rtt) = client CPU per call + round trips x rtt``, at 0.3 ms (a
cache in the same zone), 1 ms and 5 ms (DynamoDB). It leaves out the server's own time
per request (tens of microseconds for Valkey) and the client's waits for the CPU on a
busy machine.

The check: every Valkey case again, its clients connected through `DelayProxy`
(`benchmarks.delay_proxy`: an in-process TCP proxy holding each chunk for half the
round-trip time each way) at ``--check-rtt-ms``; the measured median latency next to
the model at that round-trip time and at the one the proxy delivered (its chunks'
mean delay, twice). DynamoDB cases are modelled from moto (requests and client CPU are
the client's, whatever the server) and not checked: moto's own time per request is
milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import Bench, Budget, Spec
from benchmarks.delay_proxy import delay_proxy
from benchmarks.machine import LoadWatch
from benchmarks.report import portable, publish
from benchmarks.servers import DUMMY_AWS_ENV, ChildServer, running_moto, running_valkey

__all__ = ["RTTS_MS", "case_specs", "main", "model_us"]

RTTS_MS = (0.3, 1.0, 5.0)


@dataclasses.dataclass(frozen=True)
class _LatencyBudget(Budget):
    """Sequential calls for a fixed time (or count), no memory pass."""

    seconds: float = 1.5
    dynamodb_calls: int = 40

    def duration_of(self, spec: Spec) -> float:
        return 0.3 if self.smoke else self.seconds

    def max_calls(self, spec: Spec) -> int:
        if spec.group == "dynamodb":
            return 6 if self.smoke else self.dynamodb_calls
        return 20 if self.smoke else 10**7

    def warmup_calls(self, spec: Spec) -> int:
        return 2 if self.smoke else (10 if spec.group == "dynamodb" else 50)

    def memory_calls(self, spec: Spec) -> int:
        return 0


def case_specs(*, dynamodb: bool = True) -> list[Spec]:
    """Valkey: ours (async glide and redis-py, sync redis-py; atomic path), Powertools
    (redis-py) and the raw redis-py floor; DynamoDB: ours (async, sync) and Powertools."""
    specs = []
    for scenario in ("first", "replay"):
        specs += [
            Spec("valkey", "aioidempotency", "glide", "atomic", "async", 1, scenario),
            Spec("valkey", "aioidempotency", "redis-py", "atomic", "async", 1, scenario),
            Spec("valkey", "aioidempotency", "redis-py", "atomic", "sync", 1, scenario),
            Spec("valkey", "powertools", "redis-py", "", "sync", 1, scenario),
            Spec("valkey", "floor", "redis-py", "", "sync", 1, scenario),
        ]
        if dynamodb:
            specs += [
                Spec("dynamodb", "aioidempotency", "aiobotocore", "", "async", 1, scenario),
                Spec("dynamodb", "aioidempotency", "aiobotocore", "", "sync", 1, scenario),
                Spec("dynamodb", "powertools", "boto3", "", "sync", 1, scenario),
            ]
    return specs


def model_us(cpu_us: float, round_trips: float, rtt_ms: float) -> float:
    """The modelled latency of one call (microseconds)."""
    return cpu_us + round_trips * rtt_ms * 1000


def _label(spec: Spec) -> str:
    who = {"aioidempotency": "ours", "powertools": "Powertools", "floor": "raw client"}
    store = "Valkey" if spec.group == "valkey" else "DynamoDB"
    how = "async" if spec.mode == "async" else "sync"
    client = "boto3" if spec.client == "aiobotocore" and how == "sync" else spec.client
    return f"{store}, {who[spec.library]} {how} ({client})"  # sync code: the boto3 twin


def _rounds(bench: Bench, specs: list[Spec], rounds: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {s.id: [] for s in specs}
    for _ in range(rounds):
        for spec in specs:
            case = bench.measure(spec)
            if case["errors"]:
                raise RuntimeError(f"{spec.id}: {case['first_error']}")
            runs[spec.id].append(case)
    return runs


def _median(cases: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(float(c[field]) for c in cases))


@contextlib.contextmanager
def _servers(dynamodb: bool) -> Iterator[tuple[ChildServer, ChildServer | None]]:
    with contextlib.ExitStack() as stack:
        valkey = stack.enter_context(running_valkey())
        moto = stack.enter_context(running_moto()) if dynamodb else None
        yield valkey, moto


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=1.5, help="per Valkey case and round")
    parser.add_argument("--dynamodb-calls", type=int, default=40, help="per DynamoDB case/round")
    parser.add_argument("--check-rtt-ms", type=float, default=1.0, help="the proxy's RTT")
    parser.add_argument("--no-dynamodb", action="store_true", help="Valkey cases only")
    parser.add_argument("--smoke", action="store_true", help="a few calls, 1 round (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.smoke:
        args.rounds = 1
    for name, value in DUMMY_AWS_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", module="aws_lambda_powertools")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    specs = case_specs(dynamodb=not args.no_dynamodb)
    budget = _LatencyBudget(
        smoke=args.smoke, seconds=args.seconds, dynamodb_calls=args.dynamodb_calls
    )
    watch = LoadWatch()
    started = time.perf_counter()
    with _servers(not args.no_dynamodb) as (valkey, moto):
        bench = Bench(budget, valkey, moto)
        try:
            local = _rounds(bench, specs, args.rounds)
        finally:
            bench.close()
        check_rtt = args.check_rtt_ms / 1000
        with delay_proxy((valkey.host, valkey.port), check_rtt) as proxy:
            proxied = dataclasses.replace(valkey, port=proxy.port)  # same process, new port
            bench = Bench(budget, proxied, None)
            try:
                valkey_specs = [s for s in specs if s.group == "valkey"]
                bench.measure(valkey_specs[0])  # connections up before the delays are counted
                proxy.reset()
                remote = _rounds(bench, valkey_specs, args.rounds)
            finally:
                bench.close()
            delivered = proxy.delivered_rtt()
    rows = []
    for spec in specs:
        cases = local[spec.id]
        cpu = _median(cases, "cpu_us_per_call")
        trips = _median(cases, "requests_per_call")
        row: dict[str, Any] = {
            "id": spec.id,
            "label": _label(spec),
            "scenario": spec.scenario,
            "round_trips": trips,
            "client_cpu_us": round(cpu, 1),
            "local_p50_us": round(_median(cases, "p50_us"), 1),
            "model_us": {str(rtt): round(model_us(cpu, trips, rtt), 1) for rtt in RTTS_MS},
        }
        if spec.id in remote:
            row["check_p50_us"] = round(_median(remote[spec.id], "p50_us"), 1)
            row["check_p99_us"] = round(_median(remote[spec.id], "p99_us"), 1)
            row["check_cpu_us"] = round(_median(remote[spec.id], "cpu_us_per_call"), 1)
            row["check_model_us"] = round(model_us(cpu, trips, args.check_rtt_ms), 1)
            if delivered is not None:
                row["check_model_delivered_us"] = round(model_us(cpu, trips, delivered * 1e3), 1)
        rows.append(row)
    command = " ".join(["python -m benchmarks.latency", *(sys.argv[1:] if argv is None else argv)])
    doc: dict[str, Any] = {
        "meta": {
            "command": command.strip(),
            "seconds": round(time.perf_counter() - started, 1),
            "rounds": args.rounds,
            "check_rtt_ms": args.check_rtt_ms,
            "delivered_rtt_ms": None if delivered is None else round(delivered * 1e3, 3),
            "load": watch.summary(),
        },
        "cases": rows,
    }
    publish(doc, args.json, render(portable(doc)), watch.sentence())
    return 0


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def render(doc: dict[str, Any]) -> str:
    """The model table and the check table, as Markdown."""
    meta = doc["meta"]
    rtts = [f"{rtt:g} ms" for rtt in RTTS_MS]
    lines = [
        "| case | scenario | round trips | client CPU us/call | "
        + " | ".join(f"model at {r}, ms" for r in rtts)
        + " |",
        "|" + "|".join("---" for _ in range(4 + len(rtts))) + "|",
    ]
    for row in doc["cases"]:
        models = [_ms(row["model_us"][str(rtt)]) for rtt in RTTS_MS]
        lines.append(
            f"| {row['label']} | {row['scenario']} | {row['round_trips']:g} | "
            f"{row['client_cpu_us']:,.0f} | " + " | ".join(models) + " |"
        )
    delivered = meta["delivered_rtt_ms"]
    lines += [
        "",
        f"Check through the delay proxy at {meta['check_rtt_ms']:g} ms "
        f"(delivered: {delivered if delivered is not None else '-'} ms):",
        "",
        "| case | scenario | model at nominal RTT, ms | model at delivered RTT, ms | "
        "measured p50, ms | measured / model (delivered) | measured p99, ms | "
        "local p50 (no proxy), ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["cases"]:
        if "check_p50_us" not in row:
            continue
        base = row.get("check_model_delivered_us") or row["check_model_us"]
        lines.append(
            f"| {row['label']} | {row['scenario']} | {_ms(row['check_model_us'])} | "
            f"{_ms(row.get('check_model_delivered_us'))} | {_ms(row['check_p50_us'])} | "
            f"{row['check_p50_us'] / base:.2f} | {_ms(row['check_p99_us'])} | "
            f"{_ms(row['local_p50_us'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
