"""Lambda batch events as the event source mappings build them (SQS, Kinesis, Streams).

The shapes follow the AWS Lambda developer guide's sample events; only the fields
the library and the tests read are filled with meaningful values.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

REGION = "eu-west-1"
ACCOUNT = "123456789012"


def sqs_record(
    body: Any,
    *,
    message_id: str | None = None,
    queue: str = "orders",
    group: str | None = None,
    sequence: int | None = None,
    receive_count: int = 1,
    receipt_handle: str | None = None,
) -> dict[str, Any]:
    """One SQS record; a FIFO record when `group` is given (queue name gets .fifo)."""
    attributes: dict[str, Any] = {
        "ApproximateReceiveCount": str(receive_count),
        "SentTimestamp": "1767225600000",
        "SenderId": "AIDAEXAMPLE",
        "ApproximateFirstReceiveTimestamp": "1767225600001",
    }
    if group is not None:
        attributes["MessageGroupId"] = group
        attributes["MessageDeduplicationId"] = message_id or uuid.uuid4().hex
        attributes["SequenceNumber"] = str(sequence if sequence is not None else 1)
        if not queue.endswith(".fifo"):
            queue += ".fifo"
    text = body if isinstance(body, str) else json.dumps(body)
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": receipt_handle or uuid.uuid4().hex,
        "body": text,
        "attributes": attributes,
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue}",
        "awsRegion": REGION,
    }


def kinesis_record(
    data: Any,
    *,
    sequence_number: str,
    partition_key: str,
    stream: str = "orders",
    shard: str = "shardId-000000000000",
) -> dict[str, Any]:
    """One Kinesis Data Streams record (`data` JSON-encoded, then base64)."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": partition_key,
            "sequenceNumber": sequence_number,
            "data": base64.b64encode(raw).decode(),
            "approximateArrivalTimestamp": 1767225600.0,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"{shard}:{sequence_number}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": f"arn:aws:iam::{ACCOUNT}:role/lambda-role",
        "awsRegion": REGION,
        "eventSourceARN": f"arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream}",
    }


def dynamodb_record(
    keys: Mapping[str, Any],
    *,
    sequence_number: str,
    new_image: Mapping[str, Any] | None = None,
    old_image: Mapping[str, Any] | None = None,
    event_name: str = "INSERT",
    event_id: str | None = None,
    table: str = "orders",
) -> dict[str, Any]:
    """One DynamoDB Streams record; keys and images in DynamoDB's attribute format."""
    dynamodb: dict[str, Any] = {
        "Keys": dict(keys),
        "SequenceNumber": sequence_number,
        "SizeBytes": 26,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if new_image is not None:
        dynamodb["NewImage"] = dict(new_image)
    if old_image is not None:
        dynamodb["OldImage"] = dict(old_image)
    return {
        "eventID": event_id or uuid.uuid4().hex,
        "eventName": event_name,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": REGION,
        "dynamodb": dynamodb,
        "eventSourceARN": (
            f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{table}/stream/2026-01-01T00:00:00.000"
        ),
    }


def batch(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"Records": list(records)}


def failed_ids(response: Mapping[str, Any]) -> list[str]:
    return [item["itemIdentifier"] for item in response["batchItemFailures"]]
