"""End to end on moto's server: queues and streams polled as Lambda's event source
mappings poll them, a handler called through `lambda_handler`, executions counted on
the store's server.

For each source (standard SQS, FIFO SQS, a Kinesis stream, a DynamoDB table's
stream) and each store (in-memory, Valkey with glide, DynamoDB): send orders with
duplicates (one business key in several messages; the same message delivered again
after its visibility timeout, as after a lost delete), poll until empty (receive,
build the event, call the handler synchronously, delete the successes, make the
failures visible again; for streams, resume at the reported sequence number), with a
record handler that fails at random on a key's first attempt. Every business key
must have run exactly once.

Set ``AIOIDEMPOTENCY_E2E_REPORT=path`` to append one JSON line per run (source, store,
messages sent, business keys, handler runs and executions per key), to tabulate runs.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from aioidempotency import IdempotencyConfig, PersistenceLayer, store_from_url
from aioidempotency.aws_lambda import handler_loop, lambda_handler
from aioidempotency.batch import process_batch
from tests.aws_helpers import FakeLambdaContext, boto, create_table
from tests.servers.moto import MotoServer
from tests.servers.redis import ServerPool

REGION = "eu-west-1"
ORDERS = 12
COPIES = 3  # messages per business key
FAIL_FIRST = 0.4  # chance that a key's first attempt fails
MAX_POLLS = 200
SOURCES = ["sqs", "sqs_fifo", "kinesis", "dynamodb_streams"]
STORES = ["memory", "valkey_glide", "dynamodb"]

KEY_EXPRESSIONS = {
    "sqs": "powertools_json(body).order_id",
    "sqs_fifo": "powertools_json(body).order_id",
    "kinesis": "powertools_json(powertools_base64(kinesis.data)).order_id",
    "dynamodb_streams": "dynamodb.Keys.order_id.S",
}


# -- where executions are counted -------------------------------------------------------


class Counts:
    """Attempts and executions per business key, kept on the store's server."""

    def __init__(self, incr: Callable[[str], int], read: Callable[[str], int]) -> None:
        self._incr = incr
        self._read = read

    def attempt(self, key: str) -> int:
        return self._incr(f"attempts:{key}")

    def executed(self, key: str) -> None:
        self._incr(f"executions:{key}")

    def executions(self, key: str) -> int:
        return self._read(f"executions:{key}")


def memory_counts() -> Counts:
    lock = threading.Lock()
    counter: collections.Counter[str] = collections.Counter()

    def incr(name: str) -> int:
        with lock:
            counter[name] += 1
            return counter[name]

    return Counts(incr, lambda name: counter[name])


def valkey_counts(pool: ServerPool) -> Counts:
    admin = pool.standalone("valkey").admin()
    return Counts(lambda name: int(admin.incr(name)), lambda name: int(admin.get(name) or 0))


def dynamodb_counts(server: MotoServer) -> Counts:
    client = boto(server, "dynamodb")
    table = create_table(server)

    def incr(name: str) -> int:
        item = client.update_item(
            TableName=table,
            Key={"id": {"S": name}},
            UpdateExpression="ADD #n :one",
            ExpressionAttributeNames={"#n": "n"},
            ExpressionAttributeValues={":one": {"N": "1"}},
            ReturnValues="UPDATED_NEW",
        )
        return int(item["Attributes"]["n"]["N"])

    def read(name: str) -> int:
        item = client.get_item(TableName=table, Key={"id": {"S": name}}, ConsistentRead=True)
        return int(item.get("Item", {}).get("n", {}).get("N", 0))

    return Counts(incr, read)


@pytest.fixture
def store_and_counts(
    request: pytest.FixtureRequest, moto_server: MotoServer
) -> Iterator[tuple[PersistenceLayer, Counts]]:
    kind = request.param
    if kind == "memory":
        store, counts = store_from_url("memory://"), memory_counts()
    elif kind == "valkey_glide":
        pool: ServerPool = request.getfixturevalue("cache_servers")
        node = pool.standalone("valkey")
        node.admin().flushall()
        store = store_from_url(f"valkey://{node.host}:{node.port}?client=glide&timeout=5")
        counts = valkey_counts(pool)
    else:
        url = f"dynamodb://{create_table(moto_server)}?endpoint_url={moto_server.endpoint_url}"
        store, counts = store_from_url(url), dynamodb_counts(moto_server)
    yield store, counts
    handler_loop.run(store.aclose())


# -- the function under test ---------------------------------------------------------------


def make_handler(
    source: str, store: PersistenceLayer, counts: Counts, fail_first: set[str]
) -> tuple[Callable[[dict[str, Any], Any], dict[str, Any]], collections.Counter[str]]:
    """The deployed handler (sync, through lambda_handler) and its runs per key."""
    runs: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def fulfil(record: Any) -> str:
        order = record.json()
        order_id = str(order["order_id"])
        with lock:
            runs[order_id] += 1
        if counts.attempt(order_id) == 1 and order_id in fail_first:
            raise RuntimeError(f"payment service timed out for {order_id}")
        counts.executed(order_id)
        return order_id

    config = IdempotencyConfig(event_key_jmespath=KEY_EXPRESSIONS[source])

    @lambda_handler
    async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return await process_batch(
            event,
            fulfil,
            persistence_store=store,
            config=config,
            context=context,
            key_prefix=f"e2e-{source}",
        )

    return handler, runs


def orders(rng: random.Random) -> list[str]:
    """Business keys, each in COPIES messages, shuffled."""
    keys = [f"order-{uuid.uuid4().hex[:8]}" for _ in range(ORDERS)]
    sends = [key for key in keys for _ in range(COPIES)]
    rng.shuffle(sends)
    return sends


# -- pollers: what Lambda's event source mapping does --------------------------------------


def poll_sqs(
    server: MotoServer, handler: Callable[..., Any], sends: list[str], *, fifo: bool
) -> dict[str, int]:
    sqs = boto(server, "sqs")
    name = f"orders-{uuid.uuid4().hex[:8]}" + (".fifo" if fifo else "")
    attributes = {"FifoQueue": "true"} if fifo else {}
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    for n, key in enumerate(sends):
        extra: dict[str, Any] = {}
        if fifo:
            extra = {"MessageGroupId": f"group-{n % 3}", "MessageDeduplicationId": uuid.uuid4().hex}
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"order_id": key, "n": n}), **extra)
    redeliver_once = set(range(0, len(sends), 5))  # these lose their first delete
    lost_deletes: set[str] = set()
    stats = collections.Counter({"batches": 0, "records": 0, "failures": 0, "lost_deletes": 0})
    context = FakeLambdaContext(remaining_ms=30_000)
    for _ in range(MAX_POLLS):
        messages = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=30,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            left = sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
            assert left == {
                "ApproximateNumberOfMessages": "0",
                "ApproximateNumberOfMessagesNotVisible": "0",
            }
            break
        event = {"Records": [sqs_event_record(m, arn) for m in messages]}
        response = handler(json.loads(json.dumps(event)), context)
        json.dumps(response)
        stats["batches"] += 1
        stats["records"] += len(event["Records"])
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        stats["failures"] += len(failed)
        for message in messages:
            n = json.loads(message["Body"])["n"]
            if message["MessageId"] in failed or (
                n in redeliver_once and message["MessageId"] not in lost_deletes
            ):
                if message["MessageId"] not in failed:
                    lost_deletes.add(message["MessageId"])
                    stats["lost_deletes"] += 1
                # the visibility timeout runs out: the message is delivered again
                sqs.change_message_visibility(
                    QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                )
            else:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    else:
        pytest.fail("the queue did not drain")
    return dict(stats)


def sqs_event_record(message: dict[str, Any], arn: str) -> dict[str, Any]:
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": message.get("MessageAttributes", {}),
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": REGION,
    }


def poll_kinesis(
    server: MotoServer, handler: Callable[..., Any], sends: list[str]
) -> dict[str, int]:
    kinesis = boto(server, "kinesis")
    name = f"orders-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    description = kinesis.describe_stream(StreamName=name)["StreamDescription"]
    arn, shard = description["StreamARN"], description["Shards"][0]["ShardId"]
    for n, key in enumerate(sends):
        data = json.dumps({"order_id": key, "n": n}).encode()
        kinesis.put_record(StreamName=name, Data=data, PartitionKey=key)
    iterator = kinesis.get_shard_iterator(
        StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    stats = collections.Counter({"batches": 0, "records": 0, "failures": 0})
    context = FakeLambdaContext(remaining_ms=30_000)
    for _ in range(MAX_POLLS):
        page = kinesis.get_records(ShardIterator=iterator, Limit=10)
        if not page["Records"]:
            break
        event = {
            "Records": [
                {
                    "kinesis": {
                        "kinesisSchemaVersion": "1.0",
                        "partitionKey": r["PartitionKey"],
                        "sequenceNumber": r["SequenceNumber"],
                        "data": base64.b64encode(r["Data"]).decode(),
                        "approximateArrivalTimestamp": (
                            r["ApproximateArrivalTimestamp"].timestamp()
                        ),
                    },
                    "eventSource": "aws:kinesis",
                    "eventVersion": "1.0",
                    "eventID": f"{shard}:{r['SequenceNumber']}",
                    "eventName": "aws:kinesis:record",
                    "awsRegion": REGION,
                    "eventSourceARN": arn,
                }
                for r in page["Records"]
            ]
        }
        response = handler(event, context)
        stats["batches"] += 1
        stats["records"] += len(event["Records"])
        failures = response["batchItemFailures"]
        stats["failures"] += len(failures)
        if failures:  # checkpoint: resume at the reported record
            iterator = kinesis.get_shard_iterator(
                StreamName=name,
                ShardId=shard,
                ShardIteratorType="AT_SEQUENCE_NUMBER",
                StartingSequenceNumber=failures[0]["itemIdentifier"],
            )["ShardIterator"]
        else:
            iterator = page["NextShardIterator"]
    else:
        pytest.fail("the stream was not consumed")
    return dict(stats)


def poll_dynamodb_stream(
    server: MotoServer, handler: Callable[..., Any], sends: list[str]
) -> dict[str, int]:
    dynamodb, streams = boto(server, "dynamodb"), boto(server, "dynamodbstreams")
    table = f"orders-{uuid.uuid4().hex[:8]}"
    description = dynamodb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "order_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "order_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )["TableDescription"]
    stream_arn = description["LatestStreamArn"]
    for n, key in enumerate(sends):  # a key's copies: one INSERT, then MODIFYs
        dynamodb.put_item(TableName=table, Item={"order_id": {"S": key}, "n": {"N": str(n)}})
    shard = streams.describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"][0][
        "ShardId"
    ]
    iterator = streams.get_shard_iterator(
        StreamArn=stream_arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    stats = collections.Counter({"batches": 0, "records": 0, "failures": 0})
    context = FakeLambdaContext(remaining_ms=30_000)
    for _ in range(MAX_POLLS):
        page = streams.get_records(ShardIterator=iterator, Limit=10)
        if not page["Records"]:
            break
        event = {"Records": [{**r, "eventSourceARN": stream_arn} for r in page["Records"]]}
        response = handler(json.loads(json.dumps(event, default=str)), context)
        stats["batches"] += 1
        stats["records"] += len(event["Records"])
        failures = response["batchItemFailures"]
        stats["failures"] += len(failures)
        if failures:
            iterator = streams.get_shard_iterator(
                StreamArn=stream_arn,
                ShardId=shard,
                ShardIteratorType="AT_SEQUENCE_NUMBER",
                SequenceNumber=failures[0]["itemIdentifier"],
            )["ShardIterator"]
        else:
            iterator = page["NextShardIterator"]
    else:
        pytest.fail("the stream was not consumed")
    return dict(stats)


# -- the test ----------------------------------------------------------------------------


@pytest.mark.parametrize("store_and_counts", STORES, indirect=True)
@pytest.mark.parametrize("source", SOURCES)
def test_every_business_key_runs_exactly_once(
    source: str,
    store_and_counts: tuple[PersistenceLayer, Counts],
    moto_server: MotoServer,
    request: pytest.FixtureRequest,
) -> None:
    store, counts = store_and_counts
    rng = random.Random(f"{source}-{request.node.callspec.id}")
    sends = orders(rng)
    keys = sorted(set(sends))
    fail_first = {key for key in keys if rng.random() < FAIL_FIRST}
    handler, runs = make_handler(source, store, counts, fail_first)
    if source == "kinesis":
        stats = poll_kinesis(moto_server, handler, sends)
    elif source == "dynamodb_streams":
        stats = poll_dynamodb_stream(moto_server, handler, sends)
    else:
        stats = poll_sqs(moto_server, handler, sends, fifo=source == "sqs_fifo")
    executions = {key: counts.executions(key) for key in keys}
    assert executions == dict.fromkeys(keys, 1)
    assert all(runs[key] >= 1 for key in keys)
    assert stats["records"] >= len(sends)
    if fail_first:
        assert stats["failures"] >= 1
    report = os.environ.get("AIOIDEMPOTENCY_E2E_REPORT")
    if report:
        line = {
            "source": source,
            "store": request.node.callspec.params["store_and_counts"],
            "messages_sent": len(sends),
            "business_keys": len(keys),
            "handler_runs": sum(runs.values()),
            "executions_per_key": sorted(set(executions.values())),
            "keys_failing_first": len(fail_first),
            **stats,
        }
        with open(report, "a") as out:
            out.write(json.dumps(line) + "\n")
