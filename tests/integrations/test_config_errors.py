"""The middleware on real servers (FastAPI under uvicorn, aiohttp under its runner)
in front of real stores that cannot serve: a store refusing the credentials or missing
its table is a 500 ``store-misconfigured`` without ``Retry-After`` (no retry will clear
it), an unreachable store a 503 with ``Retry-After``. The handler never runs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from aiohttp import web
from fastapi import FastAPI

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._async.store import PersistenceLayer
from aioidempotency.integrations import aiohttp as aiohttp_integration
from aioidempotency.integrations.starlette import IdempotencyMiddleware
from tests.servers.moto import MotoServer
from tests.servers.redis import Server, ServerPool
from tests.web_apps import FRAMEWORKS, run_aiohttp, run_uvicorn

BOUND = 30.0


class Calls:
    """How often the handler ran."""

    count = 0


@contextlib.asynccontextmanager
async def serve(framework: str, store: PersistenceLayer, calls: Calls) -> AsyncIterator[str]:
    """A one-route app (POST /pay) behind the middleware on `store`; yields its URL."""
    server: contextlib.AbstractAsyncContextManager[str]
    if framework == "fastapi":
        app = FastAPI()

        @app.post("/pay", status_code=201)
        async def pay() -> dict[str, int]:
            calls.count += 1
            return {"paid": calls.count}

        app.add_middleware(IdempotencyMiddleware, store=store, retry_after_seconds=3)
        server = run_uvicorn(app)
    else:

        async def handler(request: web.Request) -> web.Response:
            calls.count += 1
            return web.json_response({"paid": calls.count}, status=201)

        aiohttp_app = web.Application()
        aiohttp_integration.setup_idempotency(aiohttp_app, store, retry_after_seconds=3)
        aiohttp_app.router.add_post("/pay", handler)
        server = run_aiohttp(aiohttp_app)
    async with server as base_url:
        yield base_url


async def pay(base_url: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=BOUND) as http:
        return await http.post(
            "/pay", content=b'{"amount": 5}', headers={"Idempotency-Key": str(uuid.uuid4())}
        )


@contextlib.contextmanager
def user_with_password(node: Server) -> Iterator[str]:
    user = f"web{uuid.uuid4().hex[:8]}"
    with node.admin() as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", ">right", "~*", "+@all")
    try:
        yield user
    finally:
        with node.admin() as admin:
            admin.execute_command("ACL", "DELUSER", user)


def assert_misconfigured(response: httpx.Response) -> None:
    assert response.status_code == 500, response.text
    problem = response.json()
    assert problem["type"].endswith(":store-misconfigured")
    assert problem["title"] == "Idempotency store misconfigured"
    assert "Retrying will not help" in problem["detail"]
    assert "retry-after" not in response.headers
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("client", ["redis", "glide"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_wrong_password_is_a_500_misconfigured_not_a_503(
    cache_servers: ServerPool, framework: str, client: str
) -> None:
    node = cache_servers.standalone("valkey")
    calls = Calls()
    with user_with_password(node) as user:
        url = f"redis://{user}:wrong@{node.host}:{node.port}?client={client}&timeout=5"
        async with (
            CachePersistenceLayer.from_url(url) as store,
            serve(framework, store, calls) as base_url,
        ):
            response = await asyncio.wait_for(pay(base_url), BOUND)
    assert_misconfigured(response)
    assert calls.count == 0


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_missing_table_is_a_500_misconfigured(
    moto_server: MotoServer, framework: str
) -> None:
    calls = Calls()
    table = f"missing-{uuid.uuid4().hex[:8]}"
    async with (
        DynamoDBPersistenceLayer(table, endpoint_url=moto_server.endpoint_url) as store,
        serve(framework, store, calls) as base_url,
    ):
        response = await asyncio.wait_for(pay(base_url), BOUND)
    assert_misconfigured(response)
    assert calls.count == 0


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_an_unreachable_store_is_a_503_with_retry_after(framework: str) -> None:
    calls = Calls()
    url = f"redis://127.0.0.1:{dead_port()}?timeout=1"
    async with (
        CachePersistenceLayer.from_url(url, retry_attempts=1) as store,
        serve(framework, store, calls) as base_url,
    ):
        response = await asyncio.wait_for(pay(base_url), BOUND)
    assert response.status_code == 503, response.text
    assert response.json()["type"].endswith(":store-unavailable")
    assert response.headers["retry-after"] == "3"
    assert calls.count == 0
