"""`process_batch`: per-record idempotency and partial batch responses per source."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import threading
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from aioidempotency import (
    IdempotencyConfig,
    InMemoryPersistenceLayer,
    PersistenceLayer,
    store_from_url,
)
from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.engine import IdempotencyEngine, SentClaim
from aioidempotency._async.glide import GlideCacheClient
from aioidempotency._async.store import ClaimResult
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.aws_lambda import LambdaHandlerError
from aioidempotency.batch import (
    BatchEventError,
    BatchHaltedError,
    DynamoDBStreamRecord,
    KinesisRecord,
    SQSRecord,
    parse_records,
    process_batch,
    process_batch_sync,
)
from aioidempotency.events import EventKind
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyPersistenceConnectionError,
)
from tests.aws_helpers import create_table
from tests.batch_events import (
    batch,
    dynamodb_record,
    failed_ids,
    kinesis_record,
    sqs_record,
)

ORDER_KEY = IdempotencyConfig(event_key_jmespath="powertools_json(body).order_id")


class Gate:
    """Lets handlers through once `width` of them are inside at the same time (or all
    the rest are), and records the most seen inside at once."""

    def __init__(self, width: int, total: int) -> None:
        self.width = width
        self.remaining = total
        self.inside = 0
        self.most = 0
        self.open = asyncio.Event()

    async def enter(self) -> None:
        self.inside += 1
        self.most = max(self.most, self.inside)
        if self.inside >= min(self.width, self.remaining):
            self.open.set()
        await asyncio.wait_for(self.open.wait(), 10)

    def leave(self) -> None:
        self.inside -= 1
        self.remaining -= 1


async def test_sqs_standard_runs_concurrently_up_to_the_limit() -> None:
    store = InMemoryPersistenceLayer()
    records = [sqs_record({"order_id": n}) for n in range(25)]
    gate = Gate(width=10, total=25)
    seen: list[str] = []

    async def handle(record: SQSRecord) -> str:
        await gate.enter()
        try:
            seen.append(record.message_id)
            return record.message_id
        finally:
            gate.leave()

    response = await process_batch(batch(records), handle, persistence_store=store)
    assert response == {"batchItemFailures": []}
    assert gate.most == 10
    assert sorted(seen) == sorted(r["messageId"] for r in records)
    # each record's own result is stored under its own key (no late binding)
    engine = IdempotencyEngine(store, IdempotencyConfig(event_key_jmespath="messageId"))
    for raw in records:
        stored = await store.get(engine.idempotency_key(raw, handle))
        assert stored is not None
        assert stored.response_json() == raw["messageId"]


async def test_sqs_failures_are_reported_and_replays_succeed() -> None:
    store = InMemoryPersistenceLayer()
    records = [sqs_record({"order_id": n}) for n in range(6)]
    runs: collections.Counter[str] = collections.Counter()
    fail_once = {records[1]["messageId"], records[4]["messageId"]}

    async def handle(record: SQSRecord) -> int:
        runs[record.message_id] += 1
        if record.message_id in fail_once:
            fail_once.discard(record.message_id)
            raise RuntimeError("downstream hiccup")
        return int(record.json()["order_id"])

    first = await process_batch(batch(records), handle, persistence_store=store)
    assert failed_ids(first) == [records[1]["messageId"], records[4]["messageId"]]
    # Lambda redelivers the whole batch's failures; here the whole batch comes back
    second = await process_batch(batch(records), handle, persistence_store=store)
    assert second == {"batchItemFailures": []}
    assert all(count == 1 for mid, count in runs.items() if mid not in failed_ids(first))
    assert runs[records[1]["messageId"]] == 2
    assert runs[records[4]["messageId"]] == 2
    assert len(runs) == 6


async def test_business_key_from_the_body() -> None:
    store = InMemoryPersistenceLayer()
    records = [sqs_record({"order_id": "A", "copy": n}) for n in range(3)]
    records.append(sqs_record({"order_id": "B"}))
    runs: list[str] = []

    async def charge(record: SQSRecord) -> dict[str, Any]:
        order = record.json()["order_id"]
        runs.append(order)
        return {"charged": order}

    # concurrency 1: the three copies of A meet a completed record, not an in-flight one
    response = await process_batch(
        batch(records), charge, persistence_store=store, config=ORDER_KEY, concurrency=1
    )
    assert response == {"batchItemFailures": []}
    assert sorted(runs) == ["A", "B"]


class ClaimCountingStore(InMemoryPersistenceLayer):
    """Sets `claimed` once `expected` claims have been answered."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.answered = 0
        self.claimed = asyncio.Event()

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        result = await super().claim(record, now=now)
        self.answered += 1
        if self.answered == self.expected:
            self.claimed.set()
        return result


async def test_copies_of_one_key_in_a_batch_run_after_each_other() -> None:
    store = ClaimCountingStore(expected=1)
    records = [sqs_record({"order_id": "A", "copy": n}) for n in range(3)]
    records.append(sqs_record({"order_id": "B"}))
    runs: list[str] = []

    async def charge(record: SQSRecord) -> str:
        runs.append(record.json()["order_id"])
        # While this copy awaits, the other copies of A wait their turn (they would
        # be refused as in progress if they ran at once); B goes on meanwhile.
        await asyncio.wait_for(store.claimed.wait(), 10)
        return "ok"

    response = await process_batch(
        batch(records), charge, persistence_store=store, config=ORDER_KEY
    )
    # one copy of A ran, the two others replayed its result: nothing to redeliver
    assert response == {"batchItemFailures": []}
    assert sorted(runs) == ["A", "B"]


async def test_a_copy_retries_when_the_first_failed() -> None:
    store = InMemoryPersistenceLayer()
    records = [sqs_record({"order_id": "A", "copy": n}) for n in range(3)]
    runs: list[int] = []

    async def charge(record: SQSRecord) -> str:
        runs.append(record.json()["copy"])
        if len(runs) == 1:
            raise RuntimeError("downstream hiccup")
        return "ok"

    response = await process_batch(
        batch(records), charge, persistence_store=store, config=ORDER_KEY
    )
    # the first copy failed and released the key: the second ran, the third replayed
    assert failed_ids(response) == [records[0]["messageId"]]
    assert runs == [0, 1]


class OutstandingStore(InMemoryPersistenceLayer):
    """Counts the claims held (claimed, not yet completed or released): `most` is the
    most held at once; `reached` is set once `target` are held together."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.held = 0
        self.most = 0
        self.reached = asyncio.Event()

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        result = await super().claim(record, now=now)
        if result.claimed:
            self.held += 1
            self.most = max(self.most, self.held)
            if self.held >= self.target:
                self.reached.set()
        return result

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        await super().complete(record, owner=owner)
        self.held -= 1

    async def release(self, key: str, *, owner: str) -> None:
        await super().release(key, owner=owner)
        self.held -= 1


@pytest.mark.parametrize(
    ("concurrency", "claim_ahead", "records"),
    [(2, 100, 8), (2, 3, 12), (3, 0, 9)],
)
async def test_claims_run_ahead_of_the_handlers_up_to_claim_ahead(
    concurrency: int, claim_ahead: int, records: int
) -> None:
    bound = min(records, concurrency + claim_ahead)
    store = OutstandingStore(target=bound)
    gate = Gate(width=concurrency, total=records)

    async def handle(record: SQSRecord) -> str:
        await gate.enter()
        try:
            # no handler finishes before `bound` claims are held at once
            await asyncio.wait_for(store.reached.wait(), 10)
            return record.message_id
        finally:
            gate.leave()

    response = await process_batch(
        batch(sqs_record({"n": n}) for n in range(records)),
        handle,
        persistence_store=store,
        concurrency=concurrency,
        claim_ahead=claim_ahead,
    )
    assert response == {"batchItemFailures": []}
    assert store.most == bound  # reached, never passed
    assert gate.most == concurrency  # handlers stay within `concurrency`
    assert store.held == 0


async def test_a_record_without_a_key_fails_alone_or_stops_its_group() -> None:
    store = InMemoryPersistenceLayer()
    strict = IdempotencyConfig(
        event_key_jmespath="powertools_json(body).order_id", raise_on_no_idempotency_key=True
    )
    runs: list[str] = []

    async def charge(record: SQSRecord) -> str:
        runs.append(record.message_id)
        return "ok"

    keyless = sqs_record({"note": "no order id"})
    standard = [sqs_record({"order_id": "A"}), keyless, sqs_record({"order_id": "B"})]
    response = await process_batch(batch(standard), charge, persistence_store=store, config=strict)
    assert failed_ids(response) == [keyless["messageId"]]
    assert sorted(runs) == sorted([standard[0]["messageId"], standard[2]["messageId"]])

    runs.clear()
    group = [
        sqs_record({"order_id": "C"}, group="g"),
        sqs_record({"note": "no order id"}, group="g"),
        sqs_record({"order_id": "D"}, group="g"),
    ]
    response = await process_batch(batch(group), charge, persistence_store=store, config=strict)
    assert failed_ids(response) == [group[1]["messageId"], group[2]["messageId"]]
    assert runs == [group[0]["messageId"]]


async def test_in_progress_elsewhere_is_reported_failed_without_running() -> None:
    store = InMemoryPersistenceLayer()
    record = sqs_record({"order_id": "busy"})
    runs: list[str] = []

    async def handle(r: SQSRecord) -> None:
        runs.append(r.message_id)

    engine = IdempotencyEngine(store, IdempotencyConfig(event_key_jmespath="messageId"))
    key = engine.idempotency_key(record, handle)
    now = time.time()
    claim = DataRecord(
        key,
        RecordStatus.INPROGRESS,
        expiry_timestamp=int(now) + 3600,
        in_progress_expiry_timestamp=int((now + 600) * 1000),
        owner="another-invocation",
    )
    assert (await store.claim(claim, now=now)).claimed
    response = await process_batch(batch([record]), handle, persistence_store=store)
    assert failed_ids(response) == [record["messageId"]]
    assert runs == []


async def test_payload_validation_refuses_a_changed_copy() -> None:
    store = InMemoryPersistenceLayer()
    config = IdempotencyConfig(
        event_key_jmespath="powertools_json(body).order_id",
        payload_validation_jmespath="powertools_json(body).amount",
    )
    first = sqs_record({"order_id": "A", "amount": 10})
    changed = sqs_record({"order_id": "A", "amount": 99})
    runs: list[int] = []

    async def charge(record: SQSRecord) -> int:
        runs.append(record.json()["amount"])
        return 1

    assert await process_batch(batch([first]), charge, persistence_store=store, config=config) == {
        "batchItemFailures": []
    }
    response = await process_batch(batch([changed]), charge, persistence_store=store, config=config)
    assert failed_ids(response) == [changed["messageId"]]
    assert runs == [10]


async def test_fifo_groups_run_in_order_and_stop_at_a_failure() -> None:
    store = InMemoryPersistenceLayer()
    records = []
    for n in range(5):
        records.append(sqs_record({"group": "A", "n": n}, group="A", sequence=2 * n))
        records.append(sqs_record({"group": "B", "n": n}, group="B", sequence=2 * n + 1))
    order: dict[str, list[int]] = collections.defaultdict(list)
    in_group: collections.Counter[str] = collections.Counter()

    async def handle(record: SQSRecord) -> None:
        body = record.json()
        group = record.message_group_id
        assert group is not None
        in_group[group] += 1
        assert in_group[group] == 1, "one record of a group at a time"
        order[group].append(body["n"])
        await asyncio.sleep(0)  # let other groups interleave
        in_group[group] -= 1
        if group == "A" and body["n"] == 2:
            raise ValueError("A#2 fails")

    response = await process_batch(
        batch(records), handle, persistence_store=store, key_prefix="fifo"
    )
    a_ids = [r["messageId"] for r in records if r["attributes"]["MessageGroupId"] == "A"]
    assert failed_ids(response) == a_ids[2:]
    assert order["A"] == [0, 1, 2], "nothing after the failure in its group ran"
    assert order["B"] == [0, 1, 2, 3, 4]
    # the redelivered group resumes in order; A#0 and A#1 are not in it
    redelivered = [r for r in records if r["messageId"] in a_ids[2:]]
    order.clear()
    again = await process_batch(
        batch(redelivered),
        functools.partial(_ok, order=order),
        persistence_store=store,
        key_prefix="fifo",
    )
    assert again == {"batchItemFailures": []}
    assert order["A"] == [2, 3, 4]


async def _ok(record: SQSRecord, order: dict[str, list[int]]) -> None:
    order[str(record.message_group_id)].append(record.json()["n"])


def _kinesis_batch(keys: list[str], start: int = 100) -> list[dict[str, Any]]:
    return [
        kinesis_record({"key": key, "n": n}, sequence_number=str(start + n), partition_key=key)
        for n, key in enumerate(keys)
    ]


async def test_kinesis_reports_the_lowest_failed_sequence_number() -> None:
    store = InMemoryPersistenceLayer()
    records = _kinesis_batch(["p1", "p2", "p1", "p2", "p1", "p2"])
    ran: list[int] = []
    fail = {2}

    async def handle(record: KinesisRecord) -> int:
        n = int(record.json()["n"])
        ran.append(n)
        if n in fail:
            fail.discard(n)
            raise RuntimeError("boom")
        return n

    response = await process_batch(batch(records), handle, persistence_store=store)
    assert failed_ids(response) == ["102"]
    assert sorted(ran) == [0, 1, 2, 3, 5], "p1's records after its failure did not run"
    # Lambda resumes the shard at 102: the records after it that succeeded replay
    ran.clear()
    redelivered = [r for r in records if int(r["kinesis"]["sequenceNumber"]) >= 102]
    again = await process_batch(batch(redelivered), handle, persistence_store=store)
    assert again == {"batchItemFailures": []}
    assert sorted(ran) == [2, 4]


async def test_kinesis_record_fields() -> None:
    (record,) = parse_records(
        batch([kinesis_record({"a": 1}, sequence_number="42", partition_key="pk")])
    )
    assert isinstance(record, KinesisRecord)
    assert record.json() == {"a": 1}
    assert record.shard_id == "shardId-000000000000"
    assert record.item_identifier == "42"
    assert record.partition_key == "pk"


async def test_dynamodb_streams_order_per_item_and_report_the_first_failure() -> None:
    store = InMemoryPersistenceLayer()

    def change(pk: str, seq: int, total: int) -> dict[str, Any]:
        return dynamodb_record(
            {"pk": {"S": pk}},
            sequence_number=str(seq),
            new_image={"pk": {"S": pk}, "total": {"N": str(total)}, "tags": {"SS": ["x"]}},
            event_name="MODIFY",
        )

    records = [change("a", 10, 1), change("b", 11, 5), change("a", 12, 2), change("b", 13, 6)]
    seen: list[tuple[str, int]] = []

    async def handle(record: DynamoDBStreamRecord) -> None:
        image = record.new_image
        assert image is not None
        seen.append((image["pk"], int(image["total"])))
        if image["pk"] == "b" and image["total"] == 5:
            raise RuntimeError("b fails")

    response = await process_batch(batch(records), handle, persistence_store=store)
    assert failed_ids(response) == ["11"]
    assert sorted(seen) == [("a", 1), ("a", 2), ("b", 5)]
    (first, *_) = parse_records(batch(records))
    assert isinstance(first, DynamoDBStreamRecord)
    assert first.keys == {"pk": "a"}
    assert first.json() == {"pk": "a", "total": 1, "tags": {"x"}}


async def test_plain_def_handlers_run_in_bounded_worker_threads() -> None:
    store = InMemoryPersistenceLayer()
    records = [sqs_record({"n": n}) for n in range(12)]
    lock = threading.Lock()
    inside = 0
    most = 0
    threads: set[str] = set()
    four_inside = threading.Event()

    def handle(record: SQSRecord) -> int:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
            threads.add(threading.current_thread().name)
            if inside == 4:
                four_inside.set()
        four_inside.wait(10)
        with lock:
            inside -= 1
        return int(record.json()["n"])

    response = await process_batch(batch(records), handle, persistence_store=store, concurrency=4)
    assert response == {"batchItemFailures": []}
    assert most == 4
    assert all(name.startswith("aioidempotency-batch") for name in threads)
    assert threading.current_thread().name not in threads


def test_sync_entry_point_for_classic_handlers() -> None:
    store = InMemoryPersistenceLayer()
    records = [sqs_record({"order_id": "X"}), sqs_record({"order_id": "X"})]
    runs: list[str] = []

    def charge(record: SQSRecord) -> str:
        runs.append(record.message_id)
        return "done"

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return process_batch_sync(
            event, charge, persistence_store=store, config=ORDER_KEY, context=context, concurrency=1
        )

    context = types.SimpleNamespace(get_remaining_time_in_millis=lambda: 30_000)
    assert json.loads(json.dumps(handler(batch(records), context))) == {"batchItemFailures": []}
    assert len(runs) == 1


async def test_sync_entry_point_refuses_a_running_loop() -> None:
    store = InMemoryPersistenceLayer()
    with pytest.raises(LambdaHandlerError):
        process_batch_sync(batch([sqs_record("x")]), lambda r: None, persistence_store=store)


async def test_lambda_context_bounds_each_claim() -> None:
    store = InMemoryPersistenceLayer()
    record = sqs_record({"n": 1})
    seen: list[DataRecord | None] = []
    engine = IdempotencyEngine(store, IdempotencyConfig(event_key_jmespath="messageId"))

    async def handle(r: SQSRecord) -> None:
        seen.append(await store.get(engine.idempotency_key(r.raw, handle)))

    before = int(time.time() * 1000)
    context = types.SimpleNamespace(get_remaining_time_in_millis=lambda: 7_000)
    await process_batch(batch([record]), handle, persistence_store=store, context=context)
    (claim,) = seen
    assert claim is not None
    assert claim.in_progress_expiry_timestamp is not None
    assert before + 7_000 <= claim.in_progress_expiry_timestamp <= int(time.time() * 1000) + 7_000


async def test_event_errors() -> None:
    store = InMemoryPersistenceLayer()
    assert await process_batch({"Records": []}, _noop, persistence_store=store) == {
        "batchItemFailures": []
    }
    mixed = batch([sqs_record("x"), kinesis_record("y", sequence_number="1", partition_key="k")])
    with pytest.raises(BatchEventError, match="one source"):
        await process_batch(mixed, _noop, persistence_store=store)
    with pytest.raises(BatchEventError, match="no 'Records'"):
        await process_batch({}, _noop, persistence_store=store)
    with pytest.raises(ValueError, match="concurrency"):
        await process_batch(batch([sqs_record("x")]), _noop, persistence_store=store, concurrency=0)
    with pytest.raises(ValueError, match="claim_ahead"):
        await process_batch(
            batch([sqs_record("x")]), _noop, persistence_store=store, claim_ahead=-1
        )


async def _noop(record: Any) -> None:
    return None


def _hanging_handler() -> tuple[asyncio.Event, Callable[[SQSRecord], Awaitable[None]]]:
    """A record handler that never returns, and the event it sets once it has started."""
    started = asyncio.Event()

    async def hang(record: SQSRecord) -> None:
        started.set()
        await asyncio.Event().wait()

    return started, hang


@pytest.mark.parametrize("concurrency", [10, 1])
async def test_cancelling_the_batch_releases_every_claim(concurrency: int) -> None:
    # concurrency 1: four of the five hold their claim waiting for the handler slot
    store = OutstandingStore(target=5)
    records = [sqs_record({"n": n}) for n in range(5)]
    started, hang = _hanging_handler()
    task = asyncio.ensure_future(
        process_batch(batch(records), hang, persistence_store=store, concurrency=concurrency)
    )
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(store.reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    engine = IdempotencyEngine(store, IdempotencyConfig(event_key_jmespath="messageId"))
    for raw in records:
        assert await store.get(engine.idempotency_key(raw, hang)) is None


class HeldSecondTrip(InMemoryPersistenceLayer):
    """Its second `claim_each` lands its claims, then holds the reply back until
    `reply` is set; `trips` are the sizes of the `claim_each` calls, `alone` the keys
    claimed one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.trips: list[int] = []
        self.alone: list[str] = []
        self.landed = asyncio.Event()
        self.reply = asyncio.Event()

    async def claim_each(
        self, records: Sequence[DataRecord], *, now: float
    ) -> list[ClaimResult | Exception]:
        self.trips.append(len(records))
        answers = [await super(HeldSecondTrip, self).claim(r, now=now) for r in records]
        if len(self.trips) == 2:
            self.landed.set()
            await self.reply.wait()
        return list(answers)

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self.alone.append(record.idempotency_key)
        return await super().claim(record, now=now)


async def test_the_second_claims_are_awaited_not_sent_again() -> None:
    # concurrency 2: the first two records run on the first trip's answer; the other
    # four wait for the second trip's, held back until both handlers have run.
    store = HeldSecondTrip()
    records = [sqs_record({"n": n}) for n in range(6)]
    runs: list[str] = []

    async def handle(record: SQSRecord) -> str:
        runs.append(record.message_id)
        if len(runs) == 2:
            await asyncio.wait_for(store.landed.wait(), 10)
            store.reply.set()
        return "ok"

    response = await process_batch(batch(records), handle, persistence_store=store, concurrency=2)
    assert response == {"batchItemFailures": []}
    assert (store.trips, store.alone) == ([2, 4], [])
    assert sorted(runs) == sorted(r["messageId"] for r in records)


async def test_cancelled_while_the_second_claims_travel_releases_them() -> None:
    store = HeldSecondTrip()
    engine = IdempotencyEngine(store, IdempotencyConfig(event_key_jmespath="messageId"))
    records = [sqs_record({"n": n}) for n in range(6)]
    started, hang = _hanging_handler()
    task = asyncio.ensure_future(
        process_batch(batch(records), hang, persistence_store=store, engine=engine, concurrency=2)
    )
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(store.landed.wait(), 10)  # landed; their answer is held back
    keys = [engine.idempotency_key(raw, hang) for raw in records]
    assert all([await store.get(key) is not None for key in keys])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)  # not held up by the reply still on its way
    assert await engine.drain(10)  # claims of unknown fate are released in the background
    assert [await store.get(key) for key in keys] == [None] * len(records)


@pytest.mark.parametrize("backend", ["valkey_glide", "dynamodb"])
def test_batch_on_real_stores(backend: str, request: pytest.FixtureRequest) -> None:
    real: PersistenceLayer = store_from_url(_url_of(backend, request))
    records = [sqs_record({"order_id": f"o-{n % 4}", "n": n}) for n in range(12)]
    runs: collections.Counter[str] = collections.Counter()

    def charge(record: SQSRecord) -> str:
        runs[record.json()["order_id"]] += 1
        return "ok"

    for _ in range(2):
        response = process_batch_sync(
            batch(records), charge, persistence_store=real, config=ORDER_KEY, concurrency=1
        )
        assert response == {"batchItemFailures": []}
    assert runs == {f"o-{n}": 1 for n in range(4)}


def _url_of(backend: str, request: pytest.FixtureRequest) -> str:
    if backend.startswith("valkey"):
        pool = request.getfixturevalue("cache_servers")
        node = pool.standalone("valkey")
        node.admin().flushall()
        return f"valkey://{node.host}:{node.port}?client=glide&timeout=5"
    server = request.getfixturevalue("moto_server")
    return f"dynamodb://{create_table(server)}?endpoint_url={server.endpoint_url}"


def test_unknown_source_needs_a_hint() -> None:
    with pytest.raises(BatchEventError, match="unknown event source"):
        parse_records({"Records": [{"eventSource": "aws:s3"}]})
    records = parse_records({"Records": [{"messageId": "m", "body": "{}"}]}, source="sqs")
    assert isinstance(records[0], SQSRecord)
    assert records[0].item_identifier == "m"
    assert uuid.UUID(sqs_record("x")["messageId"])


class FailingCompletionStore(OutstandingStore):
    """Its first `failures` completions fail as an unreachable store does."""

    def __init__(self, failures: int, target: int) -> None:
        super().__init__(target)
        self.failures = failures

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        if self.failures:
            self.failures -= 1
            raise IdempotencyPersistenceConnectionError("store unreachable (injected)")
        await super().complete(record, owner=owner)


async def test_a_store_failure_halts_the_records_claimed_before_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FailingCompletionStore(failures=1, target=5)
    records = [sqs_record({"n": n}) for n in range(5)]
    runs: list[str] = []

    async def handle(record: SQSRecord) -> str:
        runs.append(record.message_id)
        await asyncio.wait_for(store.reached.wait(), 10)  # every record holds its claim
        return "ok"

    response = await process_batch(batch(records), handle, persistence_store=store, concurrency=1)
    # The first ran and its result could not be stored; the four claimed while it ran
    # were not started, and are redelivered.
    assert runs == [records[0]["messageId"]]
    assert failed_ids(response) == [r["messageId"] for r in records]
    halted = [r for r in caplog.records if "was not started" in r.getMessage()]
    assert len(halted) == 4
    assert all(isinstance(r.exc_info[1], BatchHaltedError) for r in halted if r.exc_info)
    # Their claims were released: the redelivery runs each of them once.
    again = await process_batch(batch(records[1:]), handle, persistence_store=store, concurrency=1)
    assert again == {"batchItemFailures": []}
    assert runs == [r["messageId"] for r in records]


async def test_a_record_that_cannot_be_stored_does_not_halt_the_batch() -> None:
    store = InMemoryPersistenceLayer()
    records = [sqs_record({"n": n}) for n in range(4)]

    async def handle(record: SQSRecord) -> Any:
        if record.json()["n"] == 0:
            return object()  # not JSON-able: this record fails alone
        return "ok"

    response = await process_batch(batch(records), handle, persistence_store=store, concurrency=1)
    assert failed_ids(response) == [records[0]["messageId"]]


@pytest.mark.parametrize("watched", [False, True])
async def test_the_claims_of_a_batch_travel_together(
    watched: bool, request: pytest.FixtureRequest
) -> None:
    real = store_from_url(_url_of("valkey_glide", request))  # pipelining: the default
    assert isinstance(real, CachePersistenceLayer)
    events: list[Any] = []
    config = IdempotencyConfig(
        event_key_jmespath="messageId", on_event=events.append if watched else None
    )
    runs: collections.Counter[str] = collections.Counter()

    async def handle(record: SQSRecord) -> str:
        runs[record.message_id] += 1
        return "ok"

    try:
        # one record first: it opens the client of this loop
        first = await process_batch(
            batch([sqs_record({"n": -1})]), handle, persistence_store=real, config=config
        )
        assert first == {"batchItemFailures": []}
        client = real._clients.current() if real._clients is not None else None
        assert isinstance(client, GlideCacheClient)
        together: list[int] = []
        alone: list[str] = []
        each, single = client.set_nx_get_each, client.set_nx_get

        async def spy_each(claims: Any) -> Any:
            together.append(len(claims))
            return await each(claims)

        async def spy_single(name: str, value: str, *, ex: int) -> Any:
            alone.append(name)
            return await single(name, value, ex=ex)

        client.set_nx_get_each = spy_each  # type: ignore[method-assign]
        client.set_nx_get = spy_single  # type: ignore[method-assign]
        records = [sqs_record({"n": n}) for n in range(20)]
        for _ in range(2):  # a delivery, then a redelivery that replays every record
            response = await process_batch(
                batch(records), handle, persistence_store=real, config=config, concurrency=2
            )
            assert response == {"batchItemFailures": []}
        assert len(runs) == 21
        assert set(runs.values()) == {1}
        # the 20 claims of each delivery in two batches (those of the first two slots,
        # then the rest while they run), none alone
        assert (together, alone) == ([2, 18, 2, 18], [])
        if watched:  # each call reports the shared claim as its own round trip
            claimed = [e for e in events if e.kind is EventKind.CLAIMED]
            assert len(claimed) == 21
            assert all([t.operation for t in e.trips] == ["claim"] for e in claimed[1:])
            assert all(e.round_trips == 1 for e in claimed[1:])
    finally:
        await real.aclose()


class RenewalCountingStore(InMemoryPersistenceLayer):
    """Counts the renewals sent for each key (landed or refused); `renewed` is set once
    a key has had `target` of them."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.renewals: collections.Counter[str] = collections.Counter()
        self.renewed = asyncio.Event()
        self.refused = asyncio.Event()  # a renewal found the claim lost

    async def renew(self, record: DataRecord) -> None:
        self.renewals[record.idempotency_key] += 1
        if self.renewals[record.idempotency_key] >= self.target:
            self.renewed.set()
        try:
            await super().renew(record)
        except IdempotencyClaimLostError:
            self.refused.set()
            raise


LEASE = 0.3


async def test_a_claim_sent_ahead_is_renewed_while_its_record_waits() -> None:
    # concurrency 1: the second record holds its claim while the first runs, for
    # longer than the lease; its claim must not become free for another caller.
    store = RenewalCountingStore(target=4)  # 4 renewals: past the claim's first lease
    config = IdempotencyConfig(event_key_jmespath="messageId", in_progress_lease_seconds=LEASE)
    records = [sqs_record({"n": n}) for n in range(2)]
    engine = IdempotencyEngine(store, config, key_prefix="renewed")
    waiting = engine.idempotency_key(records[1])
    refused: list[bool] = []

    async def handle(record: SQSRecord) -> str:
        if record.message_id == records[0]["messageId"]:
            await asyncio.wait_for(store.renewed.wait(), 10)
            assert store.renewals[waiting] >= 4
            rival = await IdempotencyEngine(store, config, key_prefix="renewed").claim_each(
                [c for c in [engine.prepare_call(records[1], key_source=handle)] if c]
            )
            refused.append(not rival[0].outcome.claimed)  # type: ignore[union-attr]
        return "ok"

    response = await process_batch(
        batch(records), handle, persistence_store=store, engine=engine, concurrency=1
    )
    assert response == {"batchItemFailures": []}
    assert refused == [True]  # still held: renewed, not orphaned


async def test_a_claim_taken_over_while_its_record_waits_is_not_run() -> None:
    store = RenewalCountingStore(target=10**6)
    config = IdempotencyConfig(event_key_jmespath="messageId", in_progress_lease_seconds=LEASE)
    records = [sqs_record({"n": n}) for n in range(2)]
    engine = IdempotencyEngine(store, config, key_prefix="lost")
    rival = IdempotencyEngine(store, config, key_prefix="lost")
    waiting = engine.idempotency_key(records[1])
    runs: list[str] = []
    rivals: list[SentClaim] = []

    async def handle(record: SQSRecord) -> str:
        runs.append(record.message_id)
        if record.message_id == records[0]["messageId"]:
            # An operator deletes the waiting record's claim and another caller claims
            # the key; the next renewal finds the other owner.
            assert await store.delete(waiting)
            call = rival.prepare_call(records[1], key_source=handle)
            assert call is not None
            rivals.extend(await rival.claim_each([call]))
            assert rivals[0].outcome == ClaimResult(claimed=True)
            await asyncio.wait_for(store.refused.wait(), 10)
        return "ok"

    response = await process_batch(
        batch(records), handle, persistence_store=store, engine=engine, concurrency=1
    )
    # The second record's claim was lost before it started: it claimed again, found
    # the rival's claim, and was reported failed (redelivered) without running.
    assert runs == [records[0]["messageId"]]
    assert failed_ids(response) == [records[1]["messageId"]]
    held = await store.get(waiting)
    assert held is not None
    assert held.status is RecordStatus.INPROGRESS
    await rival.abandon(rivals)  # the rival never ran: its claim and lease end here
    assert await store.get(waiting) is None
