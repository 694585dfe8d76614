"""Write a run's results: JSON (everything), Markdown (tables) and a PNG chart.

The floors (targets the library is held to, the batch one from `benchmarks.batch`) are
evaluated here, from the cases of the same run. Nothing written holds an absolute
path: a path inside the repository is written relative to it, any other one as
``.../`` and its last name.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["evaluate_floors", "render_markdown", "write_chart", "write_docs", "write_results"]

Case = dict[str, Any]

THREADS = 16
CACHE_HIT_TARGET = 150_000
REPLICA = "valkey-replica"  # benchmarks.cases: a Valkey primary with one replica
CLUSTER = "valkey-cluster"  # benchmarks.cases: a 3-node Valkey cluster
BATCH = "batch"
WAIT = "wait_replicas=1"
BATCH_RECORDS = 100  # records per batch (benchmarks.batch.BATCH_SIZE)
BATCH_FLOOR = 3.0  # benchmarks.batch.FLOOR
ROOT = Path(__file__).resolve().parent.parent

# An absolute path: "/" at the start of a string or after a space, quote, "(" or "=".
_ABSOLUTE = re.compile(r"""(?<![^\s(`'"=])/[^\s:()`'"]+""")


def _portable_path(match: re.Match[str]) -> str:
    path = Path(match.group(0))
    try:
        return path.relative_to(ROOT).as_posix() or "."
    except ValueError:
        return f".../{path.name}" if path.name else "..."


def publish(doc: dict[str, Any], json_path: Path | None, table: str, watch_sentence: str) -> None:
    """Write a tool's `doc` (made `portable`) to `json_path` if given, and print its
    table and the command that made it."""
    doc = portable(doc)  # no absolute path in what is written
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table)
    print()
    print(
        f"Command: `{doc['meta']['command']}` ({doc['meta']['seconds']:.0f} s); {watch_sentence}."
    )


def portable(value: Any) -> Any:
    """`value` (a run's document, or any part of it) with every absolute path in its
    strings made relative to the repository, or cut to its last name outside it."""
    if isinstance(value, str):
        return _ABSOLUTE.sub(_portable_path, value)
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, dict):
        return {portable(key): portable(item) for key, item in value.items()}  # keys too
    return value


def _find(cases: Iterable[Case], **criteria: Any) -> Case | None:
    criteria.setdefault("variant", "")
    for case in cases:
        if all(case.get(name) == value for name, value in criteria.items()):
            return case
    return None


def _rate(case: Case | None) -> float:
    if case is None or not case.get("calls"):
        return math.nan
    return float(case["calls_per_s"])


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _spread(case: Case | None) -> str:
    rounds = [] if case is None else case.get("rounds_calls_per_s") or []
    if len(rounds) < 2:
        return ""
    return f" (rounds {' / '.join(f'{r:,.0f}' for r in rounds)})"


def _ratio_floor(name: str, measured: Case | None, base: Case | None, target: float) -> Case:
    ratio = _rate(measured) / _rate(base)
    ok = None if math.isnan(ratio) else ratio >= target
    return {
        "floor": name,
        "measured": f"{_rate(measured):,.0f}{_spread(measured)} vs "
        f"{_rate(base):,.0f}{_spread(base)} calls/s",
        "ratio": None if math.isnan(ratio) else round(ratio, 3),
        "target": target,
        "status": _status(ok),
    }


def evaluate_floors(cases: list[Case]) -> list[Case]:
    """The floors, as PASS/MISS with the ratio measured in this run."""
    v = {"group": "valkey", "payload_bytes": 100}

    def ours(client: str, concurrency: int, scenario: str) -> Case | None:
        return _find(
            cases, library="aioidempotency", client=client, path="atomic", mode="async",
            concurrency=concurrency, scenario=scenario, **v,
        )  # fmt: skip

    def floor(client: str, concurrency: int, scenario: str) -> Case | None:
        return _find(
            cases, library="floor", client=client, mode="async", concurrency=concurrency,
            scenario=scenario, **v,
        )  # fmt: skip

    # The async engine against the raw client doing the same requests (issue 14's floors),
    # for glide and for redis-py asyncio alike.
    floors: list[Case] = []
    for client in ("glide", "redis-py"):
        for scenario, concurrency, target, what in (
            ("first", 100, 0.7, "first execution"),
            ("replay", 100, 0.6, "replay"),
            ("duplicates", 100, 0.6, "duplicates in flight"),
            ("first", 1000, 0.6, "first execution"),
        ):
            floors.append(
                _ratio_floor(
                    f"Valkey, {client} atomic, c={concurrency:,}, {what} >= {target:g} of the "
                    f"floor (raw {client}, same requests)",
                    ours(client, concurrency, scenario),
                    floor(client, concurrency, scenario),
                    target,
                )
            )
        floors.append(
            _ratio_floor(
                f"Valkey, {client} atomic, first execution: c=1,000 >= 0.9 of c=100 (no collapse)",
                ours(client, 1000, "first"),
                ours(client, 100, "first"),
                0.9,
            )
        )
    replays = [
        c
        for c in cases
        if c["library"] == "aioidempotency"
        and c["scenario"] == "replay"
        and c["group"] in ("valkey", "dynamodb")
        and c["path"] in ("atomic", "")
        and c["calls"]
        # The cache scripts copy at most 64 KiB of a value (a larger copy blocks the
        # server); a larger result is read with a second, plain GET.
        and (c["group"] == "dynamodb" or c["payload_bytes"] <= 64 * 1024)
    ]
    counts = sorted({c["requests_per_call"] for c in replays}, key=str)
    floors.append(
        {
            "floor": "A replay costs one store round trip (every atomic-path replay of a "
            f"result up to 64 KiB, and every DynamoDB replay: {len(replays)} cases)",
            "measured": f"requests per call: {', '.join(map(str, counts)) or '-'}",
            "ratio": None,
            "target": 1,
            "status": _status(bool(replays) and counts == [1] if replays else None),
        }
    )
    hits = [
        c
        for c in cases
        if c["library"] == "aioidempotency" and c["scenario"] == "cache-hit" and c["calls"]
    ]
    hit_counts = sorted({c["requests_per_call"] for c in hits}, key=str)
    floors.append(
        {
            "floor": f"A local-cache hit costs no request ({len(hits)} cases)",
            "measured": f"requests per call: {', '.join(map(str, hit_counts)) or '-'}",
            "ratio": None,
            "target": 0,
            "status": _status(bool(hits) and hit_counts == [0] if hits else None),
        }
    )
    hit = _find(
        cases, library="aioidempotency", client="glide", path="atomic", mode="async",
        concurrency=1, scenario="cache-hit", **v,
    )  # fmt: skip
    rate = _rate(hit)
    floors.append(
        {
            "floor": "A local-cache hit runs at >= 150,000 calls/s (async, Valkey glide, c=1)",
            "measured": f"{rate:,.0f} calls/s",
            "ratio": None if math.isnan(rate) else round(rate / CACHE_HIT_TARGET, 3),
            "target": 1.0,
            "status": _status(None if math.isnan(rate) else rate >= CACHE_HIT_TARGET),
        }
    )
    ours_batch = _find(cases, group=BATCH, library="aioidempotency", path="async-def", work_ms=0)
    pt_batch = _find(cases, group=BATCH, library="powertools", work_ms=0)
    if ours_batch is not None or pt_batch is not None:
        floors.append(
            _ratio_floor(
                f"SQS batch of {BATCH_RECORDS} new records, no work per record: process_batch "
                "(glide, async def, c=10) >= 3x Powertools BatchProcessor (batches/s)",
                ours_batch,
                pt_batch,
                BATCH_FLOOR,
            )
        )
    # The sync engine against Powertools on its own client (redis-py), one call at a time
    # and from 16 threads; glide's sync store is in the tables.
    for threads, scenario, target in (
        (1, "first", 1.2),
        (1, "replay", 2.0),
        (THREADS, "first", 1.5),
        (THREADS, "replay", 1.5),
    ):
        pt_sync = _find(
            cases, library="powertools", mode="sync", concurrency=threads, scenario=scenario, **v
        )
        ours_sync = _find(
            cases, library="aioidempotency", client="redis-py", path="atomic", mode="sync",
            concurrency=threads, scenario=scenario, **v,
        )  # fmt: skip
        calls = "one call at a time" if threads == 1 else f"{threads} threads"
        floors.append(
            _ratio_floor(
                f"Sync engine (redis-py, atomic), {calls}, {scenario}: >= {target:g}x "
                f"Powertools ({calls})",
                ours_sync,
                pt_sync,
                target,
            )
        )
    return floors


# --- ratios per case ---------------------------------------------------------------------


def _floor_of(cases: list[Case], case: Case) -> Case | None:
    if case["library"] == "floor" or case["scenario"] == "cache-hit":
        return None
    if case["mode"] == "sync" and case["client"] != "redis-py":
        return None
    return _find(
        cases,
        group=case["group"],
        library="floor",
        client="aiobotocore" if case["group"] == "dynamodb" else case["client"],
        mode="async" if case["group"] == "dynamodb" else case["mode"],
        concurrency=case["concurrency"],
        scenario=case["scenario"],
        payload_bytes=case["payload_bytes"],
    )


def _powertools_of(cases: list[Case], case: Case) -> Case | None:
    if case["library"] == "powertools":
        return None
    batch = {"work_ms": case.get("work_ms", 0)} if case["group"] == BATCH else {}
    return _find(
        cases,
        group=case["group"],
        library="powertools",
        mode="sync",
        concurrency=case["concurrency"] if case["mode"] == "sync" else THREADS,
        scenario=case["scenario"],
        payload_bytes=case["payload_bytes"],
        **batch,
    )


def _no_wait_of(cases: list[Case], case: Case) -> Case | None:
    """The twin without ``wait_replicas`` of a replicated case that waits."""
    if case["group"] != REPLICA or case["variant"] != WAIT:
        return None
    return _find(
        cases,
        group=REPLICA,
        library=case["library"],
        client=case["client"],
        path=case["path"],
        mode=case["mode"],
        concurrency=case["concurrency"],
        scenario=case["scenario"],
        payload_bytes=case["payload_bytes"],
    )


def add_ratios(cases: list[Case]) -> None:
    """Add `of_floor` and `vs_powertools` (throughput ratios in this run) to each case,
    and `vs_no_wait` to a replicated case that waits for its replica."""
    for case in cases:
        floor = _floor_of(cases, case)
        reference = _powertools_of(cases, case)
        case["of_floor"] = _ratio(case, floor)
        case["vs_powertools"] = _ratio(case, reference)
        if case["group"] == REPLICA:
            case["vs_no_wait"] = _ratio(case, _no_wait_of(cases, case))


def _ratio(case: Case, base: Case | None) -> float | None:
    value = _rate(case) / _rate(base)
    return None if math.isnan(value) or math.isinf(value) else round(value, 3)


# --- Markdown ------------------------------------------------------------------------------


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _who(case: Case) -> str:
    parts = [case["library"], case["client"]]
    if case["path"]:
        parts.append(case["path"])
    if case["variant"]:
        parts.append(f"({case['variant']})")
    if case.get("work_ms"):
        parts.append(f"(work {case['work_ms']} ms)")
    return " ".join(parts)


def _how(case: Case) -> str:
    if case["mode"] == "async":
        return f"async c={case['concurrency']}"
    return "sync seq" if case["concurrency"] == 1 else f"sync {case['concurrency']} thr"


def _size(payload: int) -> str:
    return f"{payload // 1000} KB" if payload >= 1000 else f"{payload} B"


def _load(load: dict[str, Any] | None) -> str:
    """The machine's load during the run (`benchmarks.machine.LoadWatch.summary`)."""
    if not load or load.get("busy_cores") is None:
        return ""
    return (
        f" Load during the run: {load['busy_cores']:.2f} of {load['cores']} cores busy on"
        f" average (everything on the machine), 1-minute load average"
        f" {load['loadavg_1m_start']} to {load['loadavg_1m_end']}."
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _pivot(cases: list[Case], group: str, payload: int, mode: str) -> list[str]:
    """calls/s by series (rows) and scenario x concurrency (columns)."""
    chosen = [
        c
        for c in cases
        if c["group"] == group
        and c["payload_bytes"] == payload
        and c["mode"] == mode
        and c["scenario"] != "cache-hit"
        and not c["variant"]
    ]
    columns = sorted(
        {(c["scenario"], c["concurrency"]) for c in chosen},
        key=lambda sc: (("first", "replay", "duplicates").index(sc[0]), sc[1]),
    )
    series: list[str] = []
    for c in chosen:
        if _who(c) not in series:
            series.append(_who(c))
    label = "c" if mode == "async" else "thr"
    header = ["calls/s", *(f"{s} {label}={n}" for s, n in columns)]
    rows = []
    for who in series:
        row = [who]
        for scenario, n in columns:
            case = next(
                (
                    c
                    for c in chosen
                    if _who(c) == who and c["scenario"] == scenario and c["concurrency"] == n
                ),
                None,
            )
            row.append(_num(_rate(case)) if case else "")
        rows.append(row)
    return _table(header, rows)


def _cpu_table(cases: list[Case]) -> list[str]:
    chosen = [c for c in cases if c["group"] == "in-memory"]
    keys = sorted(
        {(c["scenario"], c["payload_bytes"]) for c in chosen},
        key=lambda k: (("first", "replay", "cache-hit").index(k[0]), k[1]),
    )
    who = [
        ("aioidempotency async", {"library": "aioidempotency", "mode": "async", "variant": ""}),
        ("aioidempotency sync shim", {"library": "aioidempotency", "mode": "sync"}),
        ("Powertools", {"library": "powertools"}),
    ]
    header = ["CPU us/call (peak KiB)", *(name for name, _ in who), "Powertools / async"]
    rows = []
    for scenario, payload in keys:
        row = [f"{scenario} {_size(payload)}"]
        values = []
        for _, criteria in who:
            case = _find(chosen, scenario=scenario, payload_bytes=payload, **criteria)
            cpu = None if case is None else case["cpu_us_per_call"]
            values.append(cpu)
            peak = None if case is None else case.get("peak_kib")
            row.append("" if case is None else f"{_num(cpu, 1)} ({_num(peak, 0)})")
        ratio = values[2] / values[0] if values[0] and values[2] else None
        row.append(_times(ratio))
        rows.append(row)
    return _table(header, rows)


def _dynamodb_table(cases: list[Case]) -> list[str]:
    chosen = [c for c in cases if c["group"] == "dynamodb"]
    header = [
        "DynamoDB (moto)", "scenario", "payload", "req/call", "calls/s vs Powertools",
        "CPU us/call (with SDK)", "outcomes",
    ]  # fmt: skip
    rows = []
    for c in chosen:
        rows.append(
            [
                f"{_who(c)}, {_how(c)}",
                c["scenario"],
                _size(c["payload_bytes"]),
                _num(c["requests_per_call"], 3),
                _times(c.get("vs_powertools")) if c["library"] != "powertools" else "1.00x",
                _num(c["cpu_us_per_call"], 0),
                _outcomes(c),
            ]
        )
    return _table(header, rows)


def _outcomes(case: Case) -> str:
    text = f"{case['executed']}/{case['replayed']}/{case['refused']}"
    if case["errors"]:
        text += f" **{case['errors']} errors**"
    return text


def _full_table(cases: list[Case]) -> list[str]:
    header = [
        "group", "who", "how", "scenario", "payload", "calls", "calls/s", "of floor",
        "vs Powertools", "p50 us", "p99 us", "req/call", "CPU us/call", "server CPU us/call",
        "peak KiB", "exec/replay/refused",
    ]  # fmt: skip
    rows = []
    for c in cases:
        dynamo = c["group"] == "dynamodb"
        rows.append(
            [
                c["group"],
                _who(c),
                _how(c),
                c["scenario"],
                _size(c["payload_bytes"]),
                _num(c["calls"]),
                "(ratio only)" if dynamo else _num(_rate(c)),
                _pct(c.get("of_floor")),
                _times(c.get("vs_powertools")),
                "-" if dynamo else _num(c["p50_us"], 0),
                "-" if dynamo else _num(c["p99_us"], 0),
                _num(c["requests_per_call"], 3),
                _num(c["cpu_us_per_call"], 1),
                _num(c.get("server_cpu_us_per_call"), 1),
                _num(c["peak_kib"], 0),
                _outcomes(c),
            ]
        )
    return _table(header, rows)


def _headline_table(cases: list[Case]) -> list[str]:
    """Where the time goes at the headline point: Valkey, c=100, first execution, 100 B."""
    rows = []
    for c in cases:
        point = (c["group"], c["scenario"], c["payload_bytes"]) == ("valkey", "first", 100)
        async_100 = c["mode"] == "async" and c["concurrency"] == 100 and c["client"] == "glide"
        powertools_16 = c["library"] == "powertools" and c["concurrency"] == THREADS
        if point and (async_100 or powertools_16):
            rows.append(
                [
                    _floor_kind(c) if c["library"] == "floor" else _who(c),
                    _how(c),
                    _num(_rate(c)),
                    _num(c["cpu_us_per_call"], 1),
                    _num(c.get("server_cpu_us_per_call"), 1),
                    _num(c["p50_us"], 0),
                    _num(c["p99_us"], 0),
                ]
            )
    header = ["who", "how", "calls/s", "client CPU us/call", "server CPU us/call", "p50 us"]
    return _table([*header, "p99 us"], rows)


def _pair(before: Any, after: Any, digits: int = 0) -> str:
    return f"{_num(before, digits)} / {_num(after, digits)}"


def _replica_pairs(cases: list[Case]) -> list[tuple[Case, Case]]:
    """(without, with ``wait_replicas=1``) for every replicated case that waits."""
    pairs = []
    for case in cases:
        twin = _no_wait_of(cases, case)
        if twin is not None:
            pairs.append((twin, case))
    return pairs


def _replica_table(cases: list[Case]) -> list[str]:
    header = [
        "Valkey + 1 replica", "scenario", "calls/s, wait 0", "calls/s, wait 1",
        "wait / no wait", "p50 us, 0 / 1", "p99 us, 0 / 1", "commands/call, 0 / 1",
        "server CPU us/call, 0 / 1",
    ]  # fmt: skip
    rows = []
    for plain, waiting in _replica_pairs(cases):
        errors = plain["errors"] + waiting["errors"]
        rows.append(
            [
                f"{waiting['client']}, {_how(waiting)}",
                waiting["scenario"],
                _num(_rate(plain)),
                _num(_rate(waiting)),
                _times(waiting.get("vs_no_wait")) + (f" **{errors} errors**" if errors else ""),
                _pair(plain["p50_us"], waiting["p50_us"]),
                _pair(plain["p99_us"], waiting["p99_us"]),
                _pair(plain["requests_per_call"], waiting["requests_per_call"], 3),
                _pair(
                    plain.get("server_cpu_us_per_call"), waiting.get("server_cpu_us_per_call"), 1
                ),
            ]
        )
    return _table(header, rows)


def _cluster_table(cases: list[Case]) -> list[str]:
    """Each aioidempotency cluster case next to its client's floor in the same rounds."""
    header = [
        "3-node cluster, c=100", "scenario", "floor calls/s (rounds)", "ours calls/s (rounds)",
        "of floor", "client CPU us/call, floor / ours", "server CPU us/call, floor / ours",
        "requests/call, floor / ours", "p50 us, floor / ours", "p99 us, floor / ours",
    ]  # fmt: skip
    rows = []
    for case in cases:
        if case["group"] != CLUSTER or case["library"] != "aioidempotency":
            continue
        floor = _floor_of(cases, case)
        if floor is None:
            continue
        errors = case["errors"] + floor["errors"]
        rows.append(
            [
                case["client"],
                case["scenario"],
                _num(_rate(floor)) + _spread(floor),
                _num(_rate(case)) + _spread(case),
                _num(case.get("of_floor"), 3) + (f" **{errors} errors**" if errors else ""),
                _pair(floor["cpu_us_per_call"], case["cpu_us_per_call"], 1),
                _pair(floor.get("server_cpu_us_per_call"), case.get("server_cpu_us_per_call"), 1),
                _pair(floor["requests_per_call"], case["requests_per_call"], 3),
                _pair(floor["p50_us"], case["p50_us"]),
                _pair(floor["p99_us"], case["p99_us"]),
            ]
        )
    return _table(header, rows)


def _replica_summary(cases: list[Case]) -> str:
    """One sentence of this run's figures: the range of wait/no-wait per concurrency."""
    parts = []
    for concurrency in sorted({w["concurrency"] for _, w in _replica_pairs(cases)}):
        ratios = [
            w["vs_no_wait"]
            for _, w in _replica_pairs(cases)
            if w["concurrency"] == concurrency and w.get("vs_no_wait") is not None
        ]
        if ratios:
            low, high = min(ratios), max(ratios)
            span = f"{low:.2f}x" if low == high else f"{low:.2f}x to {high:.2f}x"
            span = f"{span} (c={concurrency})"
            parts.append(span)
    if not parts:
        return ""
    return (
        "In this run, throughput with `wait_replicas=1` was "
        + " and ".join(parts)
        + " of that without (both clients, first executions and replays)."
    )


def _batch_table(cases: list[Case]) -> list[str]:
    header = [
        f"batch of {BATCH_RECORDS} new SQS records", "work/record", "records/s",
        "vs Powertools", "p50 ms/batch", "p99 ms/batch", "CPU us/record", "requests/record",
        "peak KiB/batch", "outcomes",
    ]  # fmt: skip
    rows = []
    for c in cases:
        if c["group"] != BATCH:
            continue
        if c["library"] == "powertools":
            who = "Powertools BatchProcessor + idempotent_function (redis-py)"
        else:
            kind = "async def" if c["path"] == "async-def" else "plain def"
            who = f"aioidempotency process_batch_sync (glide), {kind} handler, c=10"
        cpu = c["cpu_us_per_call"]
        per_call = c["requests_per_call"]
        rows.append(
            [
                who,
                f"{c.get('work_ms', 0)} ms",
                _num(_rate(c) * BATCH_RECORDS),
                "1.00x" if c["library"] == "powertools" else _times(c.get("vs_powertools")),
                _num(None if c["p50_us"] is None else c["p50_us"] / 1000, 1),
                _num(None if c["p99_us"] is None else c["p99_us"] / 1000, 1),
                _num(None if cpu is None else cpu / BATCH_RECORDS, 1),
                _num(None if per_call is None else per_call / BATCH_RECORDS, 2),
                _num(c["peak_kib"], 0),
                _outcomes(c),
            ]
        )
    return _table(header, rows)


def _floor_kind(case: Case) -> str:
    if case["variant"] == "scripts":
        return "floor: raw glide sending the atomic path's claim and completion script"
    return "floor: raw glide, SET NX GET + SET"


def _profiles(profiles: dict[str, list[Case]]) -> list[str]:
    lines: list[str] = []
    for name, rows in profiles.items():
        lines += ["", f"**{name}** (cProfile, top functions by own time, us per call)", ""]
        lines += _table(
            ["function", "own us/call", "cumulative us/call"],
            [[f"`{r['function']}`", _num(r["own_us"], 2), _num(r["cum_us"], 2)] for r in rows],
        )
    return lines


def render_markdown(
    doc: dict[str, Any],
    *,
    chart: str | None,
    full: bool = True,
    title: str | None = None,
    preamble: str = "",
) -> str:
    """The run as Markdown: floors, summaries, and (if `full`) every case."""
    meta, cases = doc["meta"], doc["cases"]
    kind = "smoke" if meta["smoke"] else "full"
    lines = [
        title or f"# Benchmark results ({kind} run, {meta['started']})",
        "",
        *([preamble, ""] if preamble else []),
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s). "
        f"Machine: {meta['machine']}.{_load(meta.get('load'))} Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        "## Floors",
        "",
    ]
    lines += _table(
        ["floor", "measured", "ratio", "target", "status"],
        [
            [f["floor"], f["measured"], _num(f["ratio"], 3), _num(f["target"], 2), f["status"]]
            for f in doc["floors"]
        ],
    )
    if chart:
        lines += ["", f"![benchmark chart]({chart})"]
    lines += [
        "",
        "## The headline point: Valkey, first execution, 100 B, c=100 (glide) vs Powertools",
        "",
        "Client CPU: this process (library, client, glide's threads); server CPU: the Valkey "
        "process; both per call, over the timed pass.",
        "",
    ]
    lines += _headline_table(cases)
    for mode, title in (("async", "async engine"), ("sync", "sync entry points")):
        lines += ["", f"## Valkey, 100 B payload, {title}: calls per second", ""]
        lines += _pivot(cases, "valkey", 100, mode)
    for payload in (10_000, 200_000):
        for mode in ("async", "sync"):
            pivot = _pivot(cases, "valkey", payload, mode)
            if len(pivot) > 2:
                lines += ["", f"## Valkey, {_size(payload)} payload, {mode}: calls per second", ""]
                lines += pivot
    if any(c["group"] == REPLICA for c in cases):
        lines += ["", "## The cost of `wait_replicas`: Valkey with one replica", ""]
        lines += [REPLICA_METHOD, ""]
        lines += _replica_table(cases)
        summary = _replica_summary(cases)
        if summary:
            lines += ["", summary]
    if any(c["group"] == CLUSTER for c in cases):
        lines += ["", "## A 3-node Valkey cluster: first executions and replays, c=100", ""]
        lines += [CLUSTER_METHOD, ""]
        lines += _cluster_table(cases)
    if any(c["group"] == BATCH for c in cases):
        lines += ["", "## SQS batches: process_batch vs Powertools BatchProcessor", ""]
        lines += [BATCH_METHOD, ""]
        lines += _batch_table(cases)
    lines += [
        "",
        "## The library's own CPU per call (in-memory stores, no I/O)",
        "",
        "`time.process_time` per call over the whole run, sequential; peak = tracemalloc "
        "peak above the start of a short pass (KiB).",
        "",
    ]
    lines += _cpu_table(cases)
    lines += _profiles(doc.get("profiles", {}))
    lines += ["", "## DynamoDB (moto server): requests per call and ratios to Powertools", ""]
    lines += [
        "moto answers in 4-10 ms per request, so absolute DynamoDB timings measure moto; "
        "only ratios to Powertools in this run are shown.",
        "",
    ]
    lines += _dynamodb_table(cases)
    if full:
        lines += ["", "## Every case", ""]
        lines += [
            "`of floor`: throughput / the raw client doing the same store operations with the "
            "same client and concurrency; `vs Powertools`: throughput / Powertools on the same "
            "store (same thread count for sync cases, 16 threads for async ones); "
            "`req/call`: requests sent to the store per call (client-side count); "
            "`CPU us/call`: process CPU (library + client, servers excluded); "
            "`exec/replay/refused`: calls that ran the function / got a stored result / "
            "were refused as in progress.",
            "",
        ]
        lines += _full_table(cases)
    return "\n".join(lines) + "\n"


# --- chart ---------------------------------------------------------------------------------


def write_chart(doc: dict[str, Any], path: Path) -> bool:
    """A 2x2 PNG; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases: list[Case] = doc["cases"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    concurrency = [1, 10, 100, 1000]
    series = [
        ("floor (raw glide)", {"library": "floor", "client": "glide"}, "k", "--"),
        ("floor (raw redis-py)", {"library": "floor", "client": "redis-py"}, "0.5", "--"),
        ("ours glide atomic", {"library": "aioidempotency", "client": "glide", "path": "atomic"},
         "C0", "-"),
        ("ours glide protocol",
         {"library": "aioidempotency", "client": "glide", "path": "protocol"}, "C1", "-"),
        ("ours redis-py atomic",
         {"library": "aioidempotency", "client": "redis-py", "path": "atomic"}, "C2", "-"),
        ("ours redis-py protocol",
         {"library": "aioidempotency", "client": "redis-py", "path": "protocol"}, "C3", "-"),
    ]  # fmt: skip
    for ax, scenario in zip(axes[0], ("first", "replay"), strict=True):
        lines = False
        for label, criteria, color, style in series:
            ys = [
                _rate(
                    _find(
                        cases,
                        group="valkey",
                        mode="async",
                        concurrency=n,
                        scenario=scenario,
                        payload_bytes=100,
                        **criteria,
                    )
                )
                for n in concurrency
            ]
            ax.plot(concurrency, ys, style, marker="o", color=color, label=label)
            lines = lines or any(not math.isnan(y) for y in ys)
        for threads, style in ((1, ":"), (THREADS, "-.")):
            pt = _rate(
                _find(
                    cases,
                    group="valkey",
                    library="powertools",
                    mode="sync",
                    concurrency=threads,
                    scenario=scenario,
                    payload_bytes=100,
                )
            )
            if not math.isnan(pt):
                name = "sequential" if threads == 1 else f"{threads} threads"
                ax.axhline(pt, color="C4", linestyle=style, label=f"Powertools, {name}")
        if lines:  # a partial run (--only) may have none: a log axis needs data
            ax.set_xscale("log")
        ax.set_xticks(concurrency, [str(n) for n in concurrency])
        ax.set_xlabel("concurrent calls (async tasks)")
        ax.set_ylabel("calls per second")
        ax.set_title(f"Valkey, 100 B: {'first execution' if scenario == 'first' else 'replay'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    # Library CPU per call.
    ax = axes[1][0]
    labels = ["first", "replay", "cache-hit"]
    who: list[tuple[str, dict[str, Any]]] = [
        ("aioidempotency async", {"library": "aioidempotency", "mode": "async"}),
        ("aioidempotency sync shim", {"library": "aioidempotency", "mode": "sync"}),
        ("Powertools", {"library": "powertools"}),
    ]
    width = 0.27
    for index, (name, criteria) in enumerate(who):
        values = []
        for scenario in labels:
            case = _find(cases, group="in-memory", scenario=scenario, payload_bytes=100, **criteria)
            values.append(case["cpu_us_per_call"] if case and case["cpu_us_per_call"] else 0)
        xs = [i + (index - 1) * width for i in range(len(labels))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("CPU us per call (in-memory store)")
    ax.set_title("The library's own CPU per call, 100 B")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    # Payload sizes, first execution.
    ax = axes[1][1]
    sizes = [100, 10_000, 200_000]
    who_sizes: list[tuple[str, dict[str, Any]]] = [
        ("floor glide c=100", {"library": "floor", "client": "glide", "mode": "async",
                               "concurrency": 100}),
        ("ours glide atomic c=100", {"library": "aioidempotency", "client": "glide",
                                     "path": "atomic", "mode": "async", "concurrency": 100}),
        ("Powertools 16 threads", {"library": "powertools", "mode": "sync",
                                   "concurrency": THREADS}),
        ("ours sync shim redis-py seq", {"library": "aioidempotency", "client": "redis-py",
                                         "path": "atomic", "mode": "sync", "concurrency": 1}),
        ("Powertools seq", {"library": "powertools", "mode": "sync", "concurrency": 1}),
    ]  # fmt: skip
    width = 0.16
    positive = False
    for index, (name, criteria) in enumerate(who_sizes):
        values = [
            _rate(_find(cases, group="valkey", scenario="first", payload_bytes=s, **criteria))
            for s in sizes
        ]
        xs = [i + (index - 2) * width for i in range(len(sizes))]
        ax.bar(xs, [0 if math.isnan(v) else v for v in values], width, label=name)
        positive = positive or any(v > 0 for v in values)
    ax.set_xticks(range(len(sizes)), [_size(s) for s in sizes])
    if positive:  # as above
        ax.set_yscale("log")
    ax.set_ylabel("first executions per second (log)")
    ax.set_title("Valkey: payload size, first execution")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    meta = doc["meta"]
    fig.suptitle(f"aioidempotency benchmarks ({meta['started']}, {meta['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_results(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write results.json, results.md and results.png (if matplotlib) into `out`; `doc`
    is made `portable` first (in place, so that the docs page written after agrees)."""
    doc.update(portable(doc))
    out.mkdir(parents=True, exist_ok=True)
    add_ratios(doc["cases"])
    doc["floors"] = evaluate_floors(doc["cases"])
    paths = {"json": out / "results.json", "md": out / "results.md"}
    chart = out / "results.png"
    if write_chart(doc, chart):
        paths["png"] = chart
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n")
    paths["md"].write_text(render_markdown(doc, chart=chart.name if "png" in paths else None))
    return paths


REPLICA_METHOD = """\
A Valkey primary with one replica on this machine (asynchronous replication, as
deployed), the async engine on the atomic path, 100 B. With `wait_replicas=1` every
claim and every completion is followed by `WAIT 1 1000` on the connection that wrote
it, a replay's claim too: redis-py sends both in one pipeline (one round trip), glide
sends `WAIT` once the script has answered (a second one). Commands per call are counted
on the client, `WAIT` included. Each pair ran back to back in every round; medians of
the rounds. Server CPU is the primary's."""


CLUSTER_METHOD = """\
Three Valkey primaries on this machine, each owning a third of the slots (no replicas);
keys spread over them by hash slot. Each client's floor is the same client doing the
raw commands a call needs (`SET NX GET`, then `SET` for a first execution) through its
own cluster client (`GlideClusterClient`; `redis.asyncio.RedisCluster` with at most 100
connections a node); aioidempotency runs the async engine on the atomic path with the
same client class. All eight cases ran back to back in every round; medians of the
rounds (the spread: every round's calls/s). Server CPU is the three nodes' together."""


BATCH_METHOD = """\
One call is one batch of 100 new SQS records (fresh message ids: every record claims
and completes its key) on the Valkey server above, called in sequence from one thread
as Lambda calls a handler; `work/record` is I/O wait inside each record's handler
(`asyncio.sleep` / `time.sleep`), which a concurrent batch overlaps. aioidempotency runs
`process_batch_sync` (glide, at most 10 records at once, on the Lambda handler loop);
Powertools runs `BatchProcessor` + `process_partial_response`, the record handler
wrapped in `idempotent_function` on `RedisCachePersistenceLayer`. Interleaved rounds,
medians; CPU per record is the whole process's (every thread). `benchmarks/batch.py`
runs the same comparison on its own."""


DOCS_PREAMBLE = """\
How fast aioidempotency is, measured against [Powertools for AWS Lambda (Python)](\
https://docs.powertools.aws.dev/lambda/python/latest/utilities/idempotency/) and against
the round-trip floor (the raw client doing only the store operations a call needs), in
one run on the same servers. Every figure below comes from the run described here; the
complete data (every case, with latency percentiles, requests, CPU and memory) is in
[`benchmarks/results/results.md`](../benchmarks/results/results.md) and
[`results.json`](../benchmarks/results/results.json).

**Reproduce**: `python -m benchmarks.run` (or `nox -s bench`) from a checkout with the
`test` and `bench` extras (minutes on 2 cores: the command line below gives this run's
time; it starts and stops its own servers on 127.0.0.1: Valkey, a Valkey primary with
one replica, a 3-node Valkey cluster, moto). `python -m benchmarks.run --smoke` runs
every case with a few calls (batches at 0 ms of work only; seconds); CI runs it
through `tests/test_benchmarks_smoke.py`.

**Method**: each call is `@idempotent_function(data_keyword_argument="event")` (ours:
`@idempotent_function_async` for the async engine) with default configurations; the
event `{"id": ..., "blob": ...}` is hashed whole and the function returns a result of the
same size (100 B, 10 KB, 200 KB). *first*: a new key every call; *replay*: keys completed
before the run; *duplicates*: groups of `c` concurrent calls on one key (one runs, the
others are refused as in progress or replay it); *cache-hit*: `use_local_cache=True` on
completed keys. Async cases run `c` tasks on one event loop; sync cases run in 1 or 16
threads. Requests per call are counted on the client side (a wrapper around each client's
command entry point, botocore's `before-send` event). CPU is `time.process_time` of the
benchmark process; the servers are child processes, measured separately from `/proc`.
redis-py's asyncio clients use a `BlockingConnectionPool` of 100 (its default pool
refuses a 101st connection). The machine is noisy: compare ratios within the run, not
across runs. The numbers are floors to report, not timed tests."""


DOCS_READING = """\
## Reading the results: where a call's time goes

- **A replay is one round trip** on the atomic path (one `EVALSHA` that claims or returns
  the stored record) and on DynamoDB (a conditional `PutItem` with `ALL_OLD`); the
  protocol path needs two (`SET NX`, `GET`), Powertools three on Redis (`SET NX`, `GET`,
  `GET`). A local-cache hit sends nothing.
- **The async engine at high concurrency is CPU-bound in this process.** The headline
  table splits a first execution's cost: the floor's client CPU is what the raw client
  spends on two commands; the script floor adds what glide spends on two `EVALSHA` with
  the store's arguments and what the server spends running them; the rest, up to
  aioidempotency's row, is the engine and the store layer (the in-memory table above
  gives the engine alone, its profile the functions).
- **The sync entry points** call the store's sync twin in the caller's thread (a
  redis-py, glide_sync or boto3 client, as Powertools does); only an async-only store
  (a custom `PersistenceLayer`, an async `client_factory`) goes through the background
  event loop. On the atomic path the server runs a script per operation, which costs it
  more than Powertools' `SET` (see the sync path notes below).
- **`wait_replicas=1`** buys durability against a failover
  ([Redis and Valkey](redis-valkey.md#durability-against-a-failover)): a claim or a
  result the caller saw acknowledged is on a replica too, so a promoted replica still
  replays it. Its price is the replica's acknowledgement on every claim and every
  completion, replays included (a replay's claim is sent with `WAIT` as well): on
  redis-py the `WAIT` rides in the script's pipeline, so the cost is the time the
  replica takes to confirm; on glide it is one more round trip per store operation on
  top of that. A confirmation needs the replica to receive the write and answer the
  primary's `REPLCONF GETACK`: here the replica shares 2 cores with the primary and the
  benchmark, so each one also waits for the replica process to be scheduled; a replica
  in another zone adds its network round trip instead. Concurrent calls share
  confirmations (one acknowledgement releases every `WAIT` up to the offset it
  confirms), so the ratio is closer to 1 at c=100 than one call at a time.
  It is worth it where a key running twice costs more than that (a payment, an order, a
  message sent) and the store has replicas a failover promotes (ElastiCache,
  self-hosted Redis/Valkey); on MemoryDB, or on a server without replicas, it buys
  nothing.
- **Batches**: `process_batch_sync` runs up to 10 records of a batch at once on one
  event loop, Powertools one record after the other; with no work per record the
  comparison is the idempotency overhead alone, with I/O per record it is mostly how
  much of that I/O overlaps.
- DynamoDB figures measure moto (4-10 ms a request); only requests per call and ratios
  to Powertools in the same run mean something."""


HAND_WRITTEN = "<!-- Written by hand from here on: benchmarks/report.py keeps it. -->"


def write_docs(doc: dict[str, Any], path: Path, *, chart: Path | None) -> None:
    """`docs/performance.md`: the summaries of the run (every case stays in results.md)."""
    rel = None
    if chart is not None:
        rel = Path(os.path.relpath(chart.resolve(), path.resolve().parent)).as_posix()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(
        portable(doc), chart=rel, full=False, title="# Performance", preamble=DOCS_PREAMBLE
    )
    kept = ""  # notes written by hand after HAND_WRITTEN survive a new run
    if path.exists() and HAND_WRITTEN in (old := path.read_text()):
        kept = "\n" + old[old.index(HAND_WRITTEN) :]
    path.write_text(text + "\n" + DOCS_READING + "\n" + kept)


def main(argv: list[str] | None = None) -> int:
    """Re-render results.md, results.png (and a docs page) from a results.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report")
    parser.add_argument("results", type=Path, help="a results.json written by benchmarks.run")
    parser.add_argument("--docs", type=Path, default=None, help="also write the docs page")
    args = parser.parse_args(argv)
    doc = json.loads(args.results.read_text())
    paths = write_results(doc, args.results.parent)
    if args.docs is not None:
        write_docs(doc, args.docs, chart=paths.get("png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
