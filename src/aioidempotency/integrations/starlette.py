"""`IdempotencyMiddleware`: the ``Idempotency-Key`` header for Starlette and FastAPI.

A pure ASGI middleware (no ``BaseHTTPMiddleware``)::

    app.add_middleware(IdempotencyMiddleware, store=InMemoryPersistenceLayer())

Requests it does not handle (other methods, no key) reach the application with the
original ``receive`` and ``send``, untouched. Handled ones get their buffered body
replayed once, then the original ``receive``; so streaming responses, which listen
for the client's disconnect, keep working.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import http_sf  # noqa: F401  (the web extra: it parses the key header; fail at import)
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import Unpack

from aioidempotency._async.store import PersistenceLayer
from aioidempotency._config import IdempotencyConfig
from aioidempotency.integrations._http import (
    DEFAULT_KEY_PREFIX,
    NOT_STORED_HEADER,
    HttpIdempotency,
    HttpIdempotencyOptions,
    HttpOptionFields,
    HttpRequest,
    PassThrough,
    Reply,
)

__all__ = ["IdempotencyMiddleware", "ScopeFunction"]

ScopeFunction = Callable[[HTTPConnection], "Awaitable[str | None] | str | None"]
"""Returns the caller's scope (tenant, API client) from the request's headers, URL or
state, or None when the caller cannot be identified (the request is then refused);
the request body is not available to it."""


class IdempotencyMiddleware:
    """Makes POST/PATCH requests with an ``Idempotency-Key`` header safe to retry.

    `store` and `config` are those of the engine (`config` gives expiry, lease and
    the opt-in wait); `scope_by` returns the caller's scope of the key (a request
    for which it returns None is refused with a 400); without it, keys are scoped
    by a hash of the request's credentials (`HttpIdempotencyOptions.scope_headers`).
    `options`, or its fields as keyword arguments, set the rules (see
    `HttpIdempotencyOptions`).
    """

    def __init__(
        self,
        app: ASGIApp,
        store: PersistenceLayer,
        config: IdempotencyConfig | None = None,
        *,
        scope_by: ScopeFunction | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        options: HttpIdempotencyOptions | None = None,
        **option_fields: Unpack[HttpOptionFields],
    ) -> None:
        self.app = app
        opts = options or HttpIdempotencyOptions()
        if option_fields:
            opts = dataclasses.replace(opts, **option_fields)
        self.core = HttpIdempotency(store, config, options=opts, key_prefix=key_prefix)
        self.scope_by = scope_by
        self._header = opts.header_name.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.core.handles(scope["method"]):
            await self.app(scope, receive, send)
            return
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        values = [v.decode("latin-1") for n, v in raw_headers if n.lower() == self._header]
        key = self.core.parse_key(values)
        if key is None:
            await self.app(scope, receive, send)
            return
        if isinstance(key, Reply):
            await _send_reply(send, key)
            return
        caller: str | None = None
        if self.scope_by is not None:
            caller = await self._caller_scope(scope)
            if caller is None:  # never one scope shared by every unidentified caller
                await _send_reply(send, self.core.scope_missing())
                return
        limit = self.core.options.max_request_bytes
        try:
            if _declared_length(raw_headers) > limit:
                raise _BodyTooLarge  # refused before reading any of it
            body = await _read_body(receive, limit)
        except _BodyTooLarge:
            await _send_reply(send, self.core.request_too_large())
            return
        if body is None:
            return  # the client left before sending its body: nothing was claimed
        request = HttpRequest(
            method=scope["method"],
            path=scope["path"],
            key=key,
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw_headers],
            body=body,
            scope=caller,  # None: the core scopes by the request's credentials
        )
        run = _AppRun(self.app, scope, _replaying(body, receive), send)
        try:
            outcome = await self.core.run(request, run.until_response)
            if isinstance(outcome.response, Reply):
                await _send_reply(send, outcome.response)
            elif outcome.response.response is not None:
                await send(outcome.response.response)  # a stream's end, after the release
        finally:
            await run.finish()

    async def _caller_scope(self, scope: Scope) -> str | None:
        assert self.scope_by is not None
        value = self.scope_by(HTTPConnection(scope))
        if inspect.isawaitable(value):
            value = await value
        return value


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out `body` once, then defers to the original: the app
    reads the body the middleware read."""
    body_sent = False

    async def replay_receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # disconnects and anything else: the real thing

    return replay_receive


class _AppRun:
    """Runs the app in its own task so that the response can be stored and sent as
    soon as it is complete, while work the app does afterwards (Starlette background
    tasks) goes on; `finish` waits for that work and re-raises its errors."""

    def __init__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        self._capture = _ResponseCapture(send)
        self._app, self._scope, self._receive = app, scope, receive
        self._task: asyncio.Future[None] | None = None
        self._awaited = False

    async def until_response(self) -> Reply | PassThrough:
        task = self._task = asyncio.ensure_future(
            self._app(self._scope, self._receive, self._capture)
        )
        decided = self._capture.decided
        either: set[asyncio.Future[Any]] = {task, decided}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait({task})
            raise
        if decided.done():
            return decided.result()
        self._awaited = True
        task.result()  # the app's own exception, if it raised one
        return self._capture.result()

    async def finish(self) -> None:
        task = self._task
        if task is None or self._awaited:
            return
        self._awaited = True
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            raise


class _ResponseCapture:
    """A ``send`` that buffers a response given in one body message and streams the
    others straight through (marked as not stored). `decided` resolves with the
    complete `Reply`, or with a `PassThrough` holding a stream's last message."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self._reply: Reply | None = None
        self._streaming = False
        self._trailers = False  # the response ends with its last trailers message
        self.decided: asyncio.Future[Reply | PassThrough] = (
            asyncio.get_running_loop().create_future()
        )

    async def __call__(self, message: Message) -> None:
        if self._streaming:
            if not self._ends_response(message):
                await self._send(message)
            elif not self.decided.done():
                self.decided.set_result(PassThrough("streaming", message))  # sent after release
            return
        if self._reply is not None:
            raise RuntimeError(f"ASGI message {message['type']!r} after the response ended")
        kind = message["type"]
        if kind == "http.response.start" and message.get("trailers"):
            self._trailers = True  # streamed, never stored: its end is its last trailers
        if kind == "http.response.start" and self._start is None and not self._trailers:
            self._start = message
            return
        if _is_last(message) and self._start is not None:
            self._reply = Reply(
                status=int(self._start["status"]),
                headers=tuple(
                    (n.decode("latin-1"), v.decode("latin-1"))
                    for n, v in self._start.get("headers", [])
                ),
                body=bytes(message.get("body", b"")),
            )
            self.decided.set_result(self._reply)
            return
        self._streaming = True
        if self._start is not None:
            headers = [*self._start.get("headers", []), _encode(NOT_STORED_HEADER, "streaming")]
            await self._send({**self._start, "headers": headers})
        elif kind == "http.response.start":
            headers = [*message.get("headers", []), _encode(NOT_STORED_HEADER, "streaming")]
            message = {**message, "headers": headers}
        await self(message)

    def _ends_response(self, message: Message) -> bool:
        """The message that ends the response: held back until the claim is settled."""
        if self._trailers:
            return message["type"] == "http.response.trailers" and not message.get(
                "more_trailers", False
            )
        return _is_last(message)

    def result(self) -> Reply | PassThrough:
        """What the app produced, once it has returned without a decided response."""
        if self._streaming:
            return PassThrough("streaming")
        raise RuntimeError("the application returned without a complete response")


class _BodyTooLarge(Exception):
    pass


def _declared_length(raw_headers: list[tuple[bytes, bytes]]) -> int:
    """The request's ``Content-Length`` (0 when absent; the server checked its form)."""
    for name, value in raw_headers:
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 0


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None on a disconnect; `_BodyTooLarge` as soon as
    more than `limit` bytes arrived (the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _is_last(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


def _encode(name: str, value: str) -> tuple[bytes, bytes]:
    return name.lower().encode("latin-1"), value.encode("latin-1")


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [_encode(n, v) for n, v in reply.headers]
    if reply.header("content-length") is None and _has_body(reply.status):
        headers.append((b"content-length", str(len(reply.body)).encode("ascii")))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


def _has_body(status: int) -> bool:
    return status >= 200 and status not in (204, 304)
