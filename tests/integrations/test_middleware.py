"""The Idempotency-Key middleware against real servers: FastAPI under uvicorn and
aiohttp under its own runner, on loopback ports, driven over sockets. Every test runs
for both frameworks (the `site` fixtures are parametrised)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import aiohttp
import httpx
import pytest

from aioidempotency.integrations._http import (
    NOT_STORED_HEADER,
    REPLAYED_HEADER,
    credential_scope,
)
from tests.web_apps import (
    BIG_BODY,
    CLIENT_MAX_SIZE,
    FRAMEWORKS,
    MAX_REQUEST_BYTES,
    STREAM_CHUNKS,
    Settings,
    Site,
    serve,
)

T = TypeVar("T")
BOUND = 15.0  # no test waits longer than this for anything
PAY = b'{"amount": 5}'


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, BOUND)


@pytest.fixture(scope="module", params=FRAMEWORKS)
async def site(request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    """The app with the default rules."""
    async with serve(request.param, Settings()) as running:
        yield running


@pytest.fixture(scope="module", params=FRAMEWORKS)
async def strict_site(request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    """The app with a required custom header, POST+PUT, a fingerprinted header and
    the engine's wait for in-progress results on."""
    async with serve(request.param, Settings(strict=True)) as running:
        yield running


@pytest.fixture(scope="module", params=FRAMEWORKS)
async def open_site(request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    """The app without `scope_by`: keys are scoped by the callers' credentials."""
    async with serve(request.param, Settings(scoped=False)) as running:
        yield running


@pytest.fixture
async def open_client(open_site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=open_site.base_url, timeout=BOUND) as http:
        yield http


@pytest.fixture
async def client(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=site.base_url, timeout=BOUND) as http:
        yield http


@pytest.fixture
async def strict_client(strict_site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=strict_site.base_url, timeout=BOUND) as http:
        yield http


@pytest.fixture
def key() -> str:
    return f"key-{uuid.uuid4().hex}"


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    data: dict[str, Any] = response.json()
    assert data["type"].endswith(f":{kind}")
    assert data["status"] == status
    assert data["title"]
    assert data["detail"]
    return data


def stable_headers(response: httpx.Response) -> dict[str, str]:
    volatile = {"date", "server", "content-length", "set-cookie", "x-volatile", "transfer-encoding"}
    return {k: v for k, v in response.headers.items() if k not in volatile}


# -- replay ---------------------------------------------------------------------------------


async def test_replay_is_the_first_response_plus_the_replayed_header(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    first = await client.post("/payments", content=PAY, headers=headers)
    again = await client.post("/payments", content=PAY, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == {"id": "pay_1", "amount": 5, "calls": 1}
    assert again.content == first.content
    assert REPLAYED_HEADER.lower() not in first.headers
    assert again.headers[REPLAYED_HEADER] == "true"
    assert stable_headers(again) == {**stable_headers(first), "idempotent-replayed": "true"}
    assert again.headers["x-custom"] == "yes"
    # volatile and session headers are not stored; the server adds its own Date
    assert first.headers["x-volatile"] == "1"
    assert "x-volatile" not in again.headers
    assert "set-cookie" in first.headers
    assert "set-cookie" not in again.headers
    assert "date" in again.headers
    assert site.probe.calls[key] == 1


async def test_replay_with_an_aiohttp_client(site: Site, key: str) -> None:
    async with aiohttp.ClientSession(site.base_url) as session:
        bodies = []
        for _ in range(3):
            async with session.post(
                "/payments", data=PAY, headers={"Idempotency-Key": key}
            ) as response:
                assert response.status == 201
                bodies.append((await response.read(), response.headers.get(REPLAYED_HEADER)))
    assert [replayed for _, replayed in bodies] == [None, "true", "true"]
    assert len({body for body, _ in bodies}) == 1
    assert site.probe.calls[key] == 1


async def test_quoted_and_bare_keys_are_the_same_key(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    first = await client.post("/payments", content=PAY, headers={"Idempotency-Key": f'"{key}"'})
    again = await client.post("/payments", content=PAY, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    assert again.headers[REPLAYED_HEADER] == "true"
    assert site.probe.calls[key] == 1


async def test_a_255_character_key_is_accepted(site: Site, client: httpx.AsyncClient) -> None:
    key = uuid.uuid4().hex + "k" * 223
    assert len(key) == 255
    for _ in range(2):
        response = await client.post("/payments", content=PAY, headers={"Idempotency-Key": key})
        assert response.status_code == 201
    assert site.probe.calls[key] == 1


@pytest.mark.parametrize(
    "values",
    [[""], ['""'], ["k" * 256], ["two words"], ['"unterminated'], ["a", "b"]],
    ids=["empty", "empty-quoted", "too-long", "space", "unterminated", "repeated"],
)
async def test_malformed_keys_are_400_and_nothing_runs(
    site: Site, client: httpx.AsyncClient, values: list[str]
) -> None:
    before = sum(site.probe.calls.values())
    headers = [("Idempotency-Key", value) for value in values]
    response = await client.post("/payments", content=PAY, headers=headers)
    assert_problem(response, 400, "key-malformed")
    assert sum(site.probe.calls.values()) == before


async def test_same_key_with_another_body_or_query_is_422(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    headers = {"Idempotency-Key": key}
    assert (await client.post("/payments", content=PAY, headers=headers)).status_code == 201
    other_body = await client.post("/payments", content=b'{"amount": 6}', headers=headers)
    other_query = await client.post("/payments?x=1", content=PAY, headers=headers)
    assert_problem(other_body, 422, "key-reused")
    assert_problem(other_query, 422, "key-reused")
    assert site.probe.calls[key] == 1


async def test_keys_are_scoped_by_method_path_and_caller(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    headers = {"Idempotency-Key": key}
    await client.post("/payments", content=PAY, headers=headers)
    patch = await client.patch("/payments", content=PAY, headers=headers)
    other_path = await client.post("/flaky", content=PAY, headers=headers)
    tenant_b = await client.post("/payments", content=PAY, headers={**headers, "X-Tenant": "b"})
    tenant_b_again = await client.post(
        "/payments", content=PAY, headers={**headers, "X-Tenant": "b"}
    )
    assert patch.status_code == 200
    for response in (patch, other_path, tenant_b):
        assert REPLAYED_HEADER.lower() not in response.headers
    assert tenant_b_again.headers[REPLAYED_HEADER] == "true"
    assert tenant_b_again.json() == tenant_b.json()
    assert site.probe.calls[key] == 4  # POST, PATCH, /flaky, POST as tenant b


async def test_unhandled_methods_and_requests_without_key_pass_through(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    for _ in range(2):
        put = await client.put("/payments", content=PAY, headers={"Idempotency-Key": key})
        assert put.status_code == 200
        assert REPLAYED_HEADER.lower() not in put.headers
    assert site.probe.calls[key] == 2
    for _ in range(2):
        plain = await client.post("/payments", content=PAY)
        assert plain.status_code == 201
        assert REPLAYED_HEADER.lower() not in plain.headers
    assert await site.store.get(site.storage_key("/payments", key, method="PUT")) is None


async def test_a_204_is_replayed_without_a_body(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    responses = [await client.post("/empty", headers={"Idempotency-Key": key}) for _ in range(2)]
    assert [r.status_code for r in responses] == [204, 204]
    assert responses[1].headers[REPLAYED_HEADER] == "true"
    assert responses[1].content == b""
    assert "content-length" not in responses[1].headers
    assert site.probe.calls[key] == 1


async def test_a_request_body_over_the_limit_is_413(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    response = await client.post(
        "/payments", content=b"x" * (MAX_REQUEST_BYTES + 1), headers={"Idempotency-Key": key}
    )
    assert_problem(response, 413, "request-too-large")
    assert site.probe.calls[key] == 0


# -- what is stored, what releases the key -------------------------------------------------


async def test_a_4xx_is_stored_and_replayed(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    bad = b'{"amount": -1}'
    first = await client.post("/payments", content=bad, headers={"Idempotency-Key": key})
    again = await client.post("/payments", content=bad, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 400
    assert again.content == first.content
    assert again.headers[REPLAYED_HEADER] == "true"
    assert site.probe.calls[key] == 1


async def test_a_5xx_releases_the_key_and_a_retry_runs(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    failed = await client.post(
        "/flaky", content=PAY, headers={"Idempotency-Key": key, "X-Fail": "1"}
    )
    assert failed.status_code == 503
    assert failed.headers[NOT_STORED_HEADER] == "status"
    retry = await client.post("/flaky", content=PAY, headers={"Idempotency-Key": key})
    assert retry.status_code == 201
    assert retry.json() == {"calls": 2}
    assert REPLAYED_HEADER.lower() not in retry.headers


async def test_an_exception_releases_the_key_and_a_retry_runs(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    crashed = await client.post(
        "/boom", content=PAY, headers={"Idempotency-Key": key, "X-Fail": "1"}
    )
    assert crashed.status_code == 500
    retry = await client.post("/boom", content=PAY, headers={"Idempotency-Key": key})
    assert retry.status_code == 201
    assert retry.json() == {"calls": 2}


async def test_a_response_over_the_size_limit_passes_unstored(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    for _ in range(2):
        response = await client.post("/big", headers={"Idempotency-Key": key})
        assert response.status_code == 201
        assert response.content == BIG_BODY
        assert response.headers[NOT_STORED_HEADER] == "too-large"
    assert site.probe.calls[key] == 2


async def test_streaming_passes_through_intact_unstored_and_releases(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    for _ in range(2):
        response = await client.post("/stream", headers={"Idempotency-Key": key})
        assert response.status_code == 200
        assert response.content == b"".join(STREAM_CHUNKS)
        assert response.headers[NOT_STORED_HEADER] == "streaming"
    assert site.probe.calls[key] == 2
    assert await site.store.get(site.storage_key("/stream", key)) is None


async def test_streaming_without_a_key_is_untouched(site: Site, client: httpx.AsyncClient) -> None:
    response = await client.post("/stream")
    assert response.content == b"".join(STREAM_CHUNKS)
    assert NOT_STORED_HEADER.lower() not in response.headers


@pytest.mark.parametrize("site", ["fastapi"], indirect=True)  # a Starlette feature
async def test_background_tasks_run_after_the_response_is_stored_and_sent(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    headers = {"Idempotency-Key": key, "X-Gate": key}
    first = await client.post("/receipt", content=PAY, headers=headers)
    assert first.status_code == 201
    assert not site.probe.event(f"{key}:bg-done").is_set()  # still waiting to be let go
    again = await client.post("/receipt", content=PAY, headers=headers)
    assert again.headers[REPLAYED_HEADER] == "true"
    site.probe.event(f"{key}:bg-open").set()
    await bounded(site.probe.event(f"{key}:bg-done").wait())
    assert site.probe.calls[key] == 1


# -- concurrency ------------------------------------------------------------------------------


async def _slow(client: httpx.AsyncClient, header: str, key: str) -> httpx.Response:
    return await client.post("/slow", content=PAY, headers={header: key, "X-Gate": key})


async def test_a_duplicate_in_progress_is_409_with_retry_after(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    first = asyncio.create_task(_slow(client, "Idempotency-Key", key))
    await bounded(site.probe.event(f"{key}:started").wait())
    busy = await _slow(client, "Idempotency-Key", key)
    site.probe.event(f"{key}:open").set()
    assert (await bounded(first)).status_code == 201
    assert_problem(busy, 409, "request-in-progress")
    assert busy.headers["retry-after"] == "1"
    later = await _slow(client, "Idempotency-Key", key)
    assert later.headers[REPLAYED_HEADER] == "true"
    assert site.probe.calls[key] == 1


async def test_50_concurrent_posts_run_once_and_the_rest_are_409(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    tasks = [asyncio.create_task(_slow(client, "Idempotency-Key", key)) for _ in range(50)]
    await bounded(site.probe.event(f"{key}:started").wait())
    responses: list[httpx.Response] = []
    for next_done in asyncio.as_completed(tasks, timeout=BOUND):
        if len(responses) == 49:  # only the running one is left: let it finish
            site.probe.event(f"{key}:open").set()
        responses.append(await next_done)
    assert site.probe.calls[key] == 1
    assert [r.status_code for r in responses] == [409] * 49 + [201]
    for busy in responses[:49]:
        assert_problem(busy, 409, "request-in-progress")
        assert busy.headers["retry-after"] == "1"


async def test_50_concurrent_posts_with_waiting_all_get_the_same_answer(
    strict_site: Site, strict_client: httpx.AsyncClient, key: str
) -> None:
    header = strict_site.settings.header_name
    tasks = [asyncio.create_task(_slow(strict_client, header, key)) for _ in range(50)]
    await bounded(strict_site.probe.wait_arrivals(key, 50))
    await bounded(strict_site.probe.event(f"{key}:started").wait())
    strict_site.probe.event(f"{key}:open").set()
    responses = await bounded(asyncio.gather(*tasks))
    assert strict_site.probe.calls[key] == 1
    assert len({(r.status_code, r.content) for r in responses}) == 1
    assert responses[0].status_code == 201
    assert responses[0].json() == {"calls": 1}
    replayed = [r.headers.get(REPLAYED_HEADER) for r in responses]
    assert replayed.count("true") == 49
    assert replayed.count(None) == 1


# -- client disconnects -------------------------------------------------------------------------


async def test_a_client_disconnect_mid_request_releases_the_key(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    host, port = site.base_url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    request = (
        f"POST /hang HTTP/1.1\r\nHost: {host}\r\nIdempotency-Key: {key}\r\nX-Hang: 1\r\n"
        f"X-Gate: {key}\r\nContent-Type: application/json\r\nContent-Length: {len(PAY)}\r\n\r\n"
    )
    writer.write(request.encode() + PAY)
    await writer.drain()
    await bounded(site.probe.event(f"{key}:started").wait())
    stored = site.storage_key("/hang", key)
    record = await site.store.get(stored)
    assert record is not None
    assert record.status.value == "INPROGRESS"
    # the handler is still waiting: the middleware's receive defers to the server's
    assert not site.probe.event(f"{key}:disconnected").is_set()
    writer.close()
    await writer.wait_closed()
    await bounded(site.probe.event(f"{key}:disconnected").wait())

    await bounded(site.store.wait_released(stored))
    assert await site.store.get(stored) is None
    retry = await client.post("/hang", content=PAY, headers={"Idempotency-Key": key})
    assert retry.status_code == 201
    assert retry.json() == {"calls": 2}


# -- ordering with the framework's own machinery -------------------------------------------------


async def test_an_exception_handled_inside_into_a_4xx_is_stored(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    first = await client.post("/declined", headers={"Idempotency-Key": key})
    again = await client.post("/declined", headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 402
    assert first.json() == again.json() == {"error": "declined", "calls": 1}
    assert again.headers[REPLAYED_HEADER] == "true"


async def test_an_exception_handled_inside_into_a_5xx_releases(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    for _ in range(2):
        response = await client.post("/upstream", headers={"Idempotency-Key": key})
        assert response.status_code == 502
        assert response.headers[NOT_STORED_HEADER] == "status"
    assert site.probe.calls[key] == 2


async def test_a_dependency_rejection_runs_inside_and_is_stored(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    rejected = await client.post("/auth", headers={"Idempotency-Key": key})
    retried = await client.post("/auth", headers={"Idempotency-Key": key, "X-Token": "t"})
    fresh = await client.post("/auth", headers={"Idempotency-Key": f"{key}-2", "X-Token": "t"})
    assert rejected.status_code == retried.status_code == 401
    assert retried.headers[REPLAYED_HEADER] == "true"
    assert fresh.status_code == 201
    assert site.probe.calls[key] == 0


async def test_a_body_already_read_by_an_outer_middleware(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    headers = {"Idempotency-Key": key, "X-Peek": "1"}
    first = await client.post("/payments", content=PAY, headers=headers)
    again = await client.post("/payments", content=PAY, headers=headers)
    mismatch = await client.post("/payments", content=b'{"amount": 7}', headers=headers)
    assert first.json() == {"id": "pay_1", "amount": 5, "calls": 1}
    assert first.headers["x-peeked"] == again.headers["x-peeked"] == str(len(PAY))
    assert again.headers[REPLAYED_HEADER] == "true"
    assert again.content == first.content
    assert_problem(mismatch, 422, "key-reused")


# -- the non-default rules ------------------------------------------------------------------------


async def test_a_required_key_that_is_missing_is_400(
    strict_site: Site, strict_client: httpx.AsyncClient
) -> None:
    before = sum(strict_site.probe.calls.values())
    response = await strict_client.post("/payments", content=PAY)
    data = assert_problem(response, 400, "key-missing")
    assert data["title"] == "X-Request-Key is missing"
    ignored = await strict_client.get("/payments")  # not a handled method
    assert ignored.status_code == 200
    assert sum(strict_site.probe.calls.values()) == before + 1


async def test_configured_header_methods_and_fingerprint_headers(
    strict_site: Site, strict_client: httpx.AsyncClient, key: str
) -> None:
    headers = {"X-Request-Key": key, "X-Currency": "EUR"}
    first = await strict_client.put("/payments", content=PAY, headers=headers)
    again = await strict_client.put("/payments", content=PAY, headers=headers)
    other_currency = await strict_client.put(
        "/payments", content=PAY, headers={**headers, "X-Currency": "USD"}
    )
    assert first.status_code == 200
    assert again.headers[REPLAYED_HEADER] == "true"
    assert_problem(other_currency, 422, "key-reused")
    patch = await strict_client.patch("/payments", content=PAY, headers=headers)
    patch_again = await strict_client.patch("/payments", content=PAY, headers=headers)
    assert REPLAYED_HEADER.lower() not in patch_again.headers  # PATCH is not handled here
    assert patch.status_code == 200
    assert strict_site.probe.calls[key] == 3


# -- safe by default: scopes --------------------------------------------------------------------


async def test_without_scope_by_callers_with_other_credentials_never_share_a_key(
    open_site: Site, open_client: httpx.AsyncClient, key: str
) -> None:
    alice = {"Idempotency-Key": key, "Authorization": "Bearer alice-secret"}
    bob = {"Idempotency-Key": key, "Authorization": "Bearer bob-secret"}
    first = await open_client.post("/payments", content=PAY, headers=alice)
    same_body = await open_client.post("/payments", content=PAY, headers=bob)
    other_body = await open_client.post("/payments", content=b'{"amount": 6}', headers=bob)
    assert first.status_code == same_body.status_code == 201
    assert REPLAYED_HEADER.lower() not in same_body.headers  # not alice's response
    assert same_body.json()["calls"] == 2
    assert other_body.status_code == 422  # bob's own key, reused with another body
    again = await open_client.post("/payments", content=PAY, headers=alice)
    assert again.headers[REPLAYED_HEADER] == "true"
    assert again.json() == first.json()
    assert open_site.probe.calls[key] == 2


@pytest.mark.parametrize(
    "credentials",
    [{"Cookie": "session=a; theme=dark"}, {"Cookie": "session=b; theme=dark"}, {}],
    ids=["cookie-a", "cookie-b", "anonymous"],
)
async def test_without_scope_by_cookies_scope_and_anonymous_callers_share(
    open_site: Site, open_client: httpx.AsyncClient, credentials: dict[str, str]
) -> None:
    key = f"shared-{open_site.framework}"  # the same key for every parameter
    response = await open_client.post(
        "/payments", content=PAY, headers={"Idempotency-Key": key, **credentials}
    )
    assert response.status_code == 201
    scope = credential_scope(list(credentials.items()))
    assert "session" not in scope  # a digest, never the cookie itself
    stored = await open_site.store.get(open_site.storage_key("/payments", key, tenant=scope))
    assert stored is not None
    if not credentials:  # the anonymous scope: a second anonymous caller gets the replay
        open_client.cookies.clear()  # the app set a session cookie: that is a credential
        again = await open_client.post("/payments", content=PAY, headers={"Idempotency-Key": key})
        assert again.headers[REPLAYED_HEADER] == "true"
        assert again.json() == response.json()
    else:
        assert REPLAYED_HEADER.lower() not in response.headers


async def test_a_scope_by_returning_none_is_400_and_nothing_runs(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    headers = {"Idempotency-Key": key, "X-Anonymous": "1"}
    for _ in range(2):
        response = await client.post("/payments", content=PAY, headers=headers)
        assert_problem(response, 400, "scope-missing")
    assert site.probe.calls[key] == 0
    assert await site.store.get(site.storage_key("/payments", key)) is None


# -- safe by default: what the store holds ----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        '{"not": "a stored reply"}',
        '"plain text"',
        '{"v": 1, "status": 200, "headers": [["x-a", "1\\r\\nSet-Cookie: s=evil"]], "body": ""}',
        '{"v": 1, "status": 2000, "headers": [], "body": ""}',
    ],
    ids=["object", "string", "header-injection", "bad-status"],
)
async def test_a_foreign_value_under_the_key_is_a_500_problem_and_nothing_runs(
    site: Site, client: httpx.AsyncClient, key: str, data: str
) -> None:
    stored_key = site.put_completed("/payments", key, data, body=PAY)
    response = await client.post("/payments", content=PAY, headers={"Idempotency-Key": key})
    assert_problem(response, 500, "stored-reply-invalid")
    assert "retry-after" not in response.headers
    assert "set-cookie" not in response.headers
    assert site.probe.calls[key] == 0
    record = await site.store.get(stored_key)  # left alone for an operator
    assert record is not None
    assert record.response_data == data


# -- safe by default: request bodies over the limit are not read ------------------------------


async def _raw_request(site: Site, head: str, body: bytes) -> tuple[asyncio.StreamWriter, bytes]:
    """Send `head` and `body` on a new connection, then read the response's head (the
    client never sends more: a server that waited for the rest would not answer)."""
    host, port = site.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode("latin-1") + body)
    await bounded(writer.drain())
    return writer, await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)


async def test_a_chunked_upload_over_the_limit_is_413_before_the_rest_is_sent(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    chunk = b"x" * 8192
    sent = b"".join(b"2000\r\n" + chunk + b"\r\n" for _ in range(MAX_REQUEST_BYTES // 8192 + 2))
    head = (
        f"POST /payments HTTP/1.1\r\nHost: test\r\nIdempotency-Key: {key}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    writer, response = await _raw_request(site, head, sent)  # the last chunk never comes
    writer.close()
    assert response.startswith(b"HTTP/1.1 413 "), response
    assert b"connection: close" in response.lower()
    assert site.probe.calls[key] == 0


async def test_a_declared_length_over_the_limit_is_413_without_reading(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    length = 2 * MAX_REQUEST_BYTES
    assert length < CLIENT_MAX_SIZE  # aiohttp's own limit would let it through
    head = (
        f"POST /payments HTTP/1.1\r\nHost: test\r\nIdempotency-Key: {key}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    writer, response = await _raw_request(site, head, b"")  # no byte of the body is sent
    writer.close()
    assert response.startswith(b"HTTP/1.1 413 "), response
    assert site.probe.calls[key] == 0


async def test_a_body_at_the_limit_is_accepted_and_reaches_the_handler(
    site: Site, client: httpx.AsyncClient, key: str
) -> None:
    body = b'{"amount": 5, "pad": "' + b"x" * (MAX_REQUEST_BYTES - 24) + b'"}'
    assert len(body) == MAX_REQUEST_BYTES
    for _ in range(2):
        response = await client.post("/payments", content=body, headers={"Idempotency-Key": key})
        assert response.status_code == 201
        assert response.json()["amount"] == 5  # the handler read the whole body
    assert site.probe.calls[key] == 1
