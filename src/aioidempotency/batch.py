"""Idempotent batch processing for SQS, Kinesis Data Streams and DynamoDB Streams.

`process_batch` runs a record handler once per record and idempotency key, and
returns the partial batch response Lambda's event source mappings understand
(``{"batchItemFailures": [{"itemIdentifier": ...}]}``; the function's event source
mapping needs ``FunctionResponseTypes: [ReportBatchItemFailures]``).

- SQS standard queues: records run concurrently (up to `concurrency`); each failed
  record is reported by its ``messageId`` and redelivered alone.
- SQS FIFO queues: the records of one message group run in order, groups
  concurrently; after a failure the rest of that group is reported failed without
  running, so the group is redelivered in order.
- Kinesis and DynamoDB Streams: records of one partition key (Kinesis) or one item
  (Streams keys) run in order, keys concurrently; after a failure the rest of that
  key is skipped, and the response names the lowest failed sequence number. Lambda
  checkpoints there and redelivers the shard from that record on: the records after
  it that had succeeded replay their stored result without running again.

A record whose key is in progress elsewhere is reported failed (it is redelivered
later); a record whose key already completed counts as a success without running.
Copies of one key in one batch (outside the ordered sources' groups) run one after
another: the first executes, the others replay its result.

At most `concurrency` handlers run at once (a handler's slot is held until its
result is stored); up to `claim_ahead` more records may already hold their claim while
they wait for a slot: their claims are sent together (`IdempotencyEngine.claim_each`;
one batch on a pipelining cache store) instead of one at a time, in two trips: those of
the first `concurrency` records, on whose answer the handlers start, then the others,
while the first handlers run. Once the store has failed in a batch, a record
that was claimed before that failure is not started (`BatchHaltedError`): its result
might not be storable, and running it could make its redelivery run it again.
The key is the record's delivery identity unless the config's `event_key_jmespath`
says otherwise (evaluated over the record, e.g. ``powertools_json(body).order_id``).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextvars
import dataclasses
import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal, TypeVar

from aioidempotency._async.engine import IdempotencyEngine, PreparedCall, SentClaim
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._config import IdempotencyConfig
from aioidempotency._handlers import lambda_context_of
from aioidempotency.exceptions import (
    IdempotencyInvalidRecordError,
    IdempotencyPersistenceLayerError,
    IdempotencyResultTooLargeError,
    IdempotencySerializationError,
)
from aioidempotency.serialization import BaseIdempotencySerializer

__all__ = [
    "BatchEventError",
    "BatchHaltedError",
    "DynamoDBStreamRecord",
    "KinesisRecord",
    "Record",
    "SQSRecord",
    "SourceKind",
    "default_key_jmespath",
    "parse_records",
    "process_batch",
    "process_batch_sync",
]

logger = logging.getLogger("aioidempotency.batch")

SourceKind = Literal["sqs", "kinesis", "dynamodb"]
_EVENT_SOURCES: dict[str, SourceKind] = {
    "aws:sqs": "sqs",
    "aws:kinesis": "kinesis",
    "aws:dynamodb": "dynamodb",
}
_DEFAULT_KEYS: dict[SourceKind, str] = {
    "sqs": "messageId",
    "kinesis": "[eventSourceARN, eventID]",
    "dynamodb": "[eventSourceARN, eventID]",
}
"""The delivery identity of a record: SQS's message id; a Kinesis record's eventID
is ``shardId-...:sequenceNumber``; a Streams record's eventID is unique. The source
ARN keeps two streams feeding one function apart."""

T = TypeVar("T")


class BatchEventError(ValueError):
    """The event is not a batch this module understands (unknown or mixed sources)."""


class BatchHaltedError(RuntimeError):
    """A record was not started: the store failed after its claim, while it waited for
    a handler. Its claim is released (or runs out) and the record is redelivered."""


def default_key_jmespath(source: SourceKind) -> str:
    """The JMESPath of a record's delivery identity, the default idempotency key."""
    return _DEFAULT_KEYS[source]


# -- typed records --------------------------------------------------------------------


class _RecordBase:
    """A read-only view over one record dict (`raw`, also `raw_event` as Powertools
    names it, so an idempotent function keyed on a record hashes the dict)."""

    __slots__ = ("raw",)

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    @property
    def raw_event(self) -> Mapping[str, Any]:
        return self.raw

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _RecordBase) and type(other) is type(self) and other.raw == self.raw
        )

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.raw)!r})"


class SQSRecord(_RecordBase):
    """One SQS message. `raw` is the record as Lambda delivered it."""

    __slots__ = ()

    @property
    def message_id(self) -> str:
        return str(self.raw["messageId"])

    @property
    def body(self) -> str:
        return str(self.raw.get("body", ""))

    @property
    def attributes(self) -> Mapping[str, Any]:
        return self.raw.get("attributes") or {}

    @property
    def message_attributes(self) -> Mapping[str, Any]:
        return self.raw.get("messageAttributes") or {}

    @property
    def message_group_id(self) -> str | None:
        """The FIFO message group (None on a standard queue)."""
        group = self.attributes.get("MessageGroupId")
        return None if group is None else str(group)

    @property
    def receive_count(self) -> int:
        return int(self.attributes.get("ApproximateReceiveCount", 1))

    @property
    def item_identifier(self) -> str:
        """What the partial batch response names for this record."""
        return self.message_id

    def json(self) -> Any:
        """The body decoded from JSON."""
        return json.loads(self.body)


class KinesisRecord(_RecordBase):
    """One Kinesis Data Streams record; `data` is the decoded payload."""

    __slots__ = ()

    @property
    def _kinesis(self) -> Mapping[str, Any]:
        return self.raw.get("kinesis") or {}

    @property
    def sequence_number(self) -> str:
        return str(self._kinesis["sequenceNumber"])

    @property
    def partition_key(self) -> str:
        return str(self._kinesis.get("partitionKey", ""))

    @property
    def shard_id(self) -> str:
        return str(self.raw.get("eventID", "")).partition(":")[0]

    @property
    def data(self) -> bytes:
        return base64.b64decode(self._kinesis.get("data", ""))

    @property
    def body(self) -> str:
        return self.data.decode()

    @property
    def item_identifier(self) -> str:
        return self.sequence_number

    def json(self) -> Any:
        """The data decoded from JSON."""
        return json.loads(self.data)


class DynamoDBStreamRecord(_RecordBase):
    """One DynamoDB Streams record; images are also offered as plain Python values."""

    __slots__ = ()

    @property
    def _dynamodb(self) -> Mapping[str, Any]:
        return self.raw.get("dynamodb") or {}

    @property
    def event_id(self) -> str:
        return str(self.raw["eventID"])

    @property
    def event_name(self) -> str:
        """``INSERT``, ``MODIFY`` or ``REMOVE``."""
        return str(self.raw.get("eventName", ""))

    @property
    def sequence_number(self) -> str:
        return str(self._dynamodb["SequenceNumber"])

    @property
    def keys(self) -> dict[str, Any]:
        return _plain_item(self._dynamodb.get("Keys") or {})

    @property
    def new_image(self) -> dict[str, Any] | None:
        image = self._dynamodb.get("NewImage")
        return None if image is None else _plain_item(image)

    @property
    def old_image(self) -> dict[str, Any] | None:
        image = self._dynamodb.get("OldImage")
        return None if image is None else _plain_item(image)

    @property
    def body(self) -> str:
        """The new image (or, for a removal, the old one) as JSON text."""
        image = self.new_image if self.new_image is not None else self.old_image
        return json.dumps(image, default=str, sort_keys=True)

    @property
    def item_identifier(self) -> str:
        return self.sequence_number

    def json(self) -> Any:
        """The new image (or the old one) as plain values."""
        return self.new_image if self.new_image is not None else self.old_image


Record = SQSRecord | KinesisRecord | DynamoDBStreamRecord


def _plain(value: Mapping[str, Any]) -> Any:
    """One DynamoDB attribute value as a Python value (numbers as Decimal)."""
    ((kind, inner),) = value.items()
    if kind == "S":
        return inner
    if kind == "N":
        return Decimal(inner)
    if kind == "B":
        return base64.b64decode(inner) if isinstance(inner, str) else inner
    if kind == "BOOL":
        return bool(inner)
    if kind == "NULL":
        return None
    if kind == "M":
        return _plain_item(inner)
    if kind == "L":
        return [_plain(item) for item in inner]
    if kind == "SS":
        return set(inner)
    if kind == "NS":
        return {Decimal(item) for item in inner}
    if kind == "BS":
        return {base64.b64decode(item) if isinstance(item, str) else item for item in inner}
    raise BatchEventError(f"unknown DynamoDB attribute type {kind!r}")


def _plain_item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _plain(value) for name, value in item.items()}


def detect_source(records: Sequence[Mapping[str, Any]]) -> SourceKind:
    """The source of a batch, from its records' ``eventSource``."""
    kinds = {
        str(record.get("eventSource") or record.get("EventSource") or "") for record in records
    }
    if len(kinds) != 1:
        raise BatchEventError(f"a batch holds records of one source, not {sorted(kinds)}")
    (name,) = kinds
    if name not in _EVENT_SOURCES:
        raise BatchEventError(
            f"unknown event source {name!r}; pass source='sqs', 'kinesis' or 'dynamodb'"
        )
    return _EVENT_SOURCES[name]


def parse_records(event: Mapping[str, Any], source: SourceKind | None = None) -> list[Record]:
    """The typed records of a Lambda batch event."""
    raw_records = event.get("Records")
    if raw_records is None:
        raise BatchEventError("the event has no 'Records'")
    if not raw_records:
        return []
    kind = source or detect_source(raw_records)
    if kind == "sqs":
        return [SQSRecord(raw) for raw in raw_records]
    if kind == "kinesis":
        return [KinesisRecord(raw) for raw in raw_records]
    return [DynamoDBStreamRecord(raw) for raw in raw_records]


# -- processing -----------------------------------------------------------------------

RecordHandler = Callable[[Any], Any]


@dataclasses.dataclass
class _Outcome:
    record: Record
    call: PreparedCall | None = None  # None: no key (runs unprotected) or `error`
    claim: SentClaim | None = None  # its first claim, sent ahead with others
    claiming: asyncio.Future[None] | None = None  # sets `claim` when answered
    ok: bool = False
    error: BaseException | None = None
    failures_at_claim: int = 0  # the batch's store failures when its claim was sent


def _store_failed(exc: Exception) -> bool:
    """True when `exc` says the store failed, not that one record cannot be stored."""
    return isinstance(exc, IdempotencyPersistenceLayerError) and not isinstance(
        exc,
        IdempotencyInvalidRecordError
        | IdempotencySerializationError
        | IdempotencyResultTooLargeError,
    )


def _order_key(record: Record, fifo: bool) -> str | None:
    """Records sharing this key run in order (None: no order to keep)."""
    if isinstance(record, SQSRecord):
        return record.message_group_id if fifo else None
    if isinstance(record, KinesisRecord):
        return record.partition_key
    return json.dumps(record.raw.get("dynamodb", {}).get("Keys"), sort_keys=True)


def _is_fifo(records: Sequence[Record]) -> bool:
    first = records[0]
    # Standard queues may carry a MessageGroupId too (fair queues): only a FIFO
    # queue's ARN ends in .fifo, and only FIFO messages carry a SequenceNumber.
    return isinstance(first, SQSRecord) and (
        str(first.raw.get("eventSourceARN", "")).endswith(".fifo")
        or "SequenceNumber" in first.attributes
    )


async def process_batch(
    event: Mapping[str, Any],
    record_handler: RecordHandler,
    *,
    persistence_store: PersistenceLayer,
    config: IdempotencyConfig | None = None,
    context: Any = None,
    concurrency: int = 10,
    source: SourceKind | None = None,
    key_prefix: str | None = None,
    output_serializer: BaseIdempotencySerializer | None = None,
    engine: IdempotencyEngine | None = None,
    claim_ahead: int = 100,
) -> dict[str, list[dict[str, str]]]:
    """Run ``record_handler(record)`` at most once per record key; report failures.

    ``record_handler`` is an ``async def`` or a plain ``def`` (run in a worker
    thread, at most `concurrency` at a time) taking one typed record (`SQSRecord`,
    `KinesisRecord` or `DynamoDBStreamRecord`; its `raw` is the record dict). Its
    return value is stored as the record's result, so it must be JSON-able.
    ``config`` keys and validates over the raw record; without an
    `event_key_jmespath` the key is the delivery identity (`default_key_jmespath`).
    ``context`` is the Lambda context: claims expire with the invocation's remaining
    time. The key prefix is the handler's module and qualified name unless
    ``key_prefix`` is given. ``engine`` replaces the engine built from the other
    arguments (to share its local cache across batches). ``claim_ahead`` records may
    hold their claim while waiting for one of the `concurrency` handler slots (0:
    a record claims its key only once a slot is free).

    Returns the partial batch response; failures are logged on
    ``aioidempotency.batch`` with their exception.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if claim_ahead < 0:
        raise ValueError("claim_ahead must be at least 0")
    records = parse_records(event, source)
    if not records:
        return {"batchItemFailures": []}
    kind: SourceKind = (
        "sqs"
        if isinstance(records[0], SQSRecord)
        else "kinesis"
        if isinstance(records[0], KinesisRecord)
        else "dynamodb"
    )
    if engine is None:
        config = config or IdempotencyConfig()
        if not config.event_key_jmespath:
            config = dataclasses.replace(config, event_key_jmespath=default_key_jmespath(kind))
        engine = IdempotencyEngine(
            persistence_store, config, key_prefix=key_prefix, output_serializer=output_serializer
        )
    lambda_context = lambda_context_of(context)
    fifo = _is_fifo(records)
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    if not inspect.iscoroutinefunction(record_handler):
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="aioidempotency-batch"
        )
    call = _caller(record_handler, executor)
    outcomes = [_Outcome(record) for record in records]
    for outcome in outcomes:
        try:
            outcome.call = engine.prepare_call(
                dict(outcome.record.raw), key_source=record_handler, lambda_context=lambda_context
            )
        except Exception as exc:  # no key where one is required, a JMESPath error
            _failed(outcome, exc)

    store_failures = 0  # store errors seen by the records of this batch so far

    async def handle(outcome: _Outcome) -> Any:
        if store_failures != outcome.failures_at_claim:
            raise BatchHaltedError(
                f"record {outcome.record.item_identifier} was not started: the store "
                "failed after its claim"
            )
        return await call(outcome.record)

    async def run_one(outcome: _Outcome) -> None:
        nonlocal store_failures
        if outcome.error is not None:
            return  # its key could not be derived: reported failed, never run
        try:
            if outcome.claiming is not None:  # its claim is on the way
                await asyncio.shield(outcome.claiming)
            if outcome.claim is None:  # it claims now, in its slot
                outcome.failures_at_claim = store_failures
            if outcome.call is None:
                await handle(outcome)
            elif outcome.claim is not None:  # its answer decides, as a replay's would
                run = functools.partial(handle, outcome)
                await engine.run_prepared(outcome.call, run, claim=outcome.claim)
            else:
                hit, _ = engine.replay_from_cache(outcome.call)
                if not hit:
                    await engine.run_prepared(outcome.call, functools.partial(handle, outcome))
        except Exception as exc:
            # A claim that failed among the claims sent together is not news to the
            # records claimed with it: the store answered them in the same round trip.
            failed_ahead = outcome.claim is not None and isinstance(
                outcome.claim.outcome, Exception
            )
            if _store_failed(exc) and not failed_ahead:
                store_failures += 1
            _failed(outcome, exc)
        else:
            outcome.ok = True

    async def run_in_order(group: list[_Outcome]) -> None:
        for outcome in group:
            await run_one(outcome)
            if not outcome.ok:
                return  # the rest of the group is reported failed without running

    async def run_each(copies: list[_Outcome]) -> None:
        for outcome in copies:  # the first executes; the others replay (or retry)
            await run_one(outcome)

    groups: dict[str | None, list[_Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(_order_key(outcome.record, fifo), []).append(outcome)
    jobs: list[Callable[[], Awaitable[None]]] = []
    copies: dict[str, list[_Outcome]] = {}  # unordered records, by key
    for order, group in groups.items():
        if order is not None:
            jobs.append(functools.partial(run_in_order, group))
            continue
        for outcome in group:
            if outcome.call is None:
                jobs.append(functools.partial(run_one, outcome))
            elif outcome.call.key in copies:
                copies[outcome.call.key].append(outcome)
            else:
                copies[outcome.call.key] = [outcome]
                jobs.append(functools.partial(run_each, copies[outcome.call.key]))
    # The first records that may hold a claim (`concurrency + claim_ahead`) claim
    # together where the store allows: the unordered ones whose key no other record of
    # the batch claims first. The first `concurrency` go in one round trip, on whose
    # answer their handlers start; the rest in a second, which travels while they run.
    # The others claim once a slot is free.
    ahead = [copies[0] for copies in copies.values() if copies[0].call is not None][
        : concurrency + claim_ahead if claim_ahead else 0
    ]
    chunks = (ahead[:concurrency], ahead[concurrency:]) if len(ahead) > 1 else ()
    claiming = [_claim_together(engine, chunk) for chunk in chunks if chunk]
    pending = iter(jobs)

    async def slot() -> None:
        """One of the `concurrency` handler slots: it takes the next job once its
        record's result is stored (or its failure known)."""
        for job in pending:
            await job()

    try:
        await _gather_all(slot() for _ in range(min(concurrency, len(jobs))))
    finally:
        for task in claiming:  # still on the way only if the batch was cancelled
            task.cancel()  # the engine releases the claims it sent
        await asyncio.gather(*claiming, return_exceptions=True)
        sent = [outcome.claim for outcome in ahead if outcome.claim is not None]
        await engine.abandon(sent)  # those whose record never started (a cancellation)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
    return _response(kind, outcomes)


def _claim_together(engine: IdempotencyEngine, outcomes: list[_Outcome]) -> asyncio.Task[None]:
    """Send the claims of `outcomes` in one store operation (`IdempotencyEngine.claim_each`),
    as a task: each outcome's `claiming` is done once its `claim` is set."""

    async def send() -> None:
        sent = await engine.claim_each([outcome.call for outcome in outcomes if outcome.call])
        for outcome, claim in zip(outcomes, sent, strict=True):
            outcome.claim = claim

    task = asyncio.ensure_future(send())
    for outcome in outcomes:
        outcome.claiming = task
    return task


def _failed(outcome: _Outcome, exc: Exception) -> None:
    outcome.error = exc
    logger.warning("record %s failed: %r", outcome.record.item_identifier, exc, exc_info=exc)


def _caller(
    record_handler: RecordHandler, executor: concurrent.futures.Executor | None
) -> Callable[[Record], Awaitable[Any]]:
    """An async call of the handler; a plain ``def`` runs in `executor`."""
    if executor is None:
        return record_handler

    async def in_thread(record: Record) -> Any:
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, context.run, record_handler, record)

    return in_thread


async def _gather_all(jobs: Iterable[Awaitable[None]]) -> None:
    """Await every job; a cancellation cancels them all and waits for them."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _response(kind: SourceKind, outcomes: Sequence[_Outcome]) -> dict[str, list[dict[str, str]]]:
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if not failed:
        return {"batchItemFailures": []}
    if kind == "sqs":
        return {"batchItemFailures": [{"itemIdentifier": o.record.item_identifier} for o in failed]}
    # Streams: Lambda resumes the shard at the lowest sequence number reported; a
    # batch comes from one shard in sequence order, so that is the first failure.
    return {"batchItemFailures": [{"itemIdentifier": failed[0].record.item_identifier}]}


def process_batch_sync(
    event: Mapping[str, Any],
    record_handler: RecordHandler,
    *,
    persistence_store: PersistenceLayer,
    config: IdempotencyConfig | None = None,
    context: Any = None,
    concurrency: int = 10,
    source: SourceKind | None = None,
    key_prefix: str | None = None,
    output_serializer: BaseIdempotencySerializer | None = None,
    engine: IdempotencyEngine | None = None,
    claim_ahead: int = 100,
) -> dict[str, list[dict[str, str]]]:
    """`process_batch` for a classic ``def handler(event, context)``.

    It runs on the loop `aioidempotency.aws_lambda.lambda_handler` uses (one per
    execution environment, so the store's clients survive warm invocations).
    """
    from aioidempotency.aws_lambda import handler_loop

    handler_loop.close_at_exit(persistence_store)
    return handler_loop.run(
        process_batch(
            event,
            record_handler,
            persistence_store=persistence_store,
            config=config,
            context=context,
            concurrency=concurrency,
            source=source,
            key_prefix=key_prefix,
            output_serializer=output_serializer,
            engine=engine,
            claim_ahead=claim_ahead,
        )
    )
