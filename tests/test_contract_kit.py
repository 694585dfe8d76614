"""The conformance kit catches broken stores (`aioidempotency.testing.contract`).

Each broken store below is the in-memory store with one bug planted; the kit runs on
it in a pytest of its own (`pytester`, in a subprocess) and must fail exactly the
tests that check the clause broken, while the store without the bug passes them all.
"""

from __future__ import annotations

import re

import pytest

pytest_plugins = ["pytester"]

STORES = '''
import asyncio
import dataclasses
import threading
import time

import pytest

from aioidempotency import IdempotencyClaimLostError
from aioidempotency._records import RecordStatus
from aioidempotency.persistence import (
    ClaimResult,
    InMemoryPersistenceLayer,
    SyncInMemoryPersistenceLayer,
)
from aioidempotency.testing.contract import AsyncStoreContract, StoreContract


def put(table, record):
    with table._lock:
        table._put(record, time.time())


class ReleasesAnyClaim(InMemoryPersistenceLayer):
    """Bug: release deletes whatever is under the key, whoever owns it."""

    async def release(self, key, *, owner):
        self.table.delete(key)


class NeverTakesOver(InMemoryPersistenceLayer):
    """Bug: a claim is refused whenever a record exists, expired or orphaned."""

    async def claim(self, record, *, now):
        with self.table._lock:
            existing = self.table._records.get(record.idempotency_key)
        if existing is not None and existing.owner != record.owner:
            return ClaimResult(claimed=False, existing=existing)
        return self.table.claim(record, now=now)


class ChecksThenClaims(InMemoryPersistenceLayer):
    """Bug: a claim reads, then writes in a second step (not atomic)."""

    async def claim(self, record, *, now):
        existing = await self.get(record.idempotency_key, now=now)
        await asyncio.sleep(0)  # the other claims run here
        if existing is not None and not existing.is_claimable(now):
            return ClaimResult(claimed=False, existing=existing)
        put(self.table, record)
        return ClaimResult(claimed=True)


class RenewsAnyone(InMemoryPersistenceLayer):
    """Bug: renew writes the renewal without checking who holds the key."""

    async def renew(self, record):
        put(self.table, record)


class CompletesWithoutAClaim(InMemoryPersistenceLayer):
    """Bug: complete writes the result even when the caller's claim is gone."""

    async def complete(self, record, *, owner):
        with self.table._lock:
            current = self.table._records.get(record.idempotency_key)
        if current is not None and current.owner not in (None, owner):
            raise IdempotencyClaimLostError("taken over", key=record.idempotency_key)
        put(self.table, dataclasses.replace(record, owner=owner))


class SyncChecksThenClaims(SyncInMemoryPersistenceLayer):
    """Bug, in a sync store: a claim reads, then writes (not atomic across threads)."""

    def claim(self, record, *, now):
        existing = self.get(record.idempotency_key, now=now)
        time.sleep(0.01)  # the other threads claim here
        if existing is not None and not existing.is_claimable(now):
            return ClaimResult(claimed=False, existing=existing)
        put(self.table, record)
        return ClaimResult(claimed=True)


def make(base, store_class):
    class Kit(base):
        @pytest.fixture
        def store(self):
            return store_class()

    Kit.__name__ = Kit.__qualname__ = f"Test{store_class.__name__}"
    return Kit


TestCorrect = make(AsyncStoreContract, InMemoryPersistenceLayer)
TestReleasesAnyClaim = make(AsyncStoreContract, ReleasesAnyClaim)
TestNeverTakesOver = make(AsyncStoreContract, NeverTakesOver)
TestChecksThenClaims = make(AsyncStoreContract, ChecksThenClaims)
TestRenewsAnyone = make(AsyncStoreContract, RenewsAnyone)
TestCompletesWithoutAClaim = make(AsyncStoreContract, CompletesWithoutAClaim)
TestSyncCorrect = make(StoreContract, SyncInMemoryPersistenceLayer)
TestSyncChecksThenClaims = make(StoreContract, SyncChecksThenClaims)
'''

CAUGHT = {
    "ReleasesAnyClaim": {
        "test_release_by_another_owner_does_nothing",
        "test_release_after_a_takeover_does_nothing",
        "test_release_never_deletes_a_completed_record",
    },
    "NeverTakesOver": {
        "test_a_record_expired_at_now_is_taken_over[INPROGRESS]",
        "test_a_record_expired_at_now_is_taken_over[COMPLETED]",
        "test_a_record_orphaned_at_now_is_taken_over",
        "test_concurrent_takeovers_of_an_orphaned_claim_have_one_winner",
        "test_claim_each_answers_each_record_as_claim_would",  # one record is a takeover
        # the setup of these takes a key over
        "test_complete_after_a_takeover_raises_claim_lost",
        "test_release_after_a_takeover_does_nothing",
        "test_renew_after_a_takeover_raises_claim_lost",
    },
    "ChecksThenClaims": {
        "test_concurrent_claims_of_a_free_key_have_one_winner",
        "test_concurrent_takeovers_of_an_orphaned_claim_have_one_winner",
    },
    "RenewsAnyone": {
        "test_renew_after_a_takeover_raises_claim_lost",
        "test_renew_of_a_claim_that_is_gone_raises_claim_lost[deleted]",
        "test_renew_of_a_claim_that_is_gone_raises_claim_lost[released]",
        "test_renew_of_a_claim_that_is_gone_raises_claim_lost[never claimed]",
        "test_renew_after_the_completion_raises_claim_lost",
    },
    "CompletesWithoutAClaim": {
        "test_complete_of_a_claim_that_is_gone_raises_claim_lost[deleted]",
        "test_complete_of_a_claim_that_is_gone_raises_claim_lost[released]",
        "test_complete_of_a_claim_that_is_gone_raises_claim_lost[never claimed]",
    },
    "SyncChecksThenClaims": {
        "test_concurrent_claims_of_a_free_key_have_one_winner",
        "test_concurrent_takeovers_of_an_orphaned_claim_have_one_winner",
    },
}
"""For each broken store, the kit's tests that must fail on it (and only those)."""

_RESULT = re.compile(r"^(PASSED|FAILED) [^:]+::Test(\w+)::(.+?)(?: - .*)?$", re.MULTILINE)


def run_kit(pytester: pytest.Pytester) -> dict[str, dict[str, set[str]]]:
    """Run the kit on every store of `STORES`: per store, the tests passed and failed."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_stores=STORES)
    result = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider", timeout=240)
    found: dict[str, dict[str, set[str]]] = {}
    for outcome, store, test in _RESULT.findall(result.stdout.str()):
        found.setdefault(store, {"PASSED": set(), "FAILED": set()})[outcome].add(test)
    assert found, result.stdout.str()[-3000:]
    return found


def test_the_kit_catches_each_planted_bug_and_passes_the_correct_stores(
    pytester: pytest.Pytester,
) -> None:
    found = run_kit(pytester)
    for name in ("Correct", "SyncCorrect"):
        assert found[name]["FAILED"] == set(), name
        assert len(found[name]["PASSED"]) >= 34, name  # all but the skipped ones
    for store, caught in CAUGHT.items():
        passed = found["SyncCorrect" if store.startswith("Sync") else "Correct"]["PASSED"]
        assert found[store]["FAILED"] == caught, store
        assert found[store]["PASSED"] == passed - caught, store
