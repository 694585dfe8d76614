"""The command line: demo and key (get/delete are tested with the real stores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aioidempotency import IdempotencyConfig, IdempotencyEngine, InMemoryPersistenceLayer
from aioidempotency._cli import main
from aioidempotency._demo import run_demo


def test_demo_command_charges_each_payment_once() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "aioidempotency", "demo", "-n", "40", "-k", "6", "-c", "25"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = {
        name.strip(): value.strip()
        for name, _, value in (
            line.partition("|") for line in completed.stdout.splitlines() if "|" in line
        )
    }
    assert lines["executions"].startswith("40 ")
    assert "OK" in lines["executions"]
    assert lines["requests answered"] == "240"
    # The tables from the engine's events: calls by outcome, round trips by operation.
    assert lines["executed"] == "40"
    assert lines["replayed"] == "200"
    assert lines["complete"].split("|")[0].strip() == "40"
    assert "(records: 40 deleted)" in lines["key prefix"]


async def test_demo_report_counts_every_request() -> None:
    progress: list[int] = []
    report = await run_demo(
        InMemoryPersistenceLayer(),
        payments=30,
        copies=4,
        concurrency=16,
        work_seconds=0.0005,
        seed=7,
        on_progress=progress.append,
    )
    assert report.ok
    assert report.executions == 30
    assert report.requests == 120 == len(progress) == len(report.latencies)
    assert report.replays == 90
    assert report.mismatched_receipts == 0
    assert 0 < report.percentile(0.5) <= report.percentile(0.99)


def test_key_command_matches_the_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = {"body": json.dumps({"order": 17, "total": "9.99"}), "headers": {"x": "y"}}
    path = tmp_path / "event.json"
    path.write_text(json.dumps(payload))
    status = main(
        [
            "key",
            str(path),
            "--jmespath",
            "powertools_json(body).order",
            "--validation",
            "powertools_json(body).total",
            "--prefix",
            "orders",
        ]
    )
    out = capsys.readouterr().out
    engine = IdempotencyEngine(
        InMemoryPersistenceLayer(),
        IdempotencyConfig(event_key_jmespath="powertools_json(body).order"),
        key_prefix="orders",
    )
    assert status == 0
    assert f"key:        {engine.idempotency_key(payload)}\n" in out
    assert "serialised: 17" in out
    assert "validation: " in out


def test_key_command_derives_the_powertools_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "payments-fn")
    path = tmp_path / "event.json"
    path.write_text('{"id": 1}')
    assert main(["key", str(path), "--function", "app.handler", "--hash", "sha256"]) == 0
    out = capsys.readouterr().out
    assert "key:        payments-fn.app.handler#" in out
    digest = out.split("#")[1].strip()
    assert len(digest) == 64


def test_key_command_reports_a_missing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "event.json"
    path.write_text('{"id": null}')
    assert main(["key", str(path), "--jmespath", "id"]) == 1
    assert "run without persistence" in capsys.readouterr().out


def test_unknown_store_scheme_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", "--store", "ftp://nowhere", "some-key"]) == 2
    assert "unknown store URL scheme" in capsys.readouterr().err
