"""The HTTP core when another instance takes the key over while the app runs: the
app's response goes back to the client marked as not stored (``store-error``), with a
warning naming the lost claim, and the other instance's claim is left as it is."""

from __future__ import annotations

import logging
import time

import pytest

from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import IdempotencyClaimLostError
from aioidempotency.integrations._http import (
    NOT_STORED_HEADER,
    HttpIdempotency,
    HttpRequest,
    Reply,
)
from aioidempotency.persistence import InMemoryPersistenceLayer
from tests.helpers import WrapperStore


async def test_a_claim_taken_over_while_the_app_runs_leaves_its_reply_unstored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = WrapperStore(InMemoryPersistenceLayer())
    core = HttpIdempotency(store)
    now = int(time.time())

    async def app() -> Reply:
        # An operator deletes the record and another instance claims the key at once.
        [key] = {call.key for call in store.calls if call.method == "claim"}
        assert await store.inner.delete(key)
        other = DataRecord(
            idempotency_key=key,
            status=RecordStatus.INPROGRESS,
            expiry_timestamp=now + 600,
            owner="another-instance",
        )
        assert (await store.inner.claim(other, now=now)).claimed
        return Reply(201, (), b"charged")

    caplog.set_level(logging.WARNING, logger="aioidempotency")
    request = HttpRequest(method="POST", path="/pay", key="k-1", body=b"{}")
    outcome = await core.run(request, app)
    assert isinstance(outcome.response, Reply)
    assert outcome.response.body == b"charged"
    assert outcome.response.header(NOT_STORED_HEADER) == "store-error"
    assert isinstance(outcome.error, IdempotencyClaimLostError)
    [warning] = [r for r in caplog.records if "response not stored" in r.getMessage()]
    assert warning.getMessage().startswith("response not stored (store-error) for ")
    [key] = {call.key for call in store.calls if call.method == "claim"}
    kept = await store.inner.get(key)
    assert kept is not None
    assert kept.owner == "another-instance"
