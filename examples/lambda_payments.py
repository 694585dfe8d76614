"""An async Lambda handler that charges a payment once per payment id.

Deploy with the handler string ``lambda_payments.handler`` (see docs/lambda.md for a
SAM template). The store is the DynamoDB table named by ``IDEMPOTENCY_TABLE``, or any
store URL in ``IDEMPOTENCY_STORE_URL`` (``valkey://host:6379?client=glide``, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any

from aioidempotency import IdempotencyConfig, idempotent_async, store_from_url
from aioidempotency.aws_lambda import lambda_handler

STORE_URL = os.environ.get("IDEMPOTENCY_STORE_URL") or (
    f"dynamodb://{os.environ.get('IDEMPOTENCY_TABLE', 'idempotency')}"
)
store = store_from_url(STORE_URL)  # built once per execution environment


async def charge(payment: dict[str, Any]) -> dict[str, Any]:
    """Call the payment provider (an async HTTP client in a real service)."""
    return {"payment_id": payment["payment_id"], "status": "captured"}


@lambda_handler
@idempotent_async(
    persistence_store=store,
    config=IdempotencyConfig(event_key_jmespath="powertools_json(body).payment_id"),
)
async def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    payment = json.loads(event["body"])
    receipt = await charge(payment)
    return {"statusCode": 200, "body": json.dumps(receipt)}
