"""The persistence contract (`PersistenceLayer`), clause by clause, as a test class.

A store author subclasses `AsyncStoreContract` and overrides its `store` fixture; every
test of the class then runs on that store. The async source is
``aioidempotency/testing/_async/contract.py``; tools/unasync.py generates its sync twin
(``_sync/contract.py``: `StoreContract`, for a `SyncPersistenceLayer`). Both are public
as ``aioidempotency.testing.contract``.

Time is the caller's: each test passes `now` explicitly and never sleeps. Expiries lie
ahead of the real clock, since a server (Redis, DynamoDB's TTL) may expire records by
its own clock.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import ClassVar

import pytest

from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyInvalidStatusError,
    IdempotencyResultTooLargeError,
)
from aioidempotency.persistence import ClaimResult, DataRecord, PersistenceLayer, RecordStatus
from aioidempotency.testing._async.concurrency import at_once

__all__ = ["AsyncStoreContract", "UnusableRecordWriter"]

TTL = 3600
"""Seconds a record lives (`expiry_timestamp` is its claim's `now` plus this)."""
LEASE_MS = 60_000
"""Milliseconds an in-progress claim is held before it is orphaned."""
RESULT = '{"paid": 1}'

UnusableRecordWriter = Callable[[str], Awaitable[None]]
"""Writes, under the key it is given, a stored value that is not a usable record."""


def start() -> float:
    """The test's first `now`: the real time in whole seconds, so that the boundaries
    below are exact and every record expires after the test on the server's clock."""
    return float(int(time.time()))


def new_key() -> str:
    return f"test-contract#{uuid.uuid4().hex}"


def new_owner() -> str:
    return uuid.uuid4().hex


def claim_of(key: str, now: float, *, lease_ms: int | None = LEASE_MS) -> DataRecord:
    """A new in-progress claim on `key` made at `now`, as the engine builds it."""
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(now) + TTL,
        in_progress_expiry_timestamp=None if lease_ms is None else int(now * 1000) + lease_ms,
        payload_hash="hash-1",
        owner=new_owner(),
    )


def completion_of(claim: DataRecord, result: str = RESULT) -> DataRecord:
    """The completed record of `claim`, as the engine sends it (no owner, no lease)."""
    return DataRecord(
        idempotency_key=claim.idempotency_key,
        status=RecordStatus.COMPLETED,
        expiry_timestamp=claim.expiry_timestamp,
        response_data=result,
        payload_hash=claim.payload_hash,
    )


def renewal_of(claim: DataRecord, until_ms: int) -> DataRecord:
    """`claim` renewed until `until_ms`, as the lease keeper sends it."""
    return dataclasses.replace(claim, in_progress_expiry_timestamp=until_ms)


def owner_of(record: DataRecord) -> str:
    assert record.owner is not None
    return record.owner


def without_owner(record: DataRecord | None) -> DataRecord | None:
    """`record` without its owner token: a completed record may keep it or not."""
    return None if record is None else dataclasses.replace(record, owner=None)


async def claimed(store: PersistenceLayer, record: DataRecord, now: float) -> DataRecord:
    """Claim a free key with `record`; the claim must win."""
    result = await store.claim(record, now=now)
    assert result.claimed, result
    return record


async def completed(store: PersistenceLayer, now: float) -> tuple[DataRecord, DataRecord]:
    """A key claimed and completed at `now`: the claim and the completed record."""
    claim = await claimed(store, claim_of(new_key(), now), now)
    done = completion_of(claim)
    await store.complete(done, owner=owner_of(claim))
    return claim, done


async def taken_over(store: PersistenceLayer) -> tuple[DataRecord, DataRecord, float]:
    """A claim orphaned and taken over by another call: the late claim, the new one,
    and the `now` of the takeover."""
    now = start()
    late = await claimed(store, claim_of(new_key(), now), now)
    later = now + LEASE_MS / 1000 + 1
    new = await claimed(store, claim_of(late.idempotency_key, later), later)
    return late, new, later


GONE = ["deleted", "released", "never claimed"]


async def gone_claim(store: PersistenceLayer, how: str, now: float) -> DataRecord:
    """An in-progress claim that no longer exists (`how`: one of `GONE`)."""
    claim = claim_of(new_key(), now)
    if how == "never claimed":
        return claim
    await claimed(store, claim, now)
    if how == "deleted":
        assert await store.delete(claim.idempotency_key)
    else:
        await store.release(claim.idempotency_key, owner=owner_of(claim))
    return claim


def one_winner(claims: list[DataRecord], results: list[ClaimResult]) -> DataRecord:
    """The one claim of `claims` that won; every other one must have been refused
    with the winner's record (or as busy: another caller is taking the key over)."""
    winners = [claim for claim, result in zip(claims, results, strict=True) if result.claimed]
    assert len(winners) == 1, f"{len(winners)} of {len(claims)} concurrent claims won"
    [winner] = winners
    for result in results:
        if not result.claimed:
            assert result.existing == winner or (result.busy and result.existing is None), result
    return winner


class AsyncStoreContract:
    """The persistence contract's tests, for a store (`PersistenceLayer`).

    Subclass it in a test module (its name starting with ``Test``) and override the
    `store` fixture to return the store under test: a fresh one, or one shared with
    other tests (each test uses keys of its own).

    Optional overrides:

    - the `write_unusable_record` fixture: a function that writes, under the key it is
      given, a value your store cannot read as a record (bad JSON, an unknown status...),
      bypassing the store; without it the test of unusable records is skipped;
    - the `result_limit_bytes` fixture: the largest result your store holds, if it
      has a limit; a result over it must raise `IdempotencyResultTooLargeError`;
    - `large_result_chars`, `concurrent_claims`: class attributes sizing those tests.
    """

    # begin async-only
    # The async kit's tests run on pytest-asyncio (``aioidempotency[testing]``).
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]
    # end async-only
    large_result_chars: ClassVar[int] = 300_000
    """Characters of the result that must round trip whole (under DynamoDB's 400 KB)."""
    concurrent_claims: ClassVar[int] = 16
    """Claims sent at once on one key by the concurrency tests."""

    @pytest.fixture
    def store(self) -> PersistenceLayer:
        """The store under test: override this fixture in your subclass."""
        raise NotImplementedError(
            f"{type(self).__name__} must override the `store` fixture to return the store "
            "under test"
        )

    @pytest.fixture
    def write_unusable_record(self) -> UnusableRecordWriter | None:
        """Override to return a function writing an unusable stored value under a key
        (`UnusableRecordWriter`); None (the default) skips the test that needs one."""
        return None

    @pytest.fixture
    def result_limit_bytes(self) -> int | None:
        """Override to return the store's limit on a result's size; None: no limit."""
        return None

    # -- claim -----------------------------------------------------------------------------

    async def test_claim_of_a_free_key_writes_the_record(self, store: PersistenceLayer) -> None:
        now = start()
        record = claim_of(new_key(), now)
        result = await store.claim(record, now=now)
        assert (result.claimed, result.existing, result.busy) == (True, None, False)
        assert await store.get(record.idempotency_key, now=now) == record

    async def test_a_live_claim_refuses_another_and_returns_itself(
        self, store: PersistenceLayer
    ) -> None:
        now = start()
        first = await claimed(store, claim_of(new_key(), now), now)
        refused = await store.claim(claim_of(first.idempotency_key, now), now=now)
        assert not refused.claimed
        assert refused.existing == first
        assert await store.get(first.idempotency_key, now=now) == first

    async def test_a_completed_record_refuses_a_claim_and_returns_itself(
        self, store: PersistenceLayer
    ) -> None:
        now = start()
        claim, done = await completed(store, now)
        refused = await store.claim(claim_of(claim.idempotency_key, now + 1), now=now + 1)
        assert not refused.claimed
        assert without_owner(refused.existing) == done
        assert refused.existing is not None
        assert refused.existing.response_json() == {"paid": 1}

    @pytest.mark.parametrize("status", [RecordStatus.INPROGRESS, RecordStatus.COMPLETED])
    async def test_a_record_expired_at_now_is_taken_over(
        self, store: PersistenceLayer, status: RecordStatus
    ) -> None:
        now = start()
        old = await claimed(store, claim_of(new_key(), now, lease_ms=None), now)
        if status is RecordStatus.COMPLETED:
            await store.complete(completion_of(old), owner=owner_of(old))
        key, expiry = old.idempotency_key, old.expiry_timestamp
        # At `expiry` itself (any fraction of that second) the record is still live.
        last_moment = expiry + 0.999
        refused = await store.claim(claim_of(key, last_moment), now=last_moment)
        assert not refused.claimed
        assert refused.existing is not None
        assert refused.existing.status is status
        expired = float(expiry + 1)
        assert refused.existing.is_claimable(expired)
        new = claim_of(key, expired)
        assert (await store.claim(new, now=expired)).claimed
        assert await store.get(key, now=expired) == new

    async def test_a_record_orphaned_at_now_is_taken_over(self, store: PersistenceLayer) -> None:
        now = start()
        old = await claimed(store, claim_of(new_key(), now), now)
        key, lease_end_ms = old.idempotency_key, old.in_progress_expiry_timestamp
        assert lease_end_ms is not None
        # At the lease's last millisecond the claim still holds; one millisecond later it
        # is orphaned (its record lives on: it expires in `TTL`).
        lease_end = lease_end_ms / 1000
        refused = await store.claim(claim_of(key, lease_end), now=lease_end)
        assert not refused.claimed
        assert refused.existing == old
        orphaned = lease_end + 0.002
        assert old.is_orphaned(orphaned)
        assert not old.is_expired(orphaned)
        new = claim_of(key, orphaned)
        assert (await store.claim(new, now=orphaned)).claimed
        assert await store.get(key, now=orphaned) == new

    async def test_a_claim_sent_twice_returns_the_callers_own_record(
        self, store: PersistenceLayer
    ) -> None:
        now = start()
        record = await claimed(store, claim_of(new_key(), now), now)
        again = await store.claim(record, now=now)
        assert not again.claimed
        assert again.existing == record
        assert again.existing.owner == record.owner
        assert await store.get(record.idempotency_key, now=now) == record

    # begin async-only
    async def test_claim_each_answers_each_record_as_claim_would(
        self, store: PersistenceLayer, write_unusable_record: UnusableRecordWriter | None
    ) -> None:
        now = start()
        orphan = await claimed(store, claim_of(new_key(), now), now)
        later = now + LEASE_MS / 1000 + 1  # `orphan` is orphaned; the others are live
        live = await claimed(store, claim_of(new_key(), later), later)
        mine = await claimed(store, claim_of(new_key(), later), later)
        _, done = await completed(store, later)
        free = claim_of(new_key(), later)
        takeover = claim_of(orphan.idempotency_key, later)
        records = [
            free,
            claim_of(live.idempotency_key, later),
            mine,  # sent again: the caller's own record comes back
            claim_of(done.idempotency_key, later),
            takeover,
        ]
        if write_unusable_record is not None:
            await write_unusable_record(unusable := new_key())
            records.append(claim_of(unusable, later))
        answers = await store.claim_each(records, now=later)
        assert len(answers) == len(records)
        assert answers[0] == ClaimResult(claimed=True)
        assert answers[1] == ClaimResult(claimed=False, existing=live)
        assert answers[2] == ClaimResult(claimed=False, existing=mine)
        refused = answers[3]
        assert isinstance(refused, ClaimResult)
        assert not refused.claimed
        assert without_owner(refused.existing) == done
        assert answers[4] == ClaimResult(claimed=True)
        if write_unusable_record is not None:
            assert isinstance(answers[5], IdempotencyInvalidStatusError), answers[5]
        assert await store.get(free.idempotency_key, now=later) == free
        assert await store.get(takeover.idempotency_key, now=later) == takeover
        assert await store.get(live.idempotency_key, now=later) == live
        assert await store.claim_each([], now=later) == []

    # end async-only
    # -- get -------------------------------------------------------------------------------

    async def test_get_of_a_missing_key_is_none(self, store: PersistenceLayer) -> None:
        assert await store.get(new_key(), now=start()) is None

    @pytest.mark.parametrize("status", [RecordStatus.INPROGRESS, RecordStatus.COMPLETED])
    async def test_get_of_a_record_expired_at_now_is_none(
        self, store: PersistenceLayer, status: RecordStatus
    ) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        record = claim
        if status is RecordStatus.COMPLETED:
            record = completion_of(claim)
            await store.complete(record, owner=owner_of(claim))
        key, expiry = record.idempotency_key, record.expiry_timestamp
        assert without_owner(await store.get(key, now=expiry + 0.999)) == without_owner(record)
        assert await store.get(key, now=expiry + 1) is None

    # -- complete --------------------------------------------------------------------------

    async def test_complete_by_the_owner_replaces_the_claim(self, store: PersistenceLayer) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        done = completion_of(claim)
        await store.complete(done, owner=owner_of(claim))
        stored = await store.get(claim.idempotency_key, now=now)
        assert without_owner(stored) == done
        assert stored is not None
        assert stored.owner in (None, claim.owner)

    async def test_complete_after_a_takeover_raises_claim_lost(
        self, store: PersistenceLayer
    ) -> None:
        late, new, now = await taken_over(store)
        with pytest.raises(IdempotencyClaimLostError) as lost:
            await store.complete(completion_of(late), owner=owner_of(late))
        assert lost.value.key == late.idempotency_key
        assert await store.get(new.idempotency_key, now=now) == new

    @pytest.mark.parametrize("how", GONE)
    async def test_complete_of_a_claim_that_is_gone_raises_claim_lost(
        self, store: PersistenceLayer, how: str
    ) -> None:
        now = start()
        claim = await gone_claim(store, how, now)
        with pytest.raises(IdempotencyClaimLostError) as lost:
            await store.complete(completion_of(claim), owner=owner_of(claim))
        assert lost.value.key == claim.idempotency_key
        assert await store.get(claim.idempotency_key, now=now) is None  # nothing partial

    async def test_a_completion_sent_twice_succeeds(self, store: PersistenceLayer) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        done = completion_of(claim)
        await store.complete(done, owner=owner_of(claim))
        await store.complete(done, owner=owner_of(claim))
        assert without_owner(await store.get(claim.idempotency_key, now=now)) == done

    # -- release ---------------------------------------------------------------------------

    async def test_release_by_the_owner_deletes_the_claim(self, store: PersistenceLayer) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        await store.release(claim.idempotency_key, owner=owner_of(claim))
        assert await store.get(claim.idempotency_key, now=now) is None
        await claimed(store, claim_of(claim.idempotency_key, now), now)  # the key is free

    async def test_release_by_another_owner_does_nothing(self, store: PersistenceLayer) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        await store.release(claim.idempotency_key, owner=new_owner())
        assert await store.get(claim.idempotency_key, now=now) == claim

    async def test_release_after_a_takeover_does_nothing(self, store: PersistenceLayer) -> None:
        late, new, now = await taken_over(store)
        await store.release(late.idempotency_key, owner=owner_of(late))
        assert await store.get(new.idempotency_key, now=now) == new

    async def test_release_never_deletes_a_completed_record(self, store: PersistenceLayer) -> None:
        now = start()
        claim, done = await completed(store, now)
        await store.release(claim.idempotency_key, owner=owner_of(claim))
        await store.release(claim.idempotency_key, owner=new_owner())
        assert without_owner(await store.get(claim.idempotency_key, now=now)) == done

    async def test_release_is_safe_to_repeat(self, store: PersistenceLayer) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        for _ in range(2):
            await store.release(claim.idempotency_key, owner=owner_of(claim))
            assert await store.get(claim.idempotency_key, now=now) is None
        await store.release(new_key(), owner=owner_of(claim))  # never claimed
        assert await store.get(claim.idempotency_key, now=now) is None

    # -- renew -----------------------------------------------------------------------------

    async def test_renew_by_the_owner_moves_the_lease(self, store: PersistenceLayer) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        assert claim.in_progress_expiry_timestamp is not None
        renewal = renewal_of(claim, claim.in_progress_expiry_timestamp + LEASE_MS)
        await store.renew(renewal)
        assert await store.get(claim.idempotency_key, now=now) == renewal
        # Past the first lease the renewed claim still holds.
        after_first_lease = now + LEASE_MS / 1000 + 1
        refused = await store.claim(
            claim_of(claim.idempotency_key, after_first_lease), now=after_first_lease
        )
        assert not refused.claimed
        assert refused.existing == renewal

    async def test_renew_after_a_takeover_raises_claim_lost(self, store: PersistenceLayer) -> None:
        late, new, now = await taken_over(store)
        with pytest.raises(IdempotencyClaimLostError) as lost:
            await store.renew(renewal_of(late, int(now * 1000) + LEASE_MS))
        assert lost.value.key == late.idempotency_key
        assert await store.get(new.idempotency_key, now=now) == new

    @pytest.mark.parametrize("how", GONE)
    async def test_renew_of_a_claim_that_is_gone_raises_claim_lost(
        self, store: PersistenceLayer, how: str
    ) -> None:
        now = start()
        claim = await gone_claim(store, how, now)
        with pytest.raises(IdempotencyClaimLostError) as lost:
            await store.renew(renewal_of(claim, int(now * 1000) + 2 * LEASE_MS))
        assert lost.value.key == claim.idempotency_key
        assert await store.get(claim.idempotency_key, now=now) is None  # nothing partial

    async def test_renew_after_the_completion_raises_claim_lost(
        self, store: PersistenceLayer
    ) -> None:
        """A renewal landing after the owner completed never turns the result back into
        a claim: the owner holds no claim any more."""
        now = start()
        claim, done = await completed(store, now)
        with pytest.raises(IdempotencyClaimLostError) as lost:
            await store.renew(renewal_of(claim, int(now * 1000) + 2 * LEASE_MS))
        assert lost.value.key == claim.idempotency_key
        assert without_owner(await store.get(claim.idempotency_key, now=now)) == done

    async def test_a_renewal_sent_twice_succeeds(self, store: PersistenceLayer) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        renewal = renewal_of(claim, int(now * 1000) + 2 * LEASE_MS)
        await store.renew(renewal)
        await store.renew(renewal)
        assert await store.get(claim.idempotency_key, now=now) == renewal

    # -- delete ----------------------------------------------------------------------------

    @pytest.mark.parametrize("status", [RecordStatus.INPROGRESS, RecordStatus.COMPLETED])
    async def test_delete_removes_any_record_and_says_so(
        self, store: PersistenceLayer, status: RecordStatus
    ) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        if status is RecordStatus.COMPLETED:
            await store.complete(completion_of(claim), owner=owner_of(claim))
        assert await store.delete(claim.idempotency_key) is True
        assert await store.get(claim.idempotency_key, now=now) is None
        assert await store.delete(claim.idempotency_key) is False

    async def test_delete_of_a_missing_key_is_false(self, store: PersistenceLayer) -> None:
        assert await store.delete(new_key()) is False

    # -- large and unusable records --------------------------------------------------------

    async def test_a_large_result_round_trips_whole(self, store: PersistenceLayer) -> None:
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        # Text that looks like a record's attributes, inside the result, must not count.
        decoy = json.dumps({"status": "INPROGRESS", "owner_token": claim.owner, "expiration": 1})
        result = json.dumps({"blob": "x" * self.large_result_chars, "decoy": decoy, "t": "été"})
        done = completion_of(claim, result)
        await store.complete(done, owner=owner_of(claim))
        refused = await store.claim(claim_of(claim.idempotency_key, now), now=now)
        assert not refused.claimed
        assert without_owner(refused.existing) == done
        assert without_owner(await store.get(claim.idempotency_key, now=now)) == done

    async def test_a_result_over_the_stores_limit_is_refused_and_the_claim_kept(
        self, store: PersistenceLayer, result_limit_bytes: int | None
    ) -> None:
        if result_limit_bytes is None:
            pytest.skip("the store has no limit on a result's size (`result_limit_bytes`)")
        now = start()
        claim = await claimed(store, claim_of(new_key(), now), now)
        too_large = json.dumps("x" * (result_limit_bytes + 1024))
        with pytest.raises(IdempotencyResultTooLargeError):
            await store.complete(completion_of(claim, too_large), owner=owner_of(claim))
        assert await store.get(claim.idempotency_key, now=now) == claim  # nothing partial

    async def test_an_unusable_record_is_refused_and_left_as_it_is(
        self, store: PersistenceLayer, write_unusable_record: UnusableRecordWriter | None
    ) -> None:
        if write_unusable_record is None:
            pytest.skip("no way to write an unusable record (`write_unusable_record`)")
        now = start()
        key = new_key()
        await write_unusable_record(key)
        with pytest.raises(IdempotencyInvalidStatusError):
            await store.get(key, now=now)
        claim = claim_of(key, now)
        with pytest.raises(IdempotencyInvalidStatusError):
            await store.claim(claim, now=now)
        # Nothing of the caller's is there: its completion and renewal find no claim.
        with pytest.raises((IdempotencyClaimLostError, IdempotencyInvalidStatusError)):
            await store.complete(completion_of(claim), owner=owner_of(claim))
        with pytest.raises((IdempotencyClaimLostError, IdempotencyInvalidStatusError)):
            await store.renew(renewal_of(claim, int(now * 1000) + 2 * LEASE_MS))
        await store.release(key, owner=owner_of(claim))
        with pytest.raises(IdempotencyInvalidStatusError):  # left as it was
            await store.get(key, now=now)
        assert await store.delete(key) is True  # what an operator's tool does
        assert await store.get(key, now=now) is None

    # -- concurrency -----------------------------------------------------------------------

    async def test_concurrent_claims_of_a_free_key_have_one_winner(
        self, store: PersistenceLayer
    ) -> None:
        now = start()
        key = new_key()
        claims = [claim_of(key, now) for _ in range(self.concurrent_claims)]
        results = await at_once([functools.partial(store.claim, c, now=now) for c in claims])
        winner = one_winner(claims, results)
        assert await store.get(key, now=now) == winner

    async def test_concurrent_takeovers_of_an_orphaned_claim_have_one_winner(
        self, store: PersistenceLayer
    ) -> None:
        now = start()
        old = await claimed(store, claim_of(new_key(), now), now)
        key = old.idempotency_key
        later = now + LEASE_MS / 1000 + 1
        claims = [claim_of(key, later) for _ in range(self.concurrent_claims)]
        results = await at_once([functools.partial(store.claim, c, now=later) for c in claims])
        winner = one_winner(claims, results)
        assert await store.get(key, now=later) == winner
        with pytest.raises(IdempotencyClaimLostError):
            await store.complete(completion_of(old), owner=owner_of(old))

    # -- closing ---------------------------------------------------------------------------

    async def test_the_store_closes_at_the_end_of_its_with_block(
        self, store: PersistenceLayer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        closes: list[str] = []
        original = store.aclose

        async def aclose() -> None:
            closes.append("aclose")
            await original()

        monkeypatch.setattr(store, "aclose", aclose)
        now = start()
        claim = claim_of(new_key(), now)
        async with store as entered:
            assert entered is store
            result = await entered.claim(claim, now=now)
            assert result.claimed
        assert closes == ["aclose"]

        async def fail_inside() -> None:
            async with store:
                raise RuntimeError("raised inside the block")

        with pytest.raises(RuntimeError, match="inside the block"):
            await fail_inside()
        assert closes == ["aclose", "aclose"]
        # Closing loses no record; the next call opens what it needs again.
        assert await store.get(claim.idempotency_key, now=now) == claim
