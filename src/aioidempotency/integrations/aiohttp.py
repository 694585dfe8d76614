"""The ``Idempotency-Key`` header for aiohttp servers.

::

    idempotency = idempotency_middleware(store)
    app = web.Application(middlewares=[idempotency])
    app.on_response_prepare.append(idempotency.on_response_prepare)  # optional

or, in one call, ``setup_idempotency(app, store)``. The optional signal marks
responses that a handler streams itself (``await response.prepare(request)``) with
`NOT_STORED_HEADER`; without it they are still released and passed on, unmarked.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
from collections.abc import Awaitable, Callable

import http_sf  # noqa: F401  (the web extra: it parses the key header; fail at import)
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
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

__all__ = ["IdempotencyMiddleware", "ScopeFunction", "idempotency_middleware", "setup_idempotency"]

ScopeFunction = Callable[[web.Request], "Awaitable[str | None] | str | None"]
"""Returns the caller's scope (tenant, API client) from the request, or None when the
caller cannot be identified (the request is then refused); it runs before the
handler, after the middlewares listed before this one."""

_RECOMPUTED = frozenset({"content-length", "transfer-encoding"})
_STREAM_LIMIT = 2**16
"""Buffer limit of the stream handed back to the handler (aiohttp's own default)."""
_in_handler: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "aioidempotency_in_handler", default=False
)


class IdempotencyMiddleware:
    """An aiohttp middleware over `HttpIdempotency`; build it with
    `idempotency_middleware`."""

    __middleware_version__ = 1

    def __init__(self, core: HttpIdempotency, scope_by: ScopeFunction | None = None) -> None:
        self.core = core
        self.scope_by = scope_by

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        core = self.core
        if not core.handles(request.method):
            return await handler(request)
        key = core.parse_key(request.headers.getall(core.options.header_name, []))
        if key is None:
            return await handler(request)
        if isinstance(key, Reply):
            return _to_response(key)
        caller: str | None = None
        if self.scope_by is not None:
            caller = await self._caller_scope(request)
            if caller is None:  # never one scope shared by every unidentified caller
                return _to_response(core.scope_missing())
        limit = core.options.max_request_bytes
        body = None
        if (request.content_length or 0) <= limit:  # else refused before reading any
            body = await _read_body(request, limit)
        if body is None:
            refused = _to_response(core.request_too_large())
            refused.force_close()  # the rest of the body is never read
            return refused
        outcome = await core.run(
            HttpRequest(
                method=request.method,
                path=request.path,
                key=key,
                query=request.rel_url.raw_query_string,
                headers=list(request.headers.items()),
                body=body,
                scope=caller,  # None: the core scopes by the request's credentials
            ),
            lambda: _call_handler(request, handler),
        )
        response = outcome.response
        if isinstance(response, Reply):
            return _to_response(response)
        streamed: web.StreamResponse = response.response
        if not streamed.prepared:
            streamed.headers[NOT_STORED_HEADER] = response.reason
        return streamed

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """``app.on_response_prepare`` signal: marks responses a handler streams itself."""
        if _in_handler.get():  # prepared by a handler we run: it streams its body
            response.headers[NOT_STORED_HEADER] = "streaming"

    async def _caller_scope(self, request: web.Request) -> str | None:
        assert self.scope_by is not None
        value = self.scope_by(request)
        if inspect.isawaitable(value):
            value = await value
        return value


def idempotency_middleware(
    store: PersistenceLayer,
    config: IdempotencyConfig | None = None,
    *,
    scope_by: ScopeFunction | None = None,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    options: HttpIdempotencyOptions | None = None,
    **option_fields: Unpack[HttpOptionFields],
) -> IdempotencyMiddleware:
    """A middleware for ``web.Application(middlewares=[...])``.

    `store` and `config` are those of the engine (`config` gives expiry, lease and
    the opt-in wait); `scope_by` returns the caller's scope of the key (a request
    for which it returns None is refused with a 400); without it, keys are scoped
    by a hash of the request's credentials (`HttpIdempotencyOptions.scope_headers`).
    `options`, or its fields as keyword arguments, set the rules (see
    `HttpIdempotencyOptions`).
    """
    opts = options or HttpIdempotencyOptions()
    if option_fields:
        opts = dataclasses.replace(opts, **option_fields)
    core = HttpIdempotency(store, config, options=opts, key_prefix=key_prefix)
    return IdempotencyMiddleware(core, scope_by)


def setup_idempotency(
    app: web.Application,
    store: PersistenceLayer,
    config: IdempotencyConfig | None = None,
    *,
    scope_by: ScopeFunction | None = None,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    options: HttpIdempotencyOptions | None = None,
    **option_fields: Unpack[HttpOptionFields],
) -> IdempotencyMiddleware:
    """Append the middleware (innermost so far) and its signal to `app`; arguments as
    for `idempotency_middleware`."""
    middleware = idempotency_middleware(
        store, config, scope_by=scope_by, key_prefix=key_prefix, options=options, **option_fields
    )
    app.middlewares.append(middleware)
    app.on_response_prepare.append(middleware.on_response_prepare)
    return middleware


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, read in the stream's own chunks; None as soon as more than
    `limit` bytes arrived (the rest is never read, unlike ``request.read()``, which
    reads up to ``client_max_size`` first)."""
    if not request.can_read_body:
        return await request.read()  # empty, or read by an outer middleware (cached)
    body = bytearray()
    while chunk := await request.content.readany():
        body.extend(chunk)
        if len(body) > limit:
            return None
    data = bytes(body)
    # aiohttp's cache of `read()`: the handler's read(), text(), json() and an
    # urlencoded post() find the body there, as after an ordinary `await request.read()`.
    request._read_bytes = data
    # multipart() (and a multipart post()) parse the stream itself: give them a fresh
    # one holding the body that was read.
    replay = StreamReader(request.protocol, _STREAM_LIMIT, loop=asyncio.get_running_loop())
    if data:
        replay.feed_data(data)
    replay.feed_eof()
    request._payload = replay
    return data


async def _call_handler(request: web.Request, handler: Handler) -> Reply | PassThrough:
    token = _in_handler.set(True)
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:  # raised HTTP errors are responses in aiohttp 3
        response = exc
    finally:
        _in_handler.reset(token)
    if not isinstance(response, web.Response) or response.prepared:
        return PassThrough("streaming", response)  # streamed, or a file: not buffered
    body = response.body
    if body is not None and not isinstance(body, (bytes, bytearray)):
        return PassThrough("streaming", response)  # a payload object, written on prepare
    headers = list(response.headers.items())
    headers += [("Set-Cookie", c.output(header="").strip()) for c in response.cookies.values()]
    return Reply(response.status, tuple(headers), bytes(body or b""))


def _to_response(reply: Reply) -> web.Response:
    headers = CIMultiDict((n, v) for n, v in reply.headers if n.lower() not in _RECOMPUTED)
    return web.Response(status=reply.status, body=reply.body, headers=headers)
