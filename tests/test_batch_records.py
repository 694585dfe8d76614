"""The typed records of a batch: what each property of an SQS, Kinesis or DynamoDB
Streams record reads from the raw record, and DynamoDB attribute values as Python
values, through `process_batch` on the in-memory store."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import pytest

from aioidempotency import InMemoryPersistenceLayer, process_batch
from aioidempotency.batch import (
    BatchEventError,
    DynamoDBStreamRecord,
    KinesisRecord,
    SQSRecord,
    parse_records,
)

ARN = "arn:aws:dynamodb:eu-west-1:123456789012:table/orders/stream/2024-01-01T00:00:00.000"

EVERY_TYPE = {
    "id": {"S": "order-1"},
    "amount": {"N": "12.50"},
    "blob": {"B": base64.b64encode(b"\x00\x01").decode()},
    "raw_blob": {"B": b"\x02"},
    "paid": {"BOOL": True},
    "note": {"NULL": True},
    "address": {"M": {"city": {"S": "Lyon"}, "floor": {"N": "3"}}},
    "lines": {"L": [{"S": "a"}, {"N": "2"}]},
    "tags": {"SS": ["new", "gift"]},
    "sizes": {"NS": ["1", "2.5"]},
    "blobs": {"BS": [base64.b64encode(b"x").decode(), b"y"]},
}
EVERY_TYPE_PLAIN = {
    "id": "order-1",
    "amount": Decimal("12.50"),
    "blob": b"\x00\x01",
    "raw_blob": b"\x02",
    "paid": True,
    "note": None,
    "address": {"city": "Lyon", "floor": Decimal(3)},
    "lines": ["a", Decimal(2)],
    "tags": {"new", "gift"},
    "sizes": {Decimal(1), Decimal("2.5")},
    "blobs": {b"x", b"y"},
}


def stream_record(
    sequence: str, name: str, *, new: dict[str, Any] | None, old: dict[str, Any] | None = None
) -> dict[str, Any]:
    images: dict[str, Any] = {}
    if new is not None:
        images["NewImage"] = new
    if old is not None:
        images["OldImage"] = old
    return {
        "eventID": f"event-{sequence}",
        "eventName": name,
        "eventSource": "aws:dynamodb",
        "eventSourceARN": ARN,
        "dynamodb": {"Keys": {"id": {"S": "order-1"}}, "SequenceNumber": sequence, **images},
    }


def test_stream_images_become_plain_values() -> None:
    (record,) = parse_records({"Records": [stream_record("100", "INSERT", new=EVERY_TYPE)]})
    assert isinstance(record, DynamoDBStreamRecord)
    assert (record.event_id, record.event_name, record.sequence_number) == (
        "event-100",
        "INSERT",
        "100",
    )
    assert record.keys == {"id": "order-1"}
    assert record.new_image == EVERY_TYPE_PLAIN
    assert record.old_image is None
    assert record.json() == EVERY_TYPE_PLAIN
    assert record.item_identifier == "100"


def test_a_removal_reads_the_old_image() -> None:
    old = {"id": {"S": "order-1"}, "amount": {"N": "3"}}
    (record,) = parse_records({"Records": [stream_record("7", "REMOVE", new=None, old=old)]})
    assert isinstance(record, DynamoDBStreamRecord)
    assert record.new_image is None
    assert record.old_image == {"id": "order-1", "amount": Decimal(3)}
    assert record.json() == record.old_image
    assert json.loads(record.body) == {"amount": "3", "id": "order-1"}


def test_an_unknown_attribute_type_is_a_batch_event_error() -> None:
    (record,) = parse_records(
        {"Records": [stream_record("1", "INSERT", new={"x": {"VECTOR": [1]}})]}
    )
    assert isinstance(record, DynamoDBStreamRecord)
    with pytest.raises(BatchEventError, match="'VECTOR'"):
        _ = record.new_image


async def test_a_stream_batch_stores_what_the_handler_read_from_each_image() -> None:
    store = InMemoryPersistenceLayer()
    seen: list[tuple[str, Any]] = []

    async def handler(record: DynamoDBStreamRecord) -> dict[str, Any]:
        image = record.json()
        seen.append((record.event_name, image))
        return {"event": record.event_name, "body": json.loads(record.body)}

    event = {
        "Records": [
            stream_record("1", "INSERT", new={"id": {"S": "order-1"}, "n": {"N": "1"}}),
            stream_record("2", "REMOVE", new=None, old={"id": {"S": "order-1"}}),
        ]
    }
    assert await process_batch(event, handler, persistence_store=store) == {"batchItemFailures": []}
    assert seen == [("INSERT", {"id": "order-1", "n": Decimal(1)}), ("REMOVE", {"id": "order-1"})]
    assert await process_batch(event, handler, persistence_store=store) == {"batchItemFailures": []}
    assert len(seen) == 2, "the second delivery replays both records"
    assert len(store) == 2


def test_an_sqs_record_reads_its_attributes() -> None:
    raw = {
        "messageId": "m-1",
        "body": '{"order": 5}',
        "eventSource": "aws:sqs",
        "attributes": {"ApproximateReceiveCount": "3", "MessageGroupId": "customer-9"},
        "messageAttributes": {"tenant": {"stringValue": "acme", "dataType": "String"}},
    }
    (record,) = parse_records({"Records": [raw]})
    assert isinstance(record, SQSRecord)
    assert record.raw_event is raw
    assert record.receive_count == 3
    assert record.message_group_id == "customer-9"
    assert record.message_attributes == {"tenant": {"stringValue": "acme", "dataType": "String"}}
    assert record.json() == {"order": 5}
    assert repr(record) == f"SQSRecord({raw!r})"

    bare = SQSRecord({"messageId": "m-2"})
    assert (bare.body, bare.receive_count, bare.message_group_id) == ("", 1, None)
    assert bare.attributes == bare.message_attributes == {}


def test_records_are_equal_by_kind_and_content_and_hashed_by_identity() -> None:
    raw = {"messageId": "m-1", "body": "x"}
    first, same = SQSRecord(raw), SQSRecord(dict(raw))
    assert first == same
    assert first != SQSRecord({"messageId": "m-2"})
    assert first != KinesisRecord(raw), "another kind of record is never equal"
    assert first != raw
    assert len({first, same}) == 2, "hashed by identity: both stay in a set"


def test_a_kinesis_record_decodes_its_data() -> None:
    payload = {"order": 8}
    raw = {
        "eventID": "shardId-000000000001:4958",
        "eventSource": "aws:kinesis",
        "kinesis": {
            "sequenceNumber": "4958",
            "partitionKey": "customer-1",
            "data": base64.b64encode(json.dumps(payload).encode()).decode(),
        },
    }
    (record,) = parse_records({"Records": [raw]})
    assert isinstance(record, KinesisRecord)
    assert record.shard_id == "shardId-000000000001"
    assert record.partition_key == "customer-1"
    assert record.body == json.dumps(payload)
    assert record.json() == payload
    assert record.item_identifier == "4958"

    empty = KinesisRecord({"kinesis": {"sequenceNumber": "1"}})
    assert (empty.data, empty.body, empty.partition_key, empty.shard_id) == (b"", "", "", "")
