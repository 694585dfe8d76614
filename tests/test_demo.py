"""The demo's report at its edges (no latency measured, a single one, nothing timed)
and the arguments it refuses."""

from __future__ import annotations

import pytest

from aioidempotency import InMemoryPersistenceLayer
from aioidempotency._demo import DemoReport, run_demo


def test_percentiles_of_no_latency_and_of_one() -> None:
    report = DemoReport(payments=1, copies=1)
    assert report.percentile(0.5) == 0.0
    report.latencies.append(0.25)
    assert report.percentile(0.5) == report.percentile(0.99) == 0.25


def test_the_extreme_percentiles_stay_within_the_measurements() -> None:
    report = DemoReport(payments=1, copies=1, latencies=[0.001 * i for i in range(1, 11)])
    assert 0.001 <= report.percentile(0.0) < 0.0011
    assert 0.0099 < report.percentile(1.0) <= 0.010


def test_a_report_timed_at_zero_shows_no_throughput() -> None:
    report = DemoReport(payments=2, copies=1, requests=2, executions=2, store="memory://")
    assert report.ok
    rows = {
        name.strip(): value.strip()
        for name, _, value in (line.partition("|") for line in report.table().splitlines())
        if value
    }
    assert rows["store"] == "memory://"
    assert rows["throughput"] == "0 requests/s"
    assert rows["p50 latency"] == "0.00 ms"
    assert rows["executions"] == "2  (must equal N: OK)"


@pytest.mark.parametrize(("payments", "copies", "concurrency"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
async def test_empty_sizes_are_refused(payments: int, copies: int, concurrency: int) -> None:
    store = InMemoryPersistenceLayer()
    with pytest.raises(ValueError, match="must be at least 1"):
        await run_demo(store, payments=payments, copies=copies, concurrency=concurrency)
    assert len(store) == 0
