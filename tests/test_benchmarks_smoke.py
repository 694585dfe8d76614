"""The benchmark suite runs (smoke size) and writes every case with sane figures.

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
from benchmarks.cases import BATCH, REPLICA, WAIT, case_list

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
    expected = [spec.id for spec in case_list(smoke=True)]
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
