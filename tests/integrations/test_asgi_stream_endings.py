"""How the Starlette middleware ends what an application leaves unfinished, driven with
ASGI messages directly (see tests/integrations/test_asgi_edges.py): a stream the app
returns from without its last message, an end of a stream sent twice, and a request
cancelled while the app works on after its response was sent."""

from __future__ import annotations

import asyncio
from typing import Any

from aioidempotency import InMemoryPersistenceLayer
from aioidempotency.integrations._http import NOT_STORED_HEADER
from aioidempotency.integrations.starlette import IdempotencyMiddleware
from tests.integrations.test_asgi_edges import BOUND, Client, call, http_scope, request_body


async def test_a_stream_the_app_leaves_unfinished_is_sent_as_far_as_it_went() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        # returns here: the server ends the response, not the app

    middleware = IdempotencyMiddleware(app, store=store)
    client = Client(request_body())
    await call(middleware, client)
    assert [(m["type"], m.get("body")) for m in client.sent] == [
        ("http.response.start", None),
        ("http.response.body", b"part"),
    ]
    assert client.header(NOT_STORED_HEADER) == "streaming"
    assert len(store) == 0, "a streamed response is not stored: its claim is released"

    retry = Client(request_body())
    await call(middleware, retry)
    assert runs == [1, 1]


async def test_a_streams_end_sent_twice_is_sent_once() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": False})
        await send({"type": "http.response.body", "body": b"c", "more_body": False})

    client = Client(request_body())
    await call(IdempotencyMiddleware(app, store=InMemoryPersistenceLayer()), client)
    assert [m.get("body") for m in client.sent] == [None, b"a", b"b"]


async def test_work_after_the_response_is_cancelled_with_the_request() -> None:
    store = InMemoryPersistenceLayer()
    working = asyncio.Event()
    outcome: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"paid"})
        working.set()  # a background task of the app's, after its response
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    middleware = IdempotencyMiddleware(app, store=store)
    client = Client(request_body())
    request = asyncio.ensure_future(middleware(http_scope(), client.receive, client.send))
    await asyncio.wait_for(working.wait(), BOUND)
    assert [m.get("body") for m in client.sent] == [None, b"paid"]
    request.cancel()
    done, _ = await asyncio.wait({request}, timeout=BOUND)
    assert done == {request}
    assert request.cancelled()
    assert outcome == ["cancelled"], "the app's work was cancelled, not left running"
    assert len(store) == 1, "the response was stored before the request was cancelled"
