"""The Starlette middleware at the edges of the ASGI protocol, driven with ASGI messages
directly (no server in between, so each edge happens exactly when the test says): a
client that leaves before its body, an application that returns without a response or
sends after it, a streamed response that announces trailers, a request cancelled while
the application runs."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
from starlette.types import Message

from aioidempotency import InMemoryPersistenceLayer
from aioidempotency.integrations._http import NOT_STORED_HEADER
from aioidempotency.integrations.starlette import IdempotencyMiddleware

BOUND = 15.0


def http_scope(key: str = "key-1") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/pay",
        "raw_path": b"/pay",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"idempotency-key", key.encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


class Client:
    """One request: hands out `messages` to ``receive`` (then waits forever, as a
    client that neither sends more nor leaves), and keeps what is sent back."""

    def __init__(self, *messages: Message) -> None:
        self._messages = list(messages)
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    def header(self, name: str) -> str | None:
        (start,) = [m for m in self.sent if m["type"] == "http.response.start"]
        for key, value in start["headers"]:
            if key.decode("latin-1").lower() == name.lower():
                return str(value.decode("latin-1"))
        return None


def request_body(body: bytes = b'{"amount": 5}') -> Message:
    return {"type": "http.request", "body": body, "more_body": False}


async def call(middleware: IdempotencyMiddleware, client: Client, key: str = "key-1") -> None:
    await asyncio.wait_for(middleware(http_scope(key), client.receive, client.send), BOUND)


async def test_a_client_that_leaves_before_its_body_claims_nothing() -> None:
    store = InMemoryPersistenceLayer()
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append("app")

    middleware = IdempotencyMiddleware(app, store=store)
    client = Client(
        {"type": "http.request", "body": b'{"amo', "more_body": True}, {"type": "http.disconnect"}
    )
    await call(middleware, client)
    assert client.sent == []
    assert calls == []
    assert len(store) == 0


async def test_an_app_that_returns_without_a_response_fails_and_frees_the_key() -> None:
    store = InMemoryPersistenceLayer()
    answers = [False, True]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        if answers.pop(0):
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b"paid"})

    middleware = IdempotencyMiddleware(app, store=store)
    first = Client(request_body())
    with pytest.raises(RuntimeError, match="returned without a complete response"):
        await call(middleware, first)
    assert first.sent == []

    retry = Client(request_body())
    await call(middleware, retry)
    assert [m.get("status") for m in retry.sent] == [201, None]
    assert retry.sent[1]["body"] == b"paid"
    assert answers == [], "the retry ran the app again: the failed call kept no claim"


async def test_a_message_after_the_response_ended_is_an_error_in_the_app() -> None:
    store = InMemoryPersistenceLayer()
    errors: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"once"})
        try:
            await send({"type": "http.response.body", "body": b"twice"})
        except RuntimeError as exc:
            errors.append(exc)
            raise

    middleware = IdempotencyMiddleware(app, store=store)
    client = Client(request_body())
    with pytest.raises(RuntimeError, match=r"'http\.response\.body' after the response ended"):
        await call(middleware, client)
    assert [m.get("body") for m in client.sent] == [None, b"once"], "the response was sent"
    assert len(errors) == 1


async def trailers_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
    await send({"type": "http.response.body", "body": b"part", "more_body": False})
    await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})


async def test_a_response_announcing_trailers_streams_unstored() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        await trailers_app(scope, receive, send)

    middleware = IdempotencyMiddleware(app, store=store)
    first = Client(request_body())
    await call(middleware, first)
    assert sorted(m["type"] for m in first.sent) == [
        "http.response.body",
        "http.response.start",
        "http.response.trailers",
    ]
    assert first.header(NOT_STORED_HEADER) == "streaming"

    again = Client(request_body())
    await call(middleware, again)
    assert runs == [1, 1], "a streamed response is not stored: the retry runs again"


async def test_trailers_follow_the_body() -> None:
    client = Client(request_body())
    await call(IdempotencyMiddleware(trailers_app, store=InMemoryPersistenceLayer()), client)
    assert [m["type"] for m in client.sent] == [
        "http.response.start",
        "http.response.body",
        "http.response.trailers",
    ]


async def test_a_request_cancelled_while_the_app_runs_cancels_the_app() -> None:
    store = InMemoryPersistenceLayer()
    started = asyncio.Event()
    outcome: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    middleware = IdempotencyMiddleware(app, store=store)
    client = Client(request_body())
    request = asyncio.ensure_future(middleware(http_scope(), client.receive, client.send))
    await asyncio.wait_for(started.wait(), BOUND)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(request, BOUND)
    assert outcome == ["cancelled"]
    assert client.sent == []
    assert len(store) == 0, "the interrupted call's claim is released"
