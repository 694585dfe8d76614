"""A Lambda handler module, deployed as ``tests.lambda_app.handler``.

The tests import it the way the Lambda runtime does (once per execution environment)
and call ``handler(event, context)`` synchronously. The store comes from the URL in
``LAMBDA_APP_STORE_URL`` and is built once, at import; ``STORE_BUILDS`` counts it.
The handler reads its own in-progress record while it runs and returns what it saw,
so a test can check the claim's expiry against the context's remaining time.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

from aioidempotency import IdempotencyConfig, idempotent_async, store_from_url
from aioidempotency.aws_lambda import lambda_handler
from tests.aws_helpers import FakeLambdaContext

STORE_URL = os.environ["LAMBDA_APP_STORE_URL"]
store = store_from_url(STORE_URL)
STORE_BUILDS = 1
EXECUTIONS: collections.Counter[str] = collections.Counter()
"""Executions per order id (this process)."""

config = IdempotencyConfig(event_key_jmespath="powertools_json(body).order_id")
__all__ = ["EXECUTIONS", "STORE_BUILDS", "FakeLambdaContext", "charge", "handler", "store"]


async def _charge(event: dict[str, Any], context: Any) -> dict[str, Any]:
    import json

    order_id = str(json.loads(event["body"])["order_id"])
    EXECUTIONS[order_id] += 1
    key = charge.engine.idempotency_key(event, _charge)
    record = await store.get(key)
    assert record is not None, "the handler runs under its own claim"
    return {
        "statusCode": 200,
        "order_id": order_id,
        "pid": os.getpid(),
        "claim_status": record.status.value,
        "claim_in_progress_expiration_ms": record.in_progress_expiry_timestamp,
        "ran_at_ms": int(time.time() * 1000),
    }


charge = idempotent_async(persistence_store=store, config=config)(_charge)
handler = lambda_handler(charge)
"""``@lambda_handler`` over ``@idempotent_async``: the handler string is
``tests.lambda_app.handler``."""
