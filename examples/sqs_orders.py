"""An SQS consumer that fulfils each order once, however often it is delivered.

Deploy with the handler string ``sqs_orders.handler`` and an SQS event source mapping
with ``FunctionResponseTypes: [ReportBatchItemFailures]`` (see docs/batch.md). The
business key is the order id in the message body, so two messages for one order run
once; a record whose order is being fulfilled by another invocation is reported
failed and comes back after the visibility timeout.
"""

from __future__ import annotations

import os
from typing import Any

from aioidempotency import IdempotencyConfig, store_from_url
from aioidempotency.aws_lambda import lambda_handler
from aioidempotency.batch import SQSRecord, process_batch

STORE_URL = os.environ.get("IDEMPOTENCY_STORE_URL") or (
    f"dynamodb://{os.environ.get('IDEMPOTENCY_TABLE', 'idempotency')}"
)
store = store_from_url(STORE_URL)
config = IdempotencyConfig(
    event_key_jmespath="powertools_json(body).order_id",
    payload_validation_jmespath="powertools_json(body).items",
)


async def fulfil(record: SQSRecord) -> dict[str, Any]:
    """Reserve stock and book the shipment (async clients in a real service)."""
    order = record.json()
    return {"order_id": order["order_id"], "shipped": len(order["items"])}


@lambda_handler
async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return await process_batch(
        event, fulfil, persistence_store=store, config=config, context=context
    )
