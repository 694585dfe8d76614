"""A FastAPI payments service whose POSTs are safe to retry.

Run it (in-memory store, port 8000)::

    python examples/fastapi_payments.py

Use Redis/Valkey or DynamoDB instead::

    AIOIDEMPOTENCY_STORE=redis://localhost:6379/0 python examples/fastapi_payments.py
    AIOIDEMPOTENCY_STORE=dynamodb://idempotency python examples/fastapi_payments.py

Try it: the second call replays the first (same payment id, ``Idempotent-Replayed:
true``); the third, with another amount, is a 422::

    curl -i localhost:8000/payments -H 'Idempotency-Key: "order-1"' -H 'X-Api-Key: shop-a' \\
         -H 'Content-Type: application/json' -d '{"amount": 1250, "currency": "EUR"}'
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from aioidempotency import IdempotencyConfig, IdempotencyEngine, store_from_url
from aioidempotency.integrations.starlette import IdempotencyMiddleware
from aioidempotency.persistence import PersistenceLayer


class PaymentIn(BaseModel):
    amount: int
    currency: str


def api_client(conn: HTTPConnection) -> str | None:
    """Scope keys by API client, so one client can never replay another's response.

    A request with a key but no API key gets None: the middleware refuses it (400
    ``scope-missing``) rather than letting unidentified callers share keys. A real
    service would look the key up and return the client's id.
    """
    return conn.headers.get("x-api-key")


def create_app(store: PersistenceLayer | None = None) -> FastAPI:
    """The service; the store comes from ``AIOIDEMPOTENCY_STORE`` (default memory://)."""
    if store is None:  # an empty in-memory store is falsy: no `store or ...`
        store = store_from_url(os.environ.get("AIOIDEMPOTENCY_STORE", "memory://"))
    payments: dict[str, dict[str, Any]] = {}
    app = FastAPI(title="payments")

    @app.post("/payments", status_code=201)
    async def create_payment(payment: PaymentIn) -> dict[str, Any]:
        payment_id = f"pay_{uuid.uuid4().hex[:12]}"  # stands in for charging a card
        payments[payment_id] = {"id": payment_id, **payment.model_dump(), "refunded": False}
        return payments[payment_id]

    @app.get("/payments/{payment_id}")
    async def get_payment(payment_id: str) -> dict[str, Any]:
        if payment_id not in payments:
            raise HTTPException(404, "no such payment")
        return payments[payment_id]

    # The engine inside a handler: a refund happens once per payment, whatever the
    # client sends, with or without an Idempotency-Key.
    refunds = IdempotencyEngine(
        store, IdempotencyConfig(event_key_jmespath="payment_id"), key_prefix="payments.refund"
    )

    @app.post("/payments/{payment_id}/refund", status_code=201)
    async def refund(payment_id: str) -> dict[str, Any]:
        if payment_id not in payments:
            raise HTTPException(404, "no such payment")

        async def do_refund() -> dict[str, Any]:
            payments[payment_id]["refunded"] = True
            return {"refund_id": f"re_{uuid.uuid4().hex[:12]}", "payment_id": payment_id}

        return await refunds.run({"payment_id": payment_id}, do_refund)

    app.add_middleware(
        IdempotencyMiddleware,
        store=store,
        config=IdempotencyConfig(expires_after_seconds=24 * 3600, in_progress_lease_seconds=30),
        scope_by=api_client,
    )
    return app


app = create_app()

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
