"""The default `check()` of a store of one's own: the probe runs the contract's steps on
a probe key, names the step a store answers wrongly, and cleans up after itself.

tools/unasync.py generates the sync twin of this module,
tests/sync/persistence/test_store_probe.py: the same stores written against
`SyncPersistenceLayer`, checked by its own `check()`. Each store below is the in-memory
store with one step of the contract broken, as a store written by hand could have it.
"""

from __future__ import annotations

import pytest

from aioidempotency.exceptions import IdempotencyStoreCheckError
from aioidempotency.persistence import (
    ClaimResult,
    DataRecord,
    InMemoryPersistenceLayer,
    PersistenceLayer,
    RecordStatus,
)

STEPS = ["refuses-claims", "loses-claims", "keeps-released", "loses-completions", "no-delete"]


class Misbehaving(PersistenceLayer):
    """The in-memory store `inner` with the step `broken` (one of `STEPS`) done wrong."""

    def __init__(self, broken: str) -> None:
        assert broken in STEPS
        self.inner = InMemoryPersistenceLayer()
        self.broken = broken
        self.keys: set[str] = set()  # the keys it was asked to claim

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self.keys.add(record.idempotency_key)
        if self.broken == "refuses-claims":
            return ClaimResult(claimed=False)
        return await self.inner.claim(record, now=now)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        found = await self.inner.get(key, now=now)
        if self.broken == "loses-claims" and found is not None:
            return None if found.status is RecordStatus.INPROGRESS else found
        return found

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        if self.broken != "loses-completions":
            await self.inner.complete(record, owner=owner)

    async def release(self, key: str, *, owner: str) -> None:
        if self.broken != "keeps-released":
            await self.inner.release(key, owner=owner)

    async def renew(self, record: DataRecord) -> None:
        await self.inner.renew(record)

    async def delete(self, key: str) -> bool:
        if self.broken == "no-delete":
            raise ConnectionError("DEL is not allowed")
        return await self.inner.delete(key)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("refuses-claims", "the store answered claim of a probe record wrongly: "),
        ("loses-claims", "the store answered get of a probe record wrongly: "),
        ("keeps-released", "the store answered claim of a probe record wrongly: "),
        ("loses-completions", "the store answered get of a probe record wrongly: "),
    ],
)
async def test_a_step_answered_wrongly_is_named_and_the_probe_key_deleted(
    broken: str, message: str
) -> None:
    store = Misbehaving(broken)
    report = await store.check()
    [problem] = report.problems
    assert problem.kind == "store-error"
    assert problem.message.startswith(message)
    assert problem.fix.startswith("check the store's implementation against the ")
    assert report.store == "Misbehaving"
    assert len(store.inner) == 0  # the probe deleted its key after the failure


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        ("refuses-claims", "a claim of a new key was refused"),
        ("loses-claims", "the claim just written reads back as None"),
        ("keeps-released", "a claim of a released key was refused"),
        ("loses-completions", "the completed record reads back as DataRecord("),
    ],
)
async def test_the_problem_says_what_the_store_answered(broken: str, says: str) -> None:
    [problem] = (await Misbehaving(broken).check()).problems
    assert says in problem.message


async def test_a_failed_delete_is_a_store_error_and_leaves_the_probe_key() -> None:
    store = Misbehaving("no-delete")
    [problem] = (await store.check()).problems
    assert problem.kind == "store-error"
    assert problem.message == (
        "the store failed during delete: ConnectionError: DEL is not allowed"
    )
    # The probe got as far as its completed record; it expires within a minute.
    [key] = store.keys
    assert len(store.inner) == 1
    record = await store.inner.get(key)
    assert record is not None
    assert record.status is RecordStatus.COMPLETED


async def test_raise_on_problem_raises_the_report() -> None:
    with pytest.raises(IdempotencyStoreCheckError) as raised:
        await Misbehaving("refuses-claims").check(raise_on_problem=True)
    report = raised.value.report
    assert report is not None
    assert [p.kind for p in report.problems] == ["store-error"]
    assert "a claim of a new key was refused" in str(raised.value)


async def test_a_healthy_store_passes_and_without_probe_only_reads() -> None:
    store = InMemoryPersistenceLayer()
    probed = await store.check(raise_on_problem=True)
    assert probed.ok
    assert probed.facts == (("probe", "claim, get, renew, release, complete, delete: ok"),)
    assert len(store) == 0
    read = await Misbehaving("no-delete").check(probe=False)  # nothing written, nothing deleted
    assert read.ok
    assert read.facts == ()
