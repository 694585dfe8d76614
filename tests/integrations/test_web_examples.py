"""The example payments services, each on a real server: a payment is made once per
key and client, and a refund once per payment (the engine inside a handler)."""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import sys
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import httpx
import pytest

from aioidempotency.exceptions import IdempotencyPersistenceConfigError
from aioidempotency.integrations._http import REPLAYED_HEADER
from aioidempotency.persistence import InMemoryPersistenceLayer
from tests.web_apps import run_aiohttp, run_uvicorn

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations here
    spec.loader.exec_module(module)
    return module


@contextlib.asynccontextmanager
async def example(name: str) -> AsyncIterator[str]:
    module = load(name)
    app: Any = module.create_app(InMemoryPersistenceLayer())
    server = run_uvicorn(app) if name.startswith("fastapi") else run_aiohttp(app)
    async with server as base_url:
        yield base_url


@pytest.mark.parametrize("name", ["fastapi_payments", "aiohttp_payments"])
async def test_example_service_pays_once_and_refunds_once(name: str) -> None:
    async with example(name) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        body = {"amount": 1250, "currency": "EUR"}
        shop_a = {"Idempotency-Key": '"order-1"', "X-Api-Key": "shop-a"}
        first = await client.post("/payments", json=body, headers=shop_a)
        again = await client.post("/payments", json=body, headers=shop_a)
        other_shop = await client.post(
            "/payments", json=body, headers={**shop_a, "X-Api-Key": "shop-b"}
        )
        changed = await client.post("/payments", json={**body, "amount": 1}, headers=shop_a)
        assert first.status_code == again.status_code == other_shop.status_code == 201
        assert again.json() == first.json()
        assert again.headers[REPLAYED_HEADER] == "true"
        assert other_shop.json()["id"] != first.json()["id"]
        assert changed.status_code == 422
        assert changed.headers["content-type"] == "application/problem+json"
        anonymous = await client.post(
            "/payments", json=body, headers={"Idempotency-Key": '"order-1"'}
        )
        assert anonymous.status_code == 400  # no API key: refused, never a shared scope
        assert anonymous.json()["type"].endswith(":scope-missing")

        payment_id = first.json()["id"]
        refunds = [await client.post(f"/payments/{payment_id}/refund") for _ in range(2)]
        assert [r.status_code for r in refunds] == [201, 201]
        assert refunds[0].json() == refunds[1].json()
        assert (await client.get(f"/payments/{payment_id}")).json()["refunded"] is True


def test_examples_default_to_the_in_memory_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOIDEMPOTENCY_STORE", raising=False)
    module = load("fastapi_payments")
    assert module.app.title == "payments"
    monkeypatch.setenv("AIOIDEMPOTENCY_STORE", "nosuch://x")
    with pytest.raises(IdempotencyPersistenceConfigError, match="unknown store URL scheme"):
        module.create_app()
