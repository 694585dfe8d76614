"""The retry-storm demo on a store of one's own that keeps nothing (every claim
granted, no record ever found): it shows what it is for, each copy of a payment
charged again with a receipt of its own, and there is nothing to delete at the end."""

from __future__ import annotations

from aioidempotency._contract import ClaimResult
from aioidempotency._demo import run_demo
from aioidempotency._records import DataRecord
from aioidempotency.persistence import PersistenceLayer


class KeepsNothing(PersistenceLayer):
    """A store that acknowledges every write and forgets it."""

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        return ClaimResult(claimed=True)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        return None

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        return None

    async def release(self, key: str, *, owner: str) -> None:
        return None

    async def renew(self, record: DataRecord) -> None:
        return None

    async def delete(self, key: str) -> bool:
        return False


async def test_the_demo_reports_double_charges_on_a_store_that_keeps_nothing() -> None:
    report = await run_demo(
        KeepsNothing(), payments=4, copies=3, concurrency=2, work_seconds=0, seed=7
    )
    assert report.requests == 12
    assert report.charged == 12, "every copy ran the charge"
    assert report.mismatched_receipts == 8  # two copies of each payment after its first
    assert not report.ok
    assert report.deleted == 0
