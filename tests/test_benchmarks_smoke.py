"""The benchmark suite runs (smoke size) and writes every case with sane figures; the
CPU budget and latency tools run (smoke size) and the delay proxy delays.

Times are never asserted; request counts are, since they are exact: a replay on the
atomic path and on DynamoDB costs one request, a local-cache hit none, ``wait_replicas=1``
one ``WAIT`` more per claim and per completion, a batch two per record. Nothing written
holds an absolute path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.batch import BATCH_SIZE
from benchmarks.cases import ALL_GROUPS, BATCH, CLUSTER, REPLICA, WAIT, case_list

ROOT = Path(__file__).resolve().parent.parent


def _run_smoke(out: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--quiet", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# Benchmark results (smoke run")
    text = (out / "results.json").read_text()
    for written in (markdown, text):
        assert str(ROOT) not in written
        assert str(out) not in written  # given on the command line, recorded in meta
    document: dict[str, Any] = json.loads(text)
    return document


def test_smoke_run_writes_every_case_with_sane_fields(tmp_path: Path) -> None:
    doc = _run_smoke(tmp_path)
    cases = {case["id"]: case for case in doc["cases"]}
    groups = tuple(g for g in ALL_GROUPS if g != CLUSTER)  # a smoke run's default
    expected = [spec.id for spec in case_list(groups, smoke=True)]
    assert len(doc["cases"]) == len(expected)
    assert sorted(cases) == sorted(expected)

    for case in doc["cases"]:
        label = case["id"]
        assert case["errors"] == 0, (label, case["first_error"])
        assert case["calls"] > 0, label
        assert case["seconds"] > 0, label
        assert case["calls_per_s"] > 0, label
        assert 0 < case["p50_us"] <= case["p99_us"], label
        assert case["cpu_us_per_call"] is not None, label
        assert case["cpu_us_per_call"] >= 0, label
        assert case["executed"] + case["replayed"] + case["refused"] == case["calls"], label
        assert isinstance(case["requests"], int), label
        assert case["requests"] >= 0, label
        per_call = case["requests_per_call"]
        scenario = case["scenario"]
        waits = case["variant"] == WAIT  # one WAIT after each claim and each completion
        if case["group"] == BATCH:  # one call is a batch: a claim and a completion a record
            assert scenario == "first", label
            assert case["executed"] == case["calls"], label
            assert per_call == 2 * BATCH_SIZE, label
            assert case["peak_kib"] is not None, label
            continue
        if scenario == "duplicates":
            assert case["executed"] >= 1, label
            # each run key costs a claim and a completion; refused duplicates of this
            # process cost nothing (they join the running call), others one claim
            assert case["requests"] >= 2 * case["executed"], label
            continue
        assert isinstance(per_call, int), (label, per_call)  # exact, not an average
        assert case["requests"] == per_call * case["calls"], label
        if scenario == "cache-hit":
            assert per_call == 0, label
            assert case["executed"] == 0, label
        elif scenario == "first":
            # A claim and a completion; a bare cache client reads before it completes.
            assert per_call == (3 if case["path"] == "protocol" else 2) + 2 * waits, label
            assert case["executed"] == case["calls"], label
        else:
            assert case["executed"] == 0, label
            # A result over 64 KiB is read with a second, plain GET on the cache store.
            one_trip = (
                case["library"] != "powertools"
                and case["path"] != "protocol"
                and (case["group"] == "dynamodb" or case["payload_bytes"] <= 64 * 1024)
            )
            if one_trip:
                assert per_call == 1 + waits, label
        if case["group"] != "dynamodb" and case["library"] != "floor":
            assert case["peak_kib"] is not None, label
            assert case["peak_kib"] >= 0, label

    replicated = [c for c in doc["cases"] if c["group"] == REPLICA]
    assert {c["variant"] for c in replicated} == {"", WAIT}
    assert all(c["vs_no_wait"] for c in replicated if c["variant"] == WAIT)

    # The cluster group runs in full runs only (see benchmarks.run's --groups).
    assert not [c for c in doc["cases"] if c["group"] == CLUSTER]

    floors = {floor["floor"]: floor for floor in doc["floors"]}
    assert any(name.startswith("SQS batch") for name in floors)
    assert all(floor["status"] in {"PASS", "MISS", "n/a"} for floor in floors.values())
    counted = [f for name, f in floors.items() if "round trip" in name or "no request" in name]
    assert len(counted) == 2
    assert all(floor["status"] == "PASS" for floor in counted), counted
    assert doc["profiles"]
    assert all(rows for rows in doc["profiles"].values())
    meta = doc["meta"]
    assert meta["smoke"] is True
    assert meta["versions"]["aioidempotency"]
    assert meta["versions"]["valkey-server"]


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    completed = _run_module(module, "--smoke", *args)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def test_budget_splits_the_unprofiled_cpu_of_each_case(tmp_path: Path) -> None:
    out = tmp_path / "budget.json"
    completed = _run_tool("benchmarks.budget", "--only", "in-memory", "--json", str(out))
    assert "| in-memory | first | 1 |" in completed.stdout
    doc = json.loads(out.read_text())
    assert doc["meta"]["profiler_overhead_us_per_function_call"] > 0
    assert len(doc["cases"]) == 4  # first and replay, c=1 and c=100
    for row in doc["cases"]:
        split = row["split_us"]
        # the categories are scaled to the unprofiled main thread's CPU per call
        assert abs(sum(split.values()) - row["main_thread_cpu_us"]) <= 0.1 * len(split), row
        assert split["engine"] > 0, row
        assert split["client"] == 0, row  # no client library on the in-memory store
        assert row["requests_per_call"] == (2 if row["scenario"] == "first" else 1), row


def test_budget_categories() -> None:
    from benchmarks.budget import categorize

    site = "/v/lib/python3.11/site-packages"
    assert categorize((f"{site}/aioidempotency/_async/engine.py", 1, "f")) == "engine"
    assert categorize((f"{site}/aioidempotency/_keys.py", 1, "f")) == "engine"
    assert categorize(("/w/src/aioidempotency/_async/glide.py", 1, "f")) == "store adapter"
    assert categorize(("/w/src/aioidempotency/_async/decorators.py", 1, "f")) == (
        "aioidempotency, other"
    )
    assert categorize((f"{site}/glide/glide_client.py", 1, "f")) == "client"
    assert categorize((f"{site}/redis/asyncio/client.py", 1, "f")) == "client"
    assert categorize(("/usr/lib/python3.11/asyncio/events.py", 1, "f")) == "event loop"
    assert categorize(("~", 0, "<method 'poll' of 'select.epoll' objects>")) == "event loop"
    assert categorize(("/usr/lib/python3.11/json/encoder.py", 1, "f")) is None  # to callers
    assert categorize(("~", 0, "<built-in method _hashlib.new>")) is None
    assert categorize((f"{site}/cffi/api.py", 1, "f")) is None  # glide's FFI: to callers


def test_delay_proxy_holds_each_direction_for_half_the_rtt() -> None:
    import socket
    import threading
    import time

    from benchmarks.delay_proxy import delay_proxy

    with socket.create_server(("127.0.0.1", 0)) as listener:

        def echo() -> None:
            connection, _ = listener.accept()
            with connection:
                while data := connection.recv(1024):
                    connection.sendall(data)

        server = threading.Thread(target=echo, daemon=True)
        server.start()
        rtt = 0.02
        with delay_proxy(listener.getsockname()[:2], rtt) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
                trips = []
                for n in range(5):
                    start = time.perf_counter()
                    client.sendall(b"ping%d" % n)
                    assert client.recv(1024) == b"ping%d" % n
                    trips.append(time.perf_counter() - start)
            delivered = proxy.delivered_rtt()
        server.join(timeout=5)
    # Causal bounds, whatever the machine's load: the proxy holds each chunk at least
    # rtt / 2, and a chunk's hold (from its kernel arrival stamp to the end of its
    # sendall) lies inside the client's round trip, so the mean hold per round trip
    # cannot exceed the mean round trip (1 ms for converting the kernel's wall-clock
    # stamp to perf_counter). A single slow trip moves both means alike.
    assert min(trips) >= rtt
    assert delivered is not None
    assert rtt <= delivered <= sum(trips) / len(trips) + 0.001


def test_latency_model_and_check_run(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    _run_tool("benchmarks.latency", "--no-dynamodb", "--json", str(out))
    doc = json.loads(out.read_text())
    assert doc["meta"]["delivered_rtt_ms"] >= doc["meta"]["check_rtt_ms"]
    rows = {row["id"]: row for row in doc["cases"]}
    assert len(rows) == 10
    for row in rows.values():
        trips = row["round_trips"]
        assert abs(row["model_us"]["1.0"] - row["client_cpu_us"] - trips * 1000) <= 0.11, row
        assert row["check_p50_us"] >= trips * doc["meta"]["check_rtt_ms"] * 1000, row
    ours = "valkey/aioidempotency/glide/atomic/async/c1"
    assert rows[f"{ours}/first/100B"]["round_trips"] == 2
    assert rows[f"{ours}/replay/100B"]["round_trips"] == 1
    assert rows["valkey/powertools/redis-py/-/sync/c1/first/100B"]["round_trips"] == 2


def test_pipelining_comparison_runs_and_counts_every_command(tmp_path: Path) -> None:
    out = tmp_path / "pipelining.json"
    completed = _run_tool("benchmarks.pipelining", "--concurrency", "1", "10", "--json", str(out))
    assert "| glide | first | 10 |" in completed.stdout
    doc = json.loads(out.read_text())
    rows = {(r["client"], r["scenario"], r["concurrency"], r["kind"]): r for r in doc["cases"]}
    assert len(rows) == len(doc["cases"]) == 2 * 2 * 2 * 4
    for key, row in rows.items():
        assert row["calls_per_s"] > 0, key
        assert 0 < row["p50_us"] <= row["p99_us"], key
        # Batched or not, every command is counted: a first execution sends a claim and
        # a completion, a replay one claim.
        assert row["requests_per_call"] == (2 if key[1] == "first" else 1), key


def test_overhead_comparison_runs_every_case_and_profiles_the_decorated_ones(
    tmp_path: Path,
) -> None:
    out = tmp_path / "overhead.json"
    completed = _run_tool("benchmarks.overhead", "--json", str(out))
    assert "| cache hit |" in completed.stdout
    doc = json.loads(out.read_text())
    rows = {row["case"]: row for row in doc["cases"]}
    assert set(rows) == {"direct", "no key", "disabled", "cache hit"}
    assert rows["direct"]["vs_direct"] == 1.0
    for name, row in rows.items():
        assert row["calls_per_s"] > 0, name
        assert row["wall_us_per_call"] == round(1e6 / row["calls_per_s"], 2), name
    assert set(doc["profiles"]) == {"no key", "cache hit"}
    for name, top in doc["profiles"].items():
        assert top, name
        assert all(0 <= row["own_share"] <= 1 for row in top), name


def test_batch_tool_compares_claim_ahead_and_powertools_in_one_run() -> None:
    completed = _run_module("benchmarks.batch", "--batches", "2", "--rounds", "2", "--work-ms", "0")
    # exit status 1 is the floor missed (a printed verdict), anything else an error
    assert completed.returncode in (0, 1), completed.stderr[-3000:]
    rows = [line for line in completed.stdout.splitlines() if line.strip().startswith("0ms")]
    names = ["async def", "claim_ahead=0", "plain def", "Powertools"]
    assert len(rows) == len(names), completed.stdout
    for row, name in zip(rows, names, strict=True):
        assert name in row, row
        assert float(row.split()[-2].rstrip("x")) > 0, row
    assert rows[-1].split()[-2] == "1.00x"  # the baseline against itself
    assert ("FLOOR MISSED" in completed.stdout) == (completed.returncode == 1)


def test_threads_tool_compares_ours_powertools_and_the_floor() -> None:
    completed = _run_module(
        "benchmarks.threads", "--calls", "64", "--rounds", "2", "--threads", "4"
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    for name in ("aioidempotency", "powertools", "floor"):
        [row] = [line for line in lines if line.strip().startswith(name)]
        assert len(row.split("rounds:")[1].split(" / ")) == 2, row  # one rate per round
    [ratio] = [line for line in lines if line.startswith("ours / Powertools:")]
    assert float(ratio.split()[-1].rstrip("x")) > 0
    [rounds] = [line for line in lines if line.startswith("per round:")]
    assert rounds.count("median") == 1
