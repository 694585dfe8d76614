"""The middleware's log lines for the 409, 422 and 503 it answers, against real servers
(FastAPI under uvicorn, aiohttp under its runner; tests/web_apps.py), for both
frameworks: level, message and ``extra`` fields, and never a body or a credential."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import httpx
import pytest

from aioidempotency._records import DataRecord
from aioidempotency.exceptions import IdempotencyPersistenceConnectionError
from aioidempotency.integrations._http import HttpIdempotency
from aioidempotency.persistence import ClaimResult
from tests.web_apps import (
    FRAMEWORKS,
    KEY_PREFIX,
    Probe,
    Settings,
    WatchedStore,
    build_aiohttp,
    build_fastapi,
    run_aiohttp,
    run_uvicorn,
)

T = TypeVar("T")
BOUND = 15.0
SECRET = "s3cr3t-card-4242"
CREDENTIAL = "Bearer tok-s3cr3t"


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, BOUND)


class SwitchableStore(WatchedStore):
    """The apps' in-memory store; while `down`, every claim fails as an unreachable
    server's does (fault injection)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        if self.down:
            raise IdempotencyPersistenceConnectionError("connection refused by 127.0.0.1:1")
        return await super().claim(record, now=now)


class App:
    """A running app on `store`, and a client for it."""

    def __init__(self, store: SwitchableStore, probe: Probe, client: httpx.AsyncClient) -> None:
        self.store = store
        self.probe = probe
        self.client = client

    def storage_key(self, path: str, key: str) -> str:
        """The store key of a POST to `path` with `key` (the apps' scope: no tenant)."""
        return HttpIdempotency(self.store, key_prefix=KEY_PREFIX).storage_key("POST", path, key)


@pytest.fixture(scope="module", params=FRAMEWORKS)
async def app(request: pytest.FixtureRequest) -> AsyncIterator[App]:
    store, probe, settings = SwitchableStore(), Probe(), Settings()
    if request.param == "fastapi":
        server = run_uvicorn(build_fastapi(settings, store, probe))
    else:
        server = run_aiohttp(build_aiohttp(settings, store, probe))
    async with server as base_url, httpx.AsyncClient(base_url=base_url, timeout=BOUND) as http:
        yield App(store, probe, http)


@pytest.fixture
def key() -> str:
    return f"key-{uuid.uuid4().hex}"


def headers(key: str, **extra: str) -> dict[str, str]:
    return {"Idempotency-Key": key, "Authorization": CREDENTIAL, **extra}


def web_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aioidempotency.web"]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    names = (
        "idempotency_decision",
        "idempotency_key",
        "idempotency_prefix",
        "idempotency_error",
        "idempotency_reason",
        "http_status",
    )
    return {name: getattr(record, name) for name in names}


def assert_private(caplog: pytest.LogCaptureFixture) -> None:
    """No body and no credential in any record, message or field."""
    assert SECRET not in caplog.text
    assert "tok-s3cr3t" not in caplog.text
    for record in caplog.records:
        assert SECRET not in repr(vars(record))
        assert "tok-s3cr3t" not in repr(vars(record))


async def test_a_409_is_logged_with_its_reason(
    app: App, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = f'{{"amount": 5, "card": "{SECRET}"}}'.encode()
    slow = headers(key, **{"X-Gate": key})
    with caplog.at_level(logging.INFO, logger="aioidempotency"):
        first = asyncio.create_task(app.client.post("/slow", content=body, headers=slow))
        await bounded(app.probe.event(f"{key}:started").wait())
        busy = await app.client.post("/slow", content=body, headers=slow)
        app.probe.event(f"{key}:open").set()
        assert (await bounded(first)).status_code == 201
    assert busy.status_code == 409
    [line] = web_lines(caplog)
    assert line.levelno == logging.INFO
    storage_key = app.storage_key("/slow", key)
    assert line.getMessage() == (
        f"answered 409 request-in-progress for {storage_key}: "
        "another request with this key has not finished"
    )
    assert fields(line) == {
        "idempotency_decision": "request-in-progress",
        "idempotency_key": storage_key,
        "idempotency_prefix": KEY_PREFIX,
        "idempotency_error": None,
        "idempotency_reason": "another request with this key has not finished",
        "http_status": 409,
    }
    assert isinstance(line.duration_ms, float)  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]
    assert_private(caplog)


async def test_a_422_is_logged_with_its_reason(
    app: App, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="aioidempotency"):
        first = await app.client.post("/payments", content=b'{"amount": 5}', headers=headers(key))
        other = f'{{"amount": 6, "card": "{SECRET}"}}'.encode()
        reused = await app.client.post("/payments", content=other, headers=headers(key))
    assert (first.status_code, reused.status_code) == (201, 422)
    [line] = web_lines(caplog)
    assert line.levelno == logging.INFO
    storage_key = app.storage_key("/payments", key)
    reason = "the key was used with a different request body or parameters"
    assert line.getMessage() == f"answered 422 key-reused for {storage_key}: {reason}"
    assert fields(line) == {
        "idempotency_decision": "key-reused",
        "idempotency_key": storage_key,
        "idempotency_prefix": KEY_PREFIX,
        "idempotency_error": None,
        "idempotency_reason": reason,
        "http_status": 422,
    }
    assert_private(caplog)


async def test_a_503_is_logged_as_a_warning_with_the_store_error(
    app: App, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = f'{{"amount": 5, "card": "{SECRET}"}}'.encode()
    app.store.down = True
    try:
        with caplog.at_level(logging.INFO, logger="aioidempotency"):
            refused = await app.client.post("/payments", content=body, headers=headers(key))
    finally:
        app.store.down = False
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert app.probe.calls[key] == 0
    storage_key = app.storage_key("/payments", key)
    [line] = web_lines(caplog)
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(f"answered 503 store-unavailable for {storage_key}: ")
    assert fields(line) == {
        "idempotency_decision": "store-unavailable",
        "idempotency_key": storage_key,
        "idempotency_prefix": KEY_PREFIX,
        "idempotency_error": "IdempotencyPersistenceConnectionError",
        "idempotency_reason": (
            "IdempotencyPersistenceConnectionError: Failed to save in progress record to "
            "idempotency store - (connection refused by 127.0.0.1:1)"
        ),
        "http_status": 503,
    }
    # The engine's own line for the same decision, on its logger.
    [engine_line] = [r for r in caplog.records if r.name == "aioidempotency.engine"]
    assert engine_line.levelno == logging.WARNING
    assert engine_line.idempotency_decision == "store_error"  # type: ignore[attr-defined]
    assert engine_line.idempotency_key == storage_key  # type: ignore[attr-defined]
    assert_private(caplog)
