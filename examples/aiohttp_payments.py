"""An aiohttp payments service whose POSTs are safe to retry.

Run it (in-memory store, port 8080)::

    python examples/aiohttp_payments.py

Use Redis/Valkey or DynamoDB instead::

    AIOIDEMPOTENCY_STORE=redis://localhost:6379/0 python examples/aiohttp_payments.py
    AIOIDEMPOTENCY_STORE=dynamodb://idempotency python examples/aiohttp_payments.py

Try it: the second call replays the first (same payment id, ``Idempotent-Replayed:
true``); the third, with another amount, is a 422::

    curl -i localhost:8080/payments -H 'Idempotency-Key: "order-1"' -H 'X-Api-Key: shop-a' \\
         -H 'Content-Type: application/json' -d '{"amount": 1250, "currency": "EUR"}'
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from aiohttp import web

from aioidempotency import IdempotencyConfig, IdempotencyEngine, store_from_url
from aioidempotency.integrations.aiohttp import setup_idempotency
from aioidempotency.persistence import PersistenceLayer


def api_client(request: web.Request) -> str | None:
    """Scope keys by API client, so one client can never replay another's response.

    A request with a key but no API key gets None: the middleware refuses it (400
    ``scope-missing``) rather than letting unidentified callers share keys. A real
    service would look the key up and return the client's id.
    """
    return request.headers.get("X-Api-Key")


def create_app(store: PersistenceLayer | None = None) -> web.Application:
    """The service; the store comes from ``AIOIDEMPOTENCY_STORE`` (default memory://)."""
    if store is None:  # an empty in-memory store is falsy: no `store or ...`
        store = store_from_url(os.environ.get("AIOIDEMPOTENCY_STORE", "memory://"))
    payments: dict[str, dict[str, Any]] = {}
    routes = web.RouteTableDef()

    @routes.post("/payments")
    async def create_payment(request: web.Request) -> web.Response:
        data = await request.json()
        if not isinstance(data.get("amount"), int) or not isinstance(data.get("currency"), str):
            raise web.HTTPUnprocessableEntity(text="amount (int) and currency (str) required")
        payment_id = f"pay_{uuid.uuid4().hex[:12]}"  # stands in for charging a card
        payments[payment_id] = {
            "id": payment_id,
            "amount": data["amount"],
            "currency": data["currency"],
            "refunded": False,
        }
        return web.json_response(payments[payment_id], status=201)

    @routes.get("/payments/{payment_id}")
    async def get_payment(request: web.Request) -> web.Response:
        payment = payments.get(request.match_info["payment_id"])
        if payment is None:
            raise web.HTTPNotFound(text="no such payment")
        return web.json_response(payment)

    # The engine inside a handler: a refund happens once per payment, whatever the
    # client sends, with or without an Idempotency-Key.
    refunds = IdempotencyEngine(
        store, IdempotencyConfig(event_key_jmespath="payment_id"), key_prefix="payments.refund"
    )

    @routes.post("/payments/{payment_id}/refund")
    async def refund(request: web.Request) -> web.Response:
        payment_id = request.match_info["payment_id"]
        if payment_id not in payments:
            raise web.HTTPNotFound(text="no such payment")

        async def do_refund() -> dict[str, Any]:
            payments[payment_id]["refunded"] = True
            return {"refund_id": f"re_{uuid.uuid4().hex[:12]}", "payment_id": payment_id}

        result = await refunds.run({"payment_id": payment_id}, do_refund)
        return web.json_response(result, status=201)

    app = web.Application()
    app.add_routes(routes)
    setup_idempotency(
        app,
        store,
        IdempotencyConfig(expires_after_seconds=24 * 3600, in_progress_lease_seconds=30),
        scope_by=api_client,
    )
    return app


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8080")))
