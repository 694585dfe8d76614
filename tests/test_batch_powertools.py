"""The documented recipe: Powertools' batch processors with our idempotent decorators.

`docs/batch.md` shows both; these tests run them as written there (duplicates of a
business key run once, failures reported by Powertools' processor).
"""

from __future__ import annotations

import collections
import json
from typing import Any

import pytest

from aioidempotency import (
    IdempotencyConfig,
    InMemoryPersistenceLayer,
    idempotent_function,
    idempotent_function_async,
)
from aioidempotency.batch import SQSRecord
from tests.batch_events import batch, failed_ids, sqs_record

batch_utils = pytest.importorskip("aws_lambda_powertools.utilities.batch")


def test_batch_processor_with_idempotent_function() -> None:
    store = InMemoryPersistenceLayer()
    charged: collections.Counter[str] = collections.Counter()

    # -- the recipe (sync) --
    processor = batch_utils.BatchProcessor(event_type=batch_utils.EventType.SQS)

    @idempotent_function(
        data_keyword_argument="record",
        persistence_store=store,
        config=IdempotencyConfig(event_key_jmespath="powertools_json(body).order_id"),
    )
    def charge(record: Any) -> dict[str, Any]:
        order = json.loads(record["body"])
        charged[order["order_id"]] += 1
        if order.get("fail"):
            raise ValueError("card declined")
        return {"order_id": order["order_id"]}

    def record_handler(record: Any) -> dict[str, Any]:
        return charge(record=record.raw_event)

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return batch_utils.process_partial_response(  # type: ignore[no-any-return]
            event=event, record_handler=record_handler, processor=processor, context=context
        )

    # -- end of recipe --
    records = [sqs_record({"order_id": f"o-{n % 3}"}) for n in range(9)]
    failing = sqs_record({"order_id": "bad", "fail": True})
    response = handler(batch([*records, failing]), None)
    assert failed_ids(response) == [failing["messageId"]]
    assert charged == {"o-0": 1, "o-1": 1, "o-2": 1, "bad": 1}
    handler(batch(records), None)  # redelivered: replays only
    assert charged == {"o-0": 1, "o-1": 1, "o-2": 1, "bad": 1}


def test_async_batch_processor_with_idempotent_function_async() -> None:
    store = InMemoryPersistenceLayer()
    charged: collections.Counter[str] = collections.Counter()

    # -- the recipe (async) --
    processor = batch_utils.AsyncBatchProcessor(event_type=batch_utils.EventType.SQS)

    @idempotent_function_async(
        data_keyword_argument="record",
        persistence_store=store,
        config=IdempotencyConfig(event_key_jmespath="messageId"),
    )
    async def charge(record: dict[str, Any]) -> str:
        charged[record["messageId"]] += 1
        return str(SQSRecord(record).json()["order_id"])

    async def record_handler(record: Any) -> str:
        # pass the record itself: a loop variable captured in a lambda would bind late
        return await charge(record=record.raw_event)

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return batch_utils.async_process_partial_response(  # type: ignore[no-any-return]
            event=event, record_handler=record_handler, processor=processor, context=context
        )

    # -- end of recipe --
    records = [sqs_record({"order_id": n}) for n in range(10)]
    event = batch([*records, records[0], records[5]])  # the same message delivered twice
    # On the in-memory store a record's call never yields to the loop, so each copy
    # finds its twin completed and replays it (on a network store a copy that finds its
    # twin in progress is reported failed, and replays once SQS redelivers it).
    assert handler(event, None) == {"batchItemFailures": []}
    assert handler(batch(records), None) == {"batchItemFailures": []}
    assert charged == {r["messageId"]: 1 for r in records}
