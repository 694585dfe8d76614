"""The same small payments app in FastAPI and in aiohttp, and real servers for them.

Both apps expose the same routes with the same behaviour, so one suite can drive
either over real sockets. A `Probe` is the test's window into the app: how often a
handler ran, and events the handlers set or wait on (no sleeps needed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from aiohttp import web
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aioidempotency import IdempotencyConfig
from aioidempotency._keys import hash_data
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.integrations import aiohttp as aiohttp_integration
from aioidempotency.integrations._http import (
    DEFAULT_EXCLUDED_HEADERS,
    HttpIdempotency,
    fingerprint,
)
from aioidempotency.integrations.starlette import IdempotencyMiddleware
from aioidempotency.persistence import InMemoryPersistenceLayer
from tests.helpers import put_record

__all__ = [
    "BIG_BODY",
    "CLIENT_MAX_SIZE",
    "FRAMEWORKS",
    "MAX_REQUEST_BYTES",
    "STREAM_CHUNKS",
    "Probe",
    "Settings",
    "Site",
    "WatchedStore",
    "run_aiohttp",
    "run_uvicorn",
    "serve",
]

FRAMEWORKS = ["fastapi", "aiohttp"]
STREAM_CHUNKS = [f"chunk-{i:02d};".encode() for i in range(40)]
BIG_BODY = b"x" * 4096  # over the apps' max_response_bytes
MAX_RESPONSE_BYTES = 1024
MAX_REQUEST_BYTES = 64 * 1024
CLIENT_MAX_SIZE = 4 * 1024 * 1024  # aiohttp's own limit, well above the middleware's
KEY_PREFIX = "tests.web"


class PaymentDeclinedError(Exception):
    """Turned into a 402 by an exception handler inside the idempotency middleware."""


class UpstreamDownError(Exception):
    """Turned into a 502 by an exception handler inside the idempotency middleware."""


class Probe:
    """Counts handler runs per idempotency key and holds events shared with the test."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.arrivals: collections.Counter[str] = collections.Counter()
        self.changed = asyncio.Condition()
        self._events: dict[str, asyncio.Event] = {}

    def event(self, name: str) -> asyncio.Event:
        """The event called `name`, created on first use."""
        return self._events.setdefault(name, asyncio.Event())

    def run(self, key_header: str | None) -> int:
        """Record one handler run for the key; returns how many runs it has had."""
        key = (key_header or "").strip('"')
        self.calls[key] += 1
        return self.calls[key]

    async def arrive(self, name: str) -> None:
        """Record that a request reached the middleware's scope function."""
        async with self.changed:
            self.arrivals[name] += 1
            self.changed.notify_all()

    async def wait_arrivals(self, name: str, count: int) -> None:
        """Wait until `count` requests with gate `name` reached the middleware."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.arrivals[name] >= count)


class WatchedStore(InMemoryPersistenceLayer):
    """The in-memory store, telling waiters when a key was released."""

    def __init__(self) -> None:
        super().__init__()
        self.released: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Condition()

    async def release(self, key: str, *, owner: str) -> None:
        await super().release(key, owner=owner)
        async with self._changed:
            self.released[key] += 1
            self._changed.notify_all()

    async def wait_released(self, key: str) -> None:
        """Wait until `key` has been released at least once."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.released[key] > 0)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One middleware configuration; `strict` turns on the non-default knobs.

    With `scoped` the apps pass a ``scope_by`` (the ``X-Tenant`` header; None, so a
    refusal, for a request with ``X-Anonymous``); without it, the default scope.
    """

    strict: bool = False
    scoped: bool = True

    @property
    def header_name(self) -> str:
        return "X-Request-Key" if self.strict else "Idempotency-Key"

    def config(self) -> IdempotencyConfig:
        # The lease is renewed in the background while a handler runs.
        wait = 30.0 if self.strict else 0.0
        return IdempotencyConfig(in_progress_lease_seconds=30.0, wait_for_in_progress_seconds=wait)

    def options(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "max_response_bytes": MAX_RESPONSE_BYTES,
            "max_request_bytes": MAX_REQUEST_BYTES,
            "excluded_headers": DEFAULT_EXCLUDED_HEADERS | {"x-volatile"},
        }
        if self.strict:
            fields |= {
                "header_name": self.header_name,
                "required": True,
                "methods": frozenset({"POST", "PUT"}),
                "fingerprint_headers": ("x-currency",),
                "retry_after_seconds": 7,
            }
        return fields


@dataclasses.dataclass
class Site:
    """A running app: where it listens, its store and its probe."""

    framework: str
    base_url: str
    store: WatchedStore
    probe: Probe
    settings: Settings

    def storage_key(self, path: str, key: str, method: str = "POST", tenant: str = "") -> str:
        """The store key the middleware uses for a request in scope `tenant`."""
        core = HttpIdempotency(self.store, key_prefix=KEY_PREFIX)
        return core.storage_key(method, path, key, tenant)

    def put_completed(self, path: str, key: str, data: str, body: bytes = b"") -> str:
        """Write a COMPLETED record holding `data` (JSON text) under the key of a POST
        of `body` to `path` (scope ``""``), as another writer could; returns its key."""
        storage_key = self.storage_key(path, key)
        put_record(
            self.store,
            DataRecord(
                idempotency_key=storage_key,
                status=RecordStatus.COMPLETED,
                expiry_timestamp=int(time.time()) + 3600,
                response_data=data,
                payload_hash=hash_data(fingerprint(body)),  # the middleware validates it
            ),
        )
        return storage_key


# -- shared behaviour ------------------------------------------------------------------


def _payment(status: int, count: int, body: bytes) -> tuple[int, dict[str, Any]]:
    data = json.loads(body or b"{}")
    amount = data.get("amount", 0)
    return status, {"id": f"pay_{count}", "amount": amount, "calls": count}


# -- FastAPI ----------------------------------------------------------------------------


def build_fastapi(settings: Settings, store: WatchedStore, probe: Probe) -> FastAPI:
    """The payments app in FastAPI, behind `IdempotencyMiddleware`."""
    app = FastAPI()
    key_header = settings.header_name

    async def scope_by(conn: HTTPConnection) -> str | None:
        await probe.arrive(conn.headers.get("x-gate", ""))
        if "x-anonymous" in conn.headers:
            return None
        return conn.headers.get("x-tenant", "")

    @app.exception_handler(PaymentDeclinedError)
    async def declined(request: Request, exc: PaymentDeclinedError) -> JSONResponse:
        return JSONResponse({"error": "declined", "calls": exc.args[0]}, status_code=402)

    @app.exception_handler(UpstreamDownError)
    async def upstream(request: Request, exc: UpstreamDownError) -> JSONResponse:
        return JSONResponse({"error": "upstream down"}, status_code=502)

    async def require_token(request: Request) -> str:
        token = request.headers.get("x-token")
        if token is None:
            raise HTTPException(401, "missing token")
        return token

    @app.api_route("/payments", methods=["POST", "PATCH", "PUT", "GET"])
    async def payments(request: Request, response: Response) -> dict[str, Any]:
        count = probe.run(request.headers.get(key_header))
        body = await request.body()  # the body is read by the app itself
        if json.loads(body or b"{}").get("amount", 0) < 0:
            raise HTTPException(400, "amount must be positive")
        status, data = _payment(201 if request.method == "POST" else 200, count, body)
        response.status_code = status
        response.headers["X-Custom"] = "yes"
        response.headers["X-Volatile"] = str(count)
        response.set_cookie("session", f"s{count}")
        return data

    @app.post("/flaky", status_code=201)
    async def flaky(request: Request) -> Any:
        count = probe.run(request.headers.get(key_header))
        if request.headers.get("x-fail"):
            return JSONResponse({"error": "try again"}, status_code=503)
        return {"calls": count}

    @app.post("/boom", status_code=201)
    async def boom(request: Request) -> dict[str, int]:
        count = probe.run(request.headers.get(key_header))
        if request.headers.get("x-fail"):
            raise RuntimeError("handler crashed")
        return {"calls": count}

    @app.post("/slow", status_code=201)
    async def slow(request: Request) -> dict[str, int]:
        count = probe.run(request.headers.get(key_header))
        gate = request.headers["x-gate"]
        probe.event(f"{gate}:started").set()
        await probe.event(f"{gate}:open").wait()
        return {"calls": count}

    @app.post("/hang", status_code=201)
    async def hang(request: Request) -> dict[str, int]:
        count = probe.run(request.headers.get(key_header))
        if request.headers.get("x-hang"):
            await request.body()
            probe.event(f"{request.headers['x-gate']}:started").set()
            while (await request.receive())["type"] != "http.disconnect":
                pass  # pragma: no cover
            probe.event(f"{request.headers['x-gate']}:disconnected").set()
            raise ClientDisconnect()
        return {"calls": count}

    @app.post("/stream")
    async def stream(request: Request) -> StreamingResponse:
        probe.run(request.headers.get(key_header))

        async def chunks() -> AsyncIterator[bytes]:
            for chunk in STREAM_CHUNKS:
                await asyncio.sleep(0)  # let the server look at the connection
                yield chunk

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.post("/receipt", status_code=201)
    async def receipt(request: Request, background: BackgroundTasks) -> dict[str, int]:
        count = probe.run(request.headers.get(key_header))
        gate = request.headers["x-gate"]

        async def send_receipt() -> None:  # runs after the response was sent
            await probe.event(f"{gate}:bg-open").wait()
            probe.event(f"{gate}:bg-done").set()

        background.add_task(send_receipt)
        return {"calls": count}

    @app.post("/big", status_code=201)
    async def big(request: Request) -> Response:
        probe.run(request.headers.get(key_header))
        return Response(BIG_BODY, status_code=201, media_type="application/octet-stream")

    @app.post("/empty", status_code=204)
    async def empty(request: Request) -> Response:
        probe.run(request.headers.get(key_header))
        return Response(status_code=204)

    @app.post("/declined")
    async def decline(request: Request) -> None:
        raise PaymentDeclinedError(probe.run(request.headers.get(key_header)))

    @app.post("/upstream")
    async def upstream_call(request: Request) -> None:
        probe.run(request.headers.get(key_header))
        raise UpstreamDownError()

    @app.post("/auth", status_code=201)
    async def auth(request: Request, token: str = Depends(require_token)) -> dict[str, Any]:
        return {"calls": probe.run(request.headers.get(key_header)), "token": token}

    app.add_middleware(
        IdempotencyMiddleware,
        store=store,
        config=settings.config(),
        scope_by=scope_by if settings.scoped else None,
        key_prefix=KEY_PREFIX,
        **settings.options(),
    )
    app.add_middleware(_Peek)
    return app


class _Peek:
    """An outer pure ASGI middleware that, when asked (``X-Peek: 1``), reads the whole
    body before the idempotency middleware, then hands it on once and defers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (b"x-peek", b"1") not in scope["headers"]:
            await self.app(scope, receive, send)
            return
        body = await Request(scope, receive).body()
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def mark(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message["headers"], (b"x-peeked", str(len(body)).encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, replay, mark)


# -- aiohttp ------------------------------------------------------------------------------


def build_aiohttp(settings: Settings, store: WatchedStore, probe: Probe) -> web.Application:
    """The payments app in aiohttp, behind the idempotency middleware."""
    key_header = settings.header_name

    async def scope_by(request: web.Request) -> str | None:
        await probe.arrive(request.headers.get("x-gate", ""))
        if "x-anonymous" in request.headers:
            return None
        return request.headers.get("x-tenant", "")

    @web.middleware
    async def peek(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.headers.get("x-peek") != "1":
            return await handler(request)
        body = await request.read()
        response = await handler(request)
        response.headers["X-Peeked"] = str(len(body))
        return response

    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except PaymentDeclinedError as exc:
            return web.json_response({"error": "declined", "calls": exc.args[0]}, status=402)
        except UpstreamDownError:
            return web.json_response({"error": "upstream down"}, status=502)

    @web.middleware
    async def require_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/auth" and "x-token" not in request.headers:
            raise web.HTTPUnauthorized(
                text=json.dumps({"detail": "missing token"}), content_type="application/json"
            )
        return await handler(request)

    async def payments(request: web.Request) -> web.Response:
        count = probe.run(request.headers.get(key_header))
        body = await request.read()
        if json.loads(body or b"{}").get("amount", 0) < 0:
            raise web.HTTPBadRequest(
                text=json.dumps({"detail": "amount must be positive"}),
                content_type="application/json",
            )
        status, data = _payment(201 if request.method == "POST" else 200, count, body)
        response = web.json_response(
            data, status=status, headers={"X-Custom": "yes", "X-Volatile": str(count)}
        )
        response.set_cookie("session", f"s{count}")
        return response

    async def flaky(request: web.Request) -> web.Response:
        count = probe.run(request.headers.get(key_header))
        if request.headers.get("x-fail"):
            return web.json_response({"error": "try again"}, status=503)
        return web.json_response({"calls": count}, status=201)

    async def boom(request: web.Request) -> web.Response:
        count = probe.run(request.headers.get(key_header))
        if request.headers.get("x-fail"):
            raise RuntimeError("handler crashed")
        return web.json_response({"calls": count}, status=201)

    async def slow(request: web.Request) -> web.Response:
        count = probe.run(request.headers.get(key_header))
        gate = request.headers["x-gate"]
        probe.event(f"{gate}:started").set()
        await probe.event(f"{gate}:open").wait()
        return web.json_response({"calls": count}, status=201)

    async def hang(request: web.Request) -> web.Response:
        count = probe.run(request.headers.get(key_header))
        if request.headers.get("x-hang"):
            gate = request.headers["x-gate"]
            probe.event(f"{gate}:started").set()
            try:
                await probe.event(f"{gate}:never").wait()  # aiohttp cancels us on disconnect
            finally:
                probe.event(f"{gate}:disconnected").set()
        return web.json_response({"calls": count}, status=201)

    async def stream(request: web.Request) -> web.StreamResponse:
        probe.run(request.headers.get(key_header))
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        for chunk in STREAM_CHUNKS:
            await asyncio.sleep(0)
            await response.write(chunk)
        return response  # aiohttp ends the stream once the middlewares have returned

    async def big(request: web.Request) -> web.Response:
        probe.run(request.headers.get(key_header))
        return web.Response(body=BIG_BODY, status=201, content_type="application/octet-stream")

    async def empty(request: web.Request) -> web.Response:
        probe.run(request.headers.get(key_header))
        return web.Response(status=204)

    async def decline(request: web.Request) -> web.Response:
        raise PaymentDeclinedError(probe.run(request.headers.get(key_header)))

    async def upstream_call(request: web.Request) -> web.Response:
        probe.run(request.headers.get(key_header))
        raise UpstreamDownError()

    async def auth(request: web.Request) -> web.Response:
        count = probe.run(request.headers.get(key_header))
        return web.json_response({"calls": count, "token": request.headers["x-token"]}, status=201)

    idempotency = aiohttp_integration.idempotency_middleware(
        store,
        settings.config(),
        scope_by=scope_by if settings.scoped else None,
        key_prefix=KEY_PREFIX,
        **settings.options(),
    )
    app = web.Application(
        middlewares=[peek, idempotency, errors, require_token], client_max_size=CLIENT_MAX_SIZE
    )
    app.on_response_prepare.append(idempotency.on_response_prepare)
    for method in ("POST", "PATCH", "PUT", "GET"):
        app.router.add_route(method, "/payments", payments)
    for path, handler in {
        "/flaky": flaky,
        "/boom": boom,
        "/slow": slow,
        "/hang": hang,
        "/stream": stream,
        "/big": big,
        "/empty": empty,
        "/declined": decline,
        "/upstream": upstream_call,
        "/auth": auth,
    }.items():
        app.router.add_post(path, handler)
    return app


# -- servers ------------------------------------------------------------------------------


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def run_uvicorn(app: ASGIApp) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; yields its base URL."""
    sock = _loopback_socket()
    config = uvicorn.Config(
        app, lifespan="off", log_level="critical", access_log=False, timeout_graceful_shutdown=5
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    await server.on_tick(0)  # sets the Date and Server headers, as its main loop would
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await server.shutdown(sockets=[sock])


@contextlib.asynccontextmanager
async def run_aiohttp(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app with its runner on a free loopback port; yields its base URL."""
    sock = _loopback_socket()
    # handler_cancellation: a client that disconnects cancels its handler.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve(framework: str, settings: Settings) -> AsyncIterator[Site]:
    """Run the app of `framework` on a free loopback port until the block ends."""
    store = WatchedStore()
    probe = Probe()
    if framework == "fastapi":
        server = run_uvicorn(build_fastapi(settings, store, probe))
    else:
        server = run_aiohttp(build_aiohttp(settings, store, probe))
    async with server as base_url:
        yield Site(framework, base_url, store, probe, settings)
