"""The retry-storm demo: a payment API hit by N payments, each sent K times at once.

It shows the library's main job: however often a payment is retried, it is charged
once, and every retry gets the same receipt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from aioidempotency._async.engine import IdempotencyEngine
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._config import IdempotencyConfig
from aioidempotency.exceptions import IdempotencyAlreadyInProgressError

__all__ = ["DemoReport", "run_demo"]


@dataclasses.dataclass
class DemoReport:
    """What a demo run measured."""

    payments: int
    copies: int
    requests: int = 0
    executions: int = 0
    replays: int = 0
    refusals: int = 0
    mismatched_receipts: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    store: str = ""

    @property
    def ok(self) -> bool:
        """True when every payment was charged exactly once and receipts agree."""
        return self.executions == self.payments and self.mismatched_receipts == 0

    def percentile(self, fraction: float) -> float:
        """A latency percentile in seconds (0 when nothing was measured)."""
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0]
        cuts = statistics.quantiles(self.latencies, n=1000, method="inclusive")
        return cuts[max(0, min(len(cuts) - 1, round(fraction * 1000) - 1))]

    def table(self) -> str:
        """The report as a small text table."""
        throughput = self.requests / self.elapsed if self.elapsed else 0.0
        rows = [
            ("store", self.store),
            ("payments (N)", f"{self.payments}"),
            ("copies each (K)", f"{self.copies}"),
            ("requests answered", f"{self.requests}"),
            ("executions", f"{self.executions}  (must equal N: {'OK' if self.ok else 'FAIL'})"),
            ("replays", f"{self.replays}"),
            ("in-progress refusals", f"{self.refusals}  (retried by the client)"),
            ("p50 latency", f"{self.percentile(0.50) * 1000:.2f} ms"),
            ("p99 latency", f"{self.percentile(0.99) * 1000:.2f} ms"),
            ("throughput", f"{throughput:,.0f} requests/s"),
        ]
        width = max(len(name) for name, _ in rows)
        line = "-" * (width + 3 + max(len(value) for _, value in rows))
        body = "\n".join(f"{name.ljust(width)} | {value}" for name, value in rows)
        return f"{line}\n{body}\n{line}"


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
    on_progress: Callable[[int], None] | None = None,
) -> DemoReport:
    """Send every payment `copies` times, shuffled, `concurrency` requests at a time.

    `work_seconds` simulates the payment provider's latency. A client that is told a
    payment is in progress retries after a short pause, as real clients do.
    """
    if payments < 1 or copies < 1 or concurrency < 1:
        raise ValueError("payments, copies and concurrency must be at least 1")
    run_id = uuid.uuid4().hex[:12]
    engine = IdempotencyEngine(
        store,
        IdempotencyConfig(
            event_key_jmespath="payment_id",
            payload_validation_jmespath="[amount, currency]",
            wait_for_in_progress_seconds=wait_seconds,
        ),
        key_prefix=f"demo.payments.{run_id}",
    )
    report = DemoReport(payments=payments, copies=copies, store=store_name)
    charged: Counter[str] = Counter()
    receipts: dict[str, Any] = {}
    requests = [i for i in range(payments) for _ in range(copies)]
    random.Random(seed).shuffle(requests)
    queue = iter(requests)

    async def send(number: int) -> None:
        payment: dict[str, Any] = {
            "payment_id": f"{run_id}-{number}",
            "amount": 100 + number,
            "currency": "EUR",
        }

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
                report.refusals += 1
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

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))
    report.elapsed = time.perf_counter() - started
    report.executions = sum(charged.values())
    report.replays = report.requests - report.executions
    return report
