"""The retry-storm demo: a payment API hit by N payments, each sent K times at once.

It shows the library's main job: however often a payment is retried, it is charged
once, and every retry gets the same receipt. What it prints about the calls (how many
executed, replayed, were refused) and about the store (how long each kind of round trip
took) comes from the engine's events (`aioidempotency.events`), as a listener of a
user's would see them. It writes under a key prefix of its own
(``demo.payments.<run id>``) and deletes its records at the end unless asked to keep
them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from aioidempotency._async.engine import IdempotencyEngine
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._config import IdempotencyConfig
from aioidempotency._events import CallOutcome, IdempotencyEvent
from aioidempotency.exceptions import IdempotencyAlreadyInProgressError

__all__ = ["DemoReport", "DemoStats", "percentile", "run_demo"]

_PREFIX = "demo.payments"
"""The demo's keys are ``demo.payments.<run id>#<hash>``: no user's record shares them."""

_OPERATIONS = ("claim", "get", "complete", "release", "renew")


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` percentile of `values` (0 when there are none)."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return cuts[max(0, min(len(cuts) - 1, round(fraction * 1000) - 1))]


class DemoStats:
    """An events listener: calls by outcome (final events) and store round-trip
    durations by operation, as the engine reported them."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.trips: defaultdict[str, list[float]] = defaultdict(list)
        self.failed_trips = 0

    def __call__(self, event: IdempotencyEvent) -> None:
        if event.outcome is not None:
            self.outcomes[event.outcome.value] += 1
        for trip in event.trips:
            self.trips[trip.operation].append(trip.duration)
            if trip.error is not None:
                self.failed_trips += 1

    def outcome_table(self) -> str:
        """Calls by outcome, in `CallOutcome` order."""
        rows = [
            (outcome.value, f"{self.outcomes[outcome.value]}")
            for outcome in CallOutcome
            if self.outcomes[outcome.value]
        ]
        return _table(("outcome", "calls"), rows or [("(no call)", "0")])

    def round_trip_table(self) -> str:
        """Round trips by operation: count and latency percentiles in milliseconds."""
        rows = []
        for operation in sorted(self.trips, key=_operation_order):
            took = self.trips[operation]
            rows.append(
                (
                    operation,
                    f"{len(took)}",
                    *(f"{percentile(took, q) * 1000:.3f}" for q in (0.5, 0.9, 0.99)),
                    f"{max(took) * 1000:.3f}",
                )
            )
        header = ("round trip", "count", "p50 ms", "p90 ms", "p99 ms", "max ms")
        return _table(header, rows or [("(none)", "0", "", "", "", "")])


def _operation_order(operation: str) -> int:
    return _OPERATIONS.index(operation) if operation in _OPERATIONS else len(_OPERATIONS)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        return " | ".join(cells).rstrip()

    rule = "-" * (sum(widths) + 3 * (len(widths) - 1))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


@dataclasses.dataclass
class DemoReport:
    """What a demo run measured. `stats` holds what the engine's events said."""

    payments: int
    copies: int
    stats: DemoStats = dataclasses.field(default_factory=DemoStats)
    requests: int = 0
    charged: int = 0
    mismatched_receipts: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    store: str = ""
    prefix: str = ""
    deleted: int | None = None

    @property
    def executions(self) -> int:
        """Calls that ran the function and stored its result (the events' count)."""
        return self.stats.outcomes[CallOutcome.EXECUTED.value]

    @property
    def replays(self) -> int:
        """Calls answered with a stored result (the events' count)."""
        return self.stats.outcomes[CallOutcome.REPLAYED.value]

    @property
    def refusals(self) -> int:
        """Calls refused as in progress, retried by the client (the events' count)."""
        return self.stats.outcomes[CallOutcome.REFUSED.value]

    @property
    def ok(self) -> bool:
        """True when every payment was charged exactly once (by the function's own
        count and by the events) and receipts agree."""
        return self.charged == self.executions == self.payments and self.mismatched_receipts == 0

    def percentile(self, fraction: float) -> float:
        """A request latency percentile in seconds (0 when nothing was measured)."""
        return percentile(self.latencies, fraction)

    def table(self) -> str:
        """The report as small text tables: the run, calls by outcome, round trips."""
        throughput = self.requests / self.elapsed if self.elapsed else 0.0
        records = "kept (--keep)" if self.deleted is None else f"{self.deleted} deleted"
        rows = [
            ("store", self.store),
            ("key prefix", f"{self.prefix}  (records: {records})"),
            ("payments (N)", f"{self.payments}"),
            ("copies each (K)", f"{self.copies}"),
            ("requests answered", f"{self.requests}"),
            ("executions", f"{self.executions}  (must equal N: {'OK' if self.ok else 'FAIL'})"),
            ("p50 latency", f"{self.percentile(0.50) * 1000:.2f} ms"),
            ("p99 latency", f"{self.percentile(0.99) * 1000:.2f} ms"),
            ("throughput", f"{throughput:,.0f} requests/s"),
        ]
        width = max(len(name) for name, _ in rows)
        line = "-" * (width + 3 + max(len(value) for _, value in rows))
        body = "\n".join(f"{name.ljust(width)} | {value}" for name, value in rows)
        return (
            f"{line}\n{body}\n{line}\n\n"
            "calls by outcome (from the engine's events; refused calls were retried):\n"
            f"{self.stats.outcome_table()}\n\n"
            "store round trips (from the engine's events, by its clock):\n"
            f"{self.stats.round_trip_table()}"
        )


async def run_demo(
    store: PersistenceLayer,
    *,
    payments: int = 1000,
    copies: int = 5,
    concurrency: int = 100,
    work_seconds: float = 0.002,
    wait_seconds: float = 0.0,
    store_name: str = "",
    seed: int | None = None,
    keep: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> DemoReport:
    """Send every payment `copies` times, shuffled, `concurrency` requests at a time.

    `work_seconds` simulates the payment provider's latency. A client that is told a
    payment is in progress retries after a short pause, as real clients do. The
    records are deleted at the end (even after a failure) unless `keep`.
    """
    if payments < 1 or copies < 1 or concurrency < 1:
        raise ValueError("payments, copies and concurrency must be at least 1")
    run_id = uuid.uuid4().hex[:12]
    stats = DemoStats()
    engine = IdempotencyEngine(
        store,
        IdempotencyConfig(
            event_key_jmespath="payment_id",
            payload_validation_jmespath="[amount, currency]",
            wait_for_in_progress_seconds=wait_seconds,
            on_event=stats,
        ),
        key_prefix=f"{_PREFIX}.{run_id}",
    )
    report = DemoReport(
        payments=payments,
        copies=copies,
        stats=stats,
        store=store_name,
        prefix=engine.key_prefix or "",
    )
    charged: Counter[str] = Counter()
    receipts: dict[str, Any] = {}
    requests = [i for i in range(payments) for _ in range(copies)]
    random.Random(seed).shuffle(requests)
    queue = iter(requests)

    def payment_of(number: int) -> dict[str, Any]:
        return {"payment_id": f"{run_id}-{number}", "amount": 100 + number, "currency": "EUR"}

    async def send(number: int) -> None:
        payment = payment_of(number)

        async def charge() -> dict[str, Any]:
            charged[payment["payment_id"]] += 1
            await asyncio.sleep(work_seconds)
            return {"receipt": uuid.uuid4().hex, "amount": payment["amount"]}

        pause = 0.001
        while True:
            started = time.perf_counter()
            try:
                receipt = await engine.run(payment, charge)
            except IdempotencyAlreadyInProgressError:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            report.latencies.append(time.perf_counter() - started)
            break
        first = receipts.setdefault(payment["payment_id"], receipt)
        if first != receipt:
            report.mismatched_receipts += 1
        report.requests += 1
        if on_progress is not None:
            on_progress(1)

    async def client() -> None:
        # One of `concurrency` clients, each sending one request at a time.
        for number in queue:
            await send(number)

    async def delete_records() -> int:
        keys = iter(engine.idempotency_key(payment_of(number)) for number in range(payments))
        deleted = 0

        async def deleter() -> None:
            nonlocal deleted
            for key in keys:
                if await store.delete(key):  # not `deleted += await ...`: it reads first
                    deleted += 1

        await asyncio.gather(*(deleter() for _ in range(min(concurrency, payments))))
        return deleted

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))
        report.elapsed = time.perf_counter() - started
        await engine.drain()
    finally:
        if not keep:
            report.deleted = await delete_records()
    report.charged = sum(charged.values())
    return report
