"""aiohttp: bodies at the edges. A chunked request without a chunk reaches the handler
as an empty body and its response is stored; a response whose body is a payload object
(written when the response is prepared) is streamed, not stored, and says so."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from aioidempotency import InMemoryPersistenceLayer
from aioidempotency.integrations._http import NOT_STORED_HEADER, REPLAYED_HEADER
from aioidempotency.integrations.aiohttp import setup_idempotency
from tests.web_apps import run_aiohttp


class Arrivals:
    """An aiohttp middleware ahead of the idempotency one: `headers` is set once a
    request's headers were read (its body may still be on its way)."""

    __middleware_version__ = 1

    def __init__(self) -> None:
        self.headers = asyncio.Event()

    async def __call__(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.headers.set()
        response: web.StreamResponse = await handler(request)
        return response


@pytest.fixture
def arrivals() -> Arrivals:
    return Arrivals()


@pytest.fixture
async def site(arrivals: Arrivals) -> AsyncIterator[tuple[str, list[str]]]:
    runs: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        runs.append(f"echo {body!r}")
        return web.json_response({"length": len(body)})

    async def receipt(request: web.Request) -> web.Response:
        runs.append("receipt")
        return web.Response(body=io.BytesIO(b"receipt 42"), content_type="text/plain")

    app = web.Application(middlewares=[arrivals])
    app.router.add_post("/echo", echo)
    app.router.add_post("/receipt", receipt)
    setup_idempotency(app, InMemoryPersistenceLayer())
    async with run_aiohttp(app) as url:
        yield url, runs


async def test_a_chunked_request_without_a_chunk_is_an_empty_body(
    site: tuple[str, list[str]], arrivals: Arrivals
) -> None:
    url, runs = site

    async def no_chunks() -> AsyncIterator[bytes]:
        # An upload that turns out empty once the server has the headers: the body
        # ends while the middleware reads it.
        await asyncio.wait_for(arrivals.headers.wait(), 10)
        arrivals.headers.clear()
        chunks: tuple[bytes, ...] = ()
        for chunk in chunks:
            yield chunk

    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        headers = {"Idempotency-Key": "empty-1"}
        first = await client.post("/echo", content=no_chunks(), headers=headers)
        assert first.request.headers["transfer-encoding"] == "chunked"
        again = await client.post("/echo", content=no_chunks(), headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"length": 0}
    assert again.headers[REPLAYED_HEADER] == "true"
    assert runs == ["echo b''"]


async def test_a_payload_body_is_streamed_and_not_stored(site: tuple[str, list[str]]) -> None:
    url, runs = site
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        headers = {"Idempotency-Key": "receipt-1"}
        first = await client.post("/receipt", json={}, headers=headers)
        again = await client.post("/receipt", json={}, headers=headers)
    assert first.text == again.text == "receipt 42"
    assert first.headers[NOT_STORED_HEADER] == "streaming"
    assert REPLAYED_HEADER not in again.headers
    assert runs == ["receipt", "receipt"], "not stored: the retry runs the handler again"
