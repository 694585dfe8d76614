"""A batch whose store goes down while records hold claims ahead of their handlers.

`process_batch` claims up to `claim_ahead` records before a handler slot is free for
them. If the store fails meanwhile, running those records would be running them
without a way to store their results: their redelivery could run them again. The
batch starts none of them once a store failure is seen (`BatchHaltedError`), so at
most the records already running (`concurrency`) meet the outage; the others are
redelivered and run once. The claims a batch sends together meet faults too: a lost
reply to them, and a store that is down before the batch starts. Each store kind of
the suite, behind its fault proxy.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aioidempotency._async.engine import IdempotencyEngine
from aioidempotency.batch import SQSRecord, process_batch
from tests.batch_events import batch, failed_ids, sqs_record
from tests.faults.rigs import TABLE, FaultRow, Rig

BOUND = 30.0
"""Upper bound on one batch: every record's store calls give up within the stores'
retry budget (5 s), and they run side by side."""
LEASE = 1.0
RECORDS = 12
CONCURRENCY = 2
FAULT_AT = 3
"""The store goes down as the third handler starts."""


Delivery = Callable[[list[dict[str, Any]]], Awaitable[dict[str, Any]]]


def _delivery(
    rig: Rig,
    engine: IdempotencyEngine,
    handle: Callable[[SQSRecord], Awaitable[dict[str, Any]]],
    row: FaultRow,
) -> Delivery:
    """Deliver raw records to `handle` as one batch through `rig`'s store (bounded),
    counted as calls of `row`."""

    async def deliver(raw: list[dict[str, Any]]) -> dict[str, Any]:
        row.calls += len(raw)
        return await asyncio.wait_for(
            process_batch(
                batch(raw),
                handle,
                persistence_store=rig.store,
                engine=engine,
                concurrency=CONCURRENCY,
            ),
            BOUND,
        )

    return deliver


async def _until_done(
    deliver: Delivery, records: list[dict[str, Any]], first: dict[str, Any]
) -> list[dict[str, Any]]:
    """Redeliver the records `first` reported failed until none fails (bounded); the
    records still failing at the end."""
    failed = set(failed_ids(first))
    redelivered = [r for r in records if r["messageId"] in failed]
    for _ in range(100):  # bounded: claims left by a fault end with their lease
        if not redelivered:
            break
        again = await deliver(redelivered)
        still = set(failed_ids(again))
        redelivered = [r for r in redelivered if r["messageId"] in still]
        if redelivered:
            await asyncio.sleep(0.1)  # pacing of the redelivery loop, as SQS's visibility timeout
    return redelivered


async def test_store_down_while_records_wait_with_their_claims(rig: Rig) -> None:
    engine = rig.engine(lease=LEASE, event_key_jmespath="messageId")
    row = TABLE.add(FaultRow("store down mid-batch, claims held ahead", rig.kind))
    records = [sqs_record({"n": n}) for n in range(RECORDS)]
    executions: collections.Counter[str] = collections.Counter()
    started_in_outage: list[str] = []
    outage = False

    async def handle(record: SQSRecord) -> dict[str, Any]:
        nonlocal outage
        executions[record.message_id] += 1
        if sum(executions.values()) == FAULT_AT:
            rig.proxy.refuse()  # the server is down from here on
            outage = True
        if outage:
            started_in_outage.append(record.message_id)
        return {"n": record.json()["n"]}

    deliver = _delivery(rig, engine, handle, row)
    started = time.monotonic()
    first = await deliver(records)
    row.to_error = time.monotonic() - started
    failed = set(failed_ids(first))
    # Every record was claimed before the outage (claims run ahead); only those whose
    # handler had a slot when it began met it: the trigger and at most the other slot.
    assert FAULT_AT <= sum(executions.values()) <= FAULT_AT + CONCURRENCY - 1, executions
    assert 1 <= len(started_in_outage) <= CONCURRENCY, started_in_outage
    not_started = {r["messageId"] for r in records} - set(executions)
    assert len(not_started) >= RECORDS - FAULT_AT - (CONCURRENCY - 1)
    assert not_started <= failed, "a record that never ran was reported done"
    assert set(started_in_outage) <= failed, "a result stored through a dead server?"

    rig.proxy.pass_through()  # the server is back
    outage = False
    assert await engine.drain(BOUND), "background completions and releases still running"
    left = await _until_done(deliver, records, first)
    assert not left, f"still failing after the outage: {[r['messageId'] for r in left]}"
    row.to_recovery = time.monotonic() - started

    # The records the outage kept from starting ran exactly once, on redelivery.
    assert all(executions[m] == 1 for m in not_started), executions
    # A record that ran into the outage ran again only if its result was lost with it.
    stored = await rig.records()
    for raw in records:
        key = engine.idempotency_key(raw)
        assert stored[key].status == "COMPLETED", (raw["messageId"], stored[key])
    assert all(count <= 2 for count in executions.values()), executions
    assert sum(executions.values()) <= RECORDS + len(started_in_outage)
    row.executions = sum(executions.values())
    row.locked_after = len(await rig.locked_keys())
    row.note = (
        f"{len(not_started)} of {RECORDS} not started, {len(started_in_outage)} ran in the outage"
    )


@pytest.mark.parametrize("fault", ["reply lost", "store down"])
async def test_the_claims_sent_together_meet_a_fault(rig: Rig, fault: str) -> None:
    engine = rig.engine(lease=LEASE, event_key_jmespath="messageId")
    row = TABLE.add(FaultRow(f"batch claims: {fault}", rig.kind))
    records = [sqs_record({"n": n}) for n in range(RECORDS)]
    executions: collections.Counter[str] = collections.Counter()

    async def handle(record: SQSRecord) -> dict[str, Any]:
        executions[record.message_id] += 1
        return {"n": record.json()["n"]}

    deliver = _delivery(rig, engine, handle, row)
    started = time.monotonic()
    if fault == "reply lost":
        # The first request carrying a claim reaches the server; its reply is lost.
        rig.proxy.reset_next(b"INPROGRESS", deliver=True)
    else:
        rig.proxy.refuse()
    first = await deliver(records)
    row.to_error = time.monotonic() - started
    failed = set(failed_ids(first))
    if fault == "reply lost":
        assert rig.proxy.stats().triggers == 1, "the claims' reply was not lost"
        # Only a claim whose reply was lost can fail; the claims answered with it are
        # not halted by its failure (the store answered them in the same round trip).
        assert len(failed) <= 1, failed
    if fault == "store down":
        assert not executions, "a record ran without its claim"
        assert failed == {r["messageId"] for r in records}
    # A record that ran was reported done, and one reported failed did not run.
    assert all(executions[m] == 1 for m in {r["messageId"] for r in records} - failed)
    assert not failed & set(executions), executions

    rig.proxy.pass_through()
    assert await engine.drain(BOUND), "background releases still running"
    left = await _until_done(deliver, records, first)
    assert not left, f"still failing after the fault: {[r['messageId'] for r in left]}"
    row.to_recovery = time.monotonic() - started
    assert executions == {r["messageId"]: 1 for r in records}, executions
    stored = await rig.records()
    for raw in records:
        assert stored[engine.idempotency_key(raw)].status == "COMPLETED", raw["messageId"]
    row.executions = sum(executions.values())
    row.locked_after = len(await rig.locked_keys())
    assert row.locked_after == 0
    row.note = f"{len(failed)} of {RECORDS} failed at first, each ran once"
