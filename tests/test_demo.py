"""The retry-storm demo: its counts come from the engine's events, it writes under a
prefix of its own and deletes its records (on the in-memory store and on a real Valkey
server); and its report at the edges (no latency measured, a single one, nothing
timed) and the arguments it refuses."""

from __future__ import annotations

import asyncio
import time

import pytest

from aioidempotency import InMemoryPersistenceLayer, store_from_url
from aioidempotency._cli import main
from aioidempotency._demo import DemoReport, DemoStats, percentile, run_demo
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.events import CallOutcome, EventKind, IdempotencyEvent, RoundTrip
from aioidempotency.persistence import PersistenceLayer
from tests.servers.redis import ServerPool


def rows_of(table: str) -> dict[str, list[str]]:
    """The rows of the text tables printed by the demo: first cell -> the others."""
    rows: dict[str, list[str]] = {}
    for line in table.splitlines():
        if "|" in line:
            first, *rest = (cell.strip() for cell in line.split("|"))
            rows[first] = rest
    return rows


async def plant_user_record(store: PersistenceLayer, key: str) -> None:
    """A user's completed record, which the demo must leave alone."""
    now = int(time.time())
    claim = DataRecord(key, RecordStatus.INPROGRESS, now + 600, owner="a-user-s-own-call-0001")
    assert (await store.claim(claim, now=now)).claimed
    done = DataRecord(key, RecordStatus.COMPLETED, now + 600, response_data='{"mine": true}')
    await store.complete(done, owner="a-user-s-own-call-0001")


async def user_record_is_there(store: PersistenceLayer, key: str) -> bool:
    record = await store.get(key)
    return record is not None and record.response_data == '{"mine": true}'


# -- the report at its edges --------------------------------------------------------------


def test_percentiles_of_no_latency_and_of_one() -> None:
    report = DemoReport(payments=1, copies=1)
    assert report.percentile(0.5) == 0.0
    report.latencies.append(0.25)
    assert report.percentile(0.5) == report.percentile(0.99) == 0.25


def test_the_extreme_percentiles_stay_within_the_measurements() -> None:
    values = [0.001 * i for i in range(1, 11)]
    assert 0.001 <= percentile(values, 0.0) < 0.0011
    assert 0.0099 < percentile(values, 1.0) <= 0.010


def final(outcome: CallOutcome, *trips: RoundTrip) -> IdempotencyEvent:
    kind = EventKind.COMPLETED if outcome is CallOutcome.EXECUTED else EventKind.REPLAYED
    return IdempotencyEvent(kind, "k", "p", "memory", 0.0, len(trips), outcome, trips=trips)


def test_a_report_timed_at_zero_shows_no_throughput() -> None:
    stats = DemoStats()
    for _ in range(2):
        stats(final(CallOutcome.EXECUTED, RoundTrip("claim", 0.0, 0.002)))
    report = DemoReport(
        payments=2, copies=1, stats=stats, requests=2, charged=2, store="memory://", deleted=2
    )
    assert report.ok
    rows = rows_of(report.table())
    assert rows["store"] == ["memory://"]
    assert rows["throughput"] == ["0 requests/s"]
    assert rows["p50 latency"] == ["0.00 ms"]
    assert rows["executions"] == ["2  (must equal N: OK)"]
    assert rows["executed"] == ["2"]
    assert rows["claim"] == ["2", "2.000", "2.000", "2.000", "2.000"]
    assert "replayed" not in rows  # outcomes no call had are left out


def test_the_events_decide_the_verdict() -> None:
    stats = DemoStats()
    stats(final(CallOutcome.EXECUTED))
    # The function ran twice, but the events counted one execution: not OK.
    report = DemoReport(payments=1, copies=2, stats=stats, requests=2, charged=2)
    assert not report.ok
    assert "(must equal N: FAIL)" in report.table()
    assert rows_of(report.table())["key prefix"] == ["(records: kept (--keep))"]
    empty = rows_of(DemoReport(payments=1, copies=1).table())
    assert empty["(no call)"] == ["0"]
    assert empty["(none)"] == ["0", "", "", "", ""]


def test_round_trips_are_listed_by_operation_and_failures_counted() -> None:
    stats = DemoStats()
    stats(final(CallOutcome.EXECUTED, RoundTrip("complete", 0.5, 0.003)))
    stats(final(CallOutcome.REPLAYED, RoundTrip("vendor-op", 0.0, 0.001)))  # a store's own
    stats(final(CallOutcome.EXECUTED, RoundTrip("claim", 0.0, 0.004, "TimeoutError")))
    assert stats.failed_trips == 1
    table = stats.round_trip_table()
    operations = [line.split("|")[0].strip() for line in table.splitlines()[2:]]
    assert operations == ["claim", "complete", "vendor-op"]  # the contract's order first
    assert rows_of(table)["claim"] == ["1", "4.000", "4.000", "4.000", "4.000"]


@pytest.mark.parametrize(("payments", "copies", "concurrency"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
async def test_empty_sizes_are_refused(payments: int, copies: int, concurrency: int) -> None:
    store = InMemoryPersistenceLayer()
    with pytest.raises(ValueError, match="must be at least 1"):
        await run_demo(store, payments=payments, copies=copies, concurrency=concurrency)
    assert len(store) == 0


# -- a run: counts from events, its own prefix, its records deleted ----------------------


async def test_the_counts_come_from_the_events_and_the_records_are_deleted() -> None:
    store = InMemoryPersistenceLayer()
    await plant_user_record(store, "orders#0123456789abcdef")
    report = await run_demo(
        store, payments=30, copies=4, concurrency=16, work_seconds=0.0005, seed=7
    )
    assert report.ok
    outcomes = report.stats.outcomes
    assert outcomes["executed"] == report.charged == 30
    assert outcomes["replayed"] == 90 == report.requests - 30
    assert sum(outcomes.values()) == 120 + outcomes["refused"]  # refused calls were retried
    trips = report.stats.trips
    assert len(trips["complete"]) == 30
    assert len(trips["claim"]) >= 120  # every answered call claimed; a refusal may have
    assert all(took >= 0 for durations in trips.values() for took in durations)
    assert report.stats.failed_trips == 0
    assert report.prefix.startswith("demo.payments.")
    assert report.deleted == 30
    assert len(store) == 1  # the user's record only
    assert await user_record_is_there(store, "orders#0123456789abcdef")


async def test_keep_leaves_the_records() -> None:
    store = InMemoryPersistenceLayer()
    report = await run_demo(store, payments=5, copies=2, concurrency=4, work_seconds=0)
    assert report.deleted == 5
    assert len(store) == 0
    report = await run_demo(store, payments=5, copies=2, concurrency=4, work_seconds=0, keep=True)
    assert report.deleted is None
    assert len(store) == 5


async def test_with_waiting_duplicates_need_no_client_retries() -> None:
    report = await run_demo(
        InMemoryPersistenceLayer(), payments=20, copies=5, concurrency=50, wait_seconds=10
    )
    assert report.ok
    assert report.refusals == 0
    assert report.replays == 80


# -- the command on a real Valkey server ---------------------------------------------------


@pytest.fixture
def valkey_url(cache_servers: ServerPool) -> str:
    node = cache_servers.standalone("valkey")
    return f"valkey://{node.host}:{node.port}?client=glide&timeout=5"


async def run_cli(*argv: str) -> int:
    return await asyncio.wait_for(asyncio.to_thread(main, list(argv)), 120)


async def test_the_demo_on_valkey_prints_outcomes_and_round_trips_and_cleans_up(
    valkey_url: str, cache_servers: ServerPool, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = cache_servers.standalone("valkey").admin()
    mine = "orders#fedcba9876543210"
    async with store_from_url(valkey_url) as store:
        await plant_user_record(store, mine)
        try:
            capsys.readouterr()
            argv = ("demo", "--store", valkey_url, "-n", "25", "-k", "4", "-c", "10")
            assert await run_cli(*argv, "--no-progress", "--seed", "3") == 0
            out = capsys.readouterr().out
            rows = rows_of(out)
            assert rows["executions"] == ["25  (must equal N: OK)"]
            assert rows["executed"] == ["25"]
            assert rows["replayed"] == ["75"]
            assert rows["requests answered"] == ["100"]
            prefix, _, records = rows["key prefix"][0].partition("  ")
            assert prefix.startswith("demo.payments.")
            assert records == "(records: 25 deleted)"
            count, *millis = rows["complete"]
            assert count == "25"
            assert all(float(value) > 0 for value in millis)  # a real server takes time
            assert int(rows["claim"][0]) >= 100
            assert admin.keys(f"{prefix}#*") == []  # nothing of the demo's is left
            assert await user_record_is_there(store, mine)  # the user's record is

            assert await run_cli(*argv, "--no-progress", "--keep") == 0
            rows = rows_of(capsys.readouterr().out)
            prefix, _, records = rows["key prefix"][0].partition("  ")
            assert records == "(records: kept (--keep))"
            assert len(admin.keys(f"{prefix}#*")) == 25
            for key in admin.keys(f"{prefix}#*"):
                admin.delete(key)
        finally:
            await store.delete(mine)
            admin.close()
