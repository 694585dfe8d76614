"""The framework-free core of the web integrations: keys, fingerprints, stored replies,
problems, and the decisions of `HttpIdempotency.run` (no server needed)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from aioidempotency import IdempotencyConfig
from aioidempotency._async.store import ClaimResult
from aioidempotency._keys import hash_data
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import (
    IdempotencyError,
    IdempotencyInvalidRecordError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from aioidempotency.integrations._http import (
    NOT_STORED_HEADER,
    REPLAYED_HEADER,
    HttpIdempotency,
    HttpIdempotencyOptions,
    HttpRequest,
    IdempotencyStoredReplyError,
    InvalidKeyError,
    PassThrough,
    Reply,
    credential_scope,
    fingerprint,
    parse_idempotency_key,
    problem,
)
from aioidempotency.persistence import InMemoryPersistenceLayer
from tests.helpers import put_record

# -- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc", "abc"),
        ('"abc"', "abc"),
        ("  8e03978e-40d5-43e8-bc93-6894a57f9324 ", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"with space"', "with space"),
        (r'"esc\"aped\\"', 'esc"aped\\'),
        ('"abc";param=1', "abc"),
        ("tok:en/x*", "tok:en/x*"),
        ("x" * 255, "x" * 255),
    ],
)
def test_key_forms_accepted(raw: str, key: str) -> None:
    assert parse_idempotency_key([raw]) == key


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ([], "exactly once"),
        (["a", "b"], "exactly once"),
        ([""], "empty"),
        (['""'], "empty"),
        (["x" * 256], "longer than 255"),
        (['"' + "x" * 256 + '"'], "longer than 255"),
        (["a b"], "not allowed"),
        (["a,b"], "not allowed"),
        (["clé"], "not allowed"),
        (['"open'], "not terminated"),
        (['"a"b'], "after the quoted key"),
        ([r'"bad\n"'], "escape"),
        (['"tab\there"'], "printable ASCII"),
    ],
)
def test_key_forms_rejected(values: list[str], reason: str) -> None:
    with pytest.raises(InvalidKeyError, match=reason):
        parse_idempotency_key(values)


def test_key_length_is_configurable() -> None:
    assert parse_idempotency_key(["abcd"], max_length=4) == "abcd"
    with pytest.raises(InvalidKeyError):
        parse_idempotency_key(["abcde"], max_length=4)


# -- fingerprint, replies, problems -------------------------------------------------------


def test_fingerprint_covers_body_query_and_chosen_headers_only() -> None:
    base = fingerprint(b"{}", query="a=1", headers=[("X-A", "1")], names=["x-a"])
    assert base == fingerprint(b"{}", query="a=1", headers=[("x-a", "1")], names=["X-A"])
    assert base != fingerprint(b"{ }", query="a=1", headers=[("x-a", "1")], names=["x-a"])
    assert base != fingerprint(b"{}", query="a=2", headers=[("x-a", "1")], names=["x-a"])
    assert base != fingerprint(b"{}", query="a=1", headers=[("x-a", "2")], names=["x-a"])
    unchosen = fingerprint(b"{}", headers=[("x-b", "1")])
    assert unchosen == fingerprint(b"{}", headers=[("x-b", "2")])
    # length-prefixed parts: moving bytes between query and body changes the hash
    assert fingerprint(b"b", query="a") != fingerprint(b"", query="ab")


def test_reply_round_trips_through_json_without_excluded_headers() -> None:
    reply = Reply(
        201,
        (
            ("Content-Type", "application/json"),
            ("Date", "Sun, 01 Mar 2026 00:00:00 GMT"),
            ("Set-Cookie", "s=1"),
            ("Connection", "keep-alive"),
            ("Content-Length", "3"),
            ("X-Custom", "a"),
            ("X-Custom", "b"),
        ),
        b"\x00\xffok",
    )
    stored = json.loads(json.dumps(reply.to_stored(), sort_keys=True))
    again = Reply.from_stored(stored)
    assert again.status == 201
    assert again.body == b"\x00\xffok"
    assert again.headers == (
        ("content-type", "application/json"),
        ("x-custom", "a"),
        ("x-custom", "b"),
    )


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"v": 2},
        {"v": 1, "status": 200},
        {"v": 1, "status": 200, "headers": [], "body": "!!"},
    ],
)
def test_from_stored_rejects_foreign_data(data: object) -> None:
    with pytest.raises(ValueError, match="stored"):
        Reply.from_stored(data)


def test_reply_with_header_replaces_case_insensitively() -> None:
    reply = Reply(200, (("X-A", "1"), ("x-a", "2"), ("X-B", "3"))).with_header("x-A", "9")
    assert reply.headers == (("X-B", "3"), ("x-A", "9"))
    assert reply.header("X-a") == "9"
    assert reply.header("missing") is None


def test_problem_is_rfc9457_json() -> None:
    reply = problem(
        409,
        "busy",
        "Busy",
        "Later.",
        type_base="https://docs.example/p#",
        headers=[("Retry-After", "2")],
    )
    assert reply.status == 409
    assert reply.header("content-type") == "application/problem+json"
    assert reply.header("retry-after") == "2"
    assert json.loads(reply.body) == {
        "type": "https://docs.example/p#busy",
        "title": "Busy",
        "status": 409,
        "detail": "Later.",
    }


def test_options_normalise_and_validate() -> None:
    opts = HttpIdempotencyOptions(
        methods=frozenset({"post"}),
        fingerprint_headers=("X-A",),
        excluded_headers=frozenset({"X-B"}),
    )
    assert opts.methods == {"POST"}
    assert opts.fingerprint_headers == ("x-a",)
    assert opts.excluded_headers == {"x-b"}
    for bad in (
        {"header_name": ""},
        {"max_key_length": 0},
        {"max_request_bytes": -1},
        {"retry_after_seconds": -1},
    ):
        with pytest.raises(ValueError, match="must"):
            HttpIdempotencyOptions(**bad)


# -- HttpIdempotency.run ---------------------------------------------------------------------


def _core(store: InMemoryPersistenceLayer | None = None, **fields: object) -> HttpIdempotency:
    options = HttpIdempotencyOptions(**fields)  # type: ignore[arg-type]
    return HttpIdempotency(
        store if store is not None else InMemoryPersistenceLayer(), options=options
    )


def _request(key: str = "k", body: bytes = b"{}", **kw: object) -> HttpRequest:
    return HttpRequest(method="POST", path="/p", key=key, body=body, **kw)  # type: ignore[arg-type]


class _App:
    def __init__(self, *replies: Reply | PassThrough) -> None:
        self.replies = list(replies)
        self.calls = 0

    async def __call__(self) -> Reply | PassThrough:
        self.calls += 1
        return self.replies.pop(0)


async def test_first_reply_is_returned_as_is_and_stored_for_replay() -> None:
    core = _core()
    first = Reply(201, (("content-type", "text/plain"), ("date", "x")), b"made")
    app = _App(first)
    outcome = await core.run(_request(), app)
    assert outcome.response is first
    assert outcome.stored
    again = await core.run(_request(), app)
    assert app.calls == 1
    assert again.replayed
    assert again.response == Reply(
        201, (("content-type", "text/plain"), (REPLAYED_HEADER, "true")), b"made"
    )


@pytest.mark.parametrize(
    ("reply", "reason", "fields"),
    [
        (Reply(500, (), b"x"), "status", {}),
        (Reply(503, (), b"x"), "status", {}),
        (Reply(429, (), b"x"), "status", {"release_when": lambda s: s == 429 or s >= 500}),
        (Reply(200, (), b"x" * 11), "too-large", {"max_response_bytes": 10}),
        (PassThrough("streaming", "obj"), "streaming", {}),
    ],
)
async def test_unstored_replies_release_the_key_and_say_why(
    reply: Reply | PassThrough, reason: str, fields: dict[str, object]
) -> None:
    store = InMemoryPersistenceLayer()
    core = _core(store, **fields)
    ok = Reply(201, (), b"ok")
    app = _App(reply, ok)
    outcome = await core.run(_request(), app)
    assert not outcome.stored
    if isinstance(reply, Reply):
        assert isinstance(outcome.response, Reply)
        assert outcome.response.header(NOT_STORED_HEADER) == reason
        assert outcome.response.body == reply.body
    else:
        assert outcome.response == PassThrough(reason, "obj")
    assert len(store) == 0
    retry = await core.run(_request(), app)
    assert retry.response is ok
    assert app.calls == 2


async def test_4xx_is_stored_by_default() -> None:
    core = _core()
    app = _App(Reply(400, (), b"bad"))
    await core.run(_request(), app)
    again = await core.run(_request(), app)
    assert again.replayed
    assert isinstance(again.response, Reply)
    assert again.response.status == 400
    assert app.calls == 1


async def test_same_key_other_body_is_422_and_other_scope_runs() -> None:
    core = _core()
    app = _App(Reply(201, (), b"a"), Reply(201, (), b"b"), Reply(201, (), b"c"))
    await core.run(_request(body=b"1"), app)
    mismatch = await core.run(_request(body=b"2"), app)
    assert isinstance(mismatch.response, Reply)
    assert mismatch.response.status == 422
    assert json.loads(mismatch.response.body)["type"].endswith("key-reused")
    other_tenant = await core.run(_request(body=b"2", scope="tenant-b"), app)
    other_path = await core.run(HttpRequest(method="POST", path="/q", key="k", body=b"2"), app)
    assert not other_tenant.replayed
    assert not other_path.replayed
    assert app.calls == 3


async def test_busy_key_is_409_with_retry_after() -> None:
    core = _core(retry_after_seconds=3)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> Reply:
        started.set()
        await release.wait()
        return Reply(201, (), b"done")

    first = asyncio.create_task(core.run(_request(), slow))
    await started.wait()
    busy = await core.run(_request(), _App())
    release.set()
    await first
    assert isinstance(busy.response, Reply)
    assert busy.response.status == 409
    assert busy.response.header("retry-after") == "3"


async def test_waiting_duplicate_gets_the_replay() -> None:
    store = InMemoryPersistenceLayer()
    core = HttpIdempotency(store, IdempotencyConfig(wait_for_in_progress_seconds=30))
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> Reply:
        started.set()
        await release.wait()
        return Reply(201, (), b"done")

    first = asyncio.create_task(core.run(_request(), slow))
    await started.wait()
    second = asyncio.create_task(core.run(_request(), _App()))
    # FIFO: the duplicate's first step (up to its wait) runs before the release
    asyncio.get_running_loop().call_soon(release.set)
    assert (await first).stored
    replay = await second
    assert replay.replayed
    assert isinstance(replay.response, Reply)
    assert replay.response.body == b"done"


async def test_exceptions_release_and_propagate() -> None:
    store = InMemoryPersistenceLayer()
    core = _core(store)

    async def crash() -> Reply:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await core.run(_request(), crash)
    assert len(store) == 0


class _DownStore(InMemoryPersistenceLayer):
    """Refuses every claim, or (``complete_fails``) every completion."""

    def __init__(self, *, complete_fails: bool = False) -> None:
        super().__init__()
        self.complete_fails = complete_fails

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        if not self.complete_fails:
            raise IdempotencyPersistenceConnectionError("store down")
        return await super().claim(record, now=now)

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        raise ConnectionError("store down")


async def test_store_down_before_the_app_is_503_and_the_app_never_runs() -> None:
    core = _core(_DownStore())
    app = _App(Reply(201, (), b"x"))
    outcome = await core.run(_request(), app)
    assert isinstance(outcome.response, Reply)
    assert outcome.response.status == 503
    assert outcome.response.header("retry-after") == "1"
    assert app.calls == 0


async def test_store_down_after_the_app_ran_returns_its_reply_unstored() -> None:
    core = _core(_DownStore(complete_fails=True))
    outcome = await core.run(_request(), _App(Reply(201, (), b"charged")))
    assert isinstance(outcome.response, Reply)
    assert outcome.response.body == b"charged"
    assert outcome.response.header(NOT_STORED_HEADER) == "store-error"


async def test_result_too_large_for_the_store_says_too_large() -> None:
    core = _core(InMemoryPersistenceLayer(max_result_bytes=50))
    outcome = await core.run(_request(), _App(Reply(201, (), b"x" * 200)))
    assert isinstance(outcome.response, Reply)
    assert outcome.response.header(NOT_STORED_HEADER) == "too-large"


def test_handles_methods_and_missing_or_bad_keys() -> None:
    core = _core()
    assert core.handles("post")
    assert core.handles("PATCH")
    assert not core.handles("GET")
    assert not core.handles("PUT")
    assert core.parse_key([]) is None
    assert core.parse_key(['"a"']) == "a"
    bad = core.parse_key(["a b"])
    assert isinstance(bad, Reply)
    assert bad.status == 400
    strict = _core(required=True, header_name="X-Key")
    missing = strict.parse_key([])
    assert isinstance(missing, Reply)
    assert missing.status == 400
    assert json.loads(missing.body)["title"] == "X-Key is missing"


def test_storage_key_is_scoped_and_prefixed() -> None:
    core = _core()
    key = core.storage_key("POST", "/p", "k")
    assert key.startswith("aioidempotency.http#")
    assert key == core.storage_key("post", "/p", "k", "")
    assert key != core.storage_key("PATCH", "/p", "k")
    assert key != core.storage_key("POST", "/q", "k")
    assert key != core.storage_key("POST", "/p", "k", "tenant")


# -- the default scope: the caller's credentials ------------------------------------------


def test_credential_scope_is_a_digest_of_the_first_credential_header() -> None:
    alice = credential_scope([("Authorization", "Bearer alice-secret")])
    assert len(alice) == 64
    assert int(alice, 16) >= 0  # hex
    assert "alice" not in alice
    assert alice == credential_scope([("authorization", "Bearer alice-secret")])
    assert alice != credential_scope([("Authorization", "Bearer bob-secret")])
    # Authorization comes first: cookies an API client picked up do not change it
    assert alice == credential_scope([("Cookie", "lb=1"), ("Authorization", "Bearer alice-secret")])
    cookie = credential_scope([("Cookie", "session=a; theme=dark")])
    assert cookie not in ("", alice)
    assert cookie != credential_scope([("Cookie", "session=b; theme=dark")])
    assert credential_scope([("X-Other", "1")]) == ""  # no credentials: anonymous
    assert credential_scope([("Authorization", "Bearer x")], names=()) == ""
    assert credential_scope([("X-Api-Key", "k")], names=("x-api-key",)) != ""


def test_credential_scope_with_named_cookies_ignores_the_others() -> None:
    def scope(header: str) -> str:
        return credential_scope([("Cookie", header)], cookies=("session",))

    assert scope("session=a; theme=dark") == scope("theme=light;session=a")
    assert scope("session=a") != scope("session=b")
    assert scope("theme=dark") == ""  # no session cookie: anonymous


async def test_without_a_scope_requests_are_scoped_by_their_credentials() -> None:
    core = _core()
    app = _App(*(Reply(201, (), f"r{i}".encode()) for i in range(4)))

    def as_caller(*headers: tuple[str, str], body: bytes = b"{}") -> HttpRequest:
        return _request(headers=list(headers), body=body)

    alice = ("Authorization", "Bearer alice")
    first = await core.run(as_caller(alice), app)
    bob = await core.run(as_caller(("Authorization", "Bearer bob"), body=b"other"), app)
    cookie = await core.run(as_caller(("Cookie", "session=c")), app)
    anonymous = await core.run(as_caller(), app)
    assert [o.replayed for o in (first, bob, cookie, anonymous)] == [False] * 4
    assert isinstance(bob.response, Reply)
    assert bob.response.status == 201  # not a 422 against alice's request
    again = await core.run(as_caller(alice, ("Cookie", "lb=2")), app)
    anonymous_again = await core.run(as_caller(("X-Other", "1")), app)
    assert again.replayed
    assert anonymous_again.replayed  # callers without credentials share a scope
    assert app.calls == 4
    assert core.storage_key("POST", "/p", "k") == core.storage_key("POST", "/p", "k", "")


async def test_scope_headers_empty_shares_keys_and_an_explicit_scope_wins() -> None:
    shared = _core(scope_headers=())
    app = _App(Reply(201, (), b"a"))
    await shared.run(_request(headers=[("Authorization", "Bearer alice")]), app)
    other = await shared.run(_request(headers=[("Authorization", "Bearer bob")]), app)
    assert other.replayed
    scoped = _core()
    app = _App(Reply(201, (), b"a"))
    await scoped.run(_request(scope="t", headers=[("Authorization", "Bearer alice")]), app)
    same_tenant = await scoped.run(
        _request(scope="t", headers=[("Authorization", "Bearer bob")]), app
    )
    assert same_tenant.replayed  # scope_by decides; credentials no longer count
    assert app.calls == 1


def test_scope_options_are_normalised_and_checked() -> None:
    opts = HttpIdempotencyOptions(scope_headers=["Authorization"], scope_cookies=["sid"])
    assert opts.scope_headers == ("authorization",)
    assert opts.scope_cookies == ("sid",)
    with pytest.raises(ValueError, match="sequences"):
        HttpIdempotencyOptions(scope_headers="authorization")


def test_scope_missing_is_a_400_problem() -> None:
    reply = _core().scope_missing()
    assert reply.status == 400
    assert json.loads(reply.body)["type"].endswith(":scope-missing")


# -- what the store holds -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"v": 1, "status": 99, "headers": [], "body": ""},
        {"v": 1, "status": 101, "headers": [], "body": ""},
        {"v": 1, "status": True, "headers": [], "body": ""},
        {"v": 1, "status": "200", "headers": [], "body": ""},
        {"v": True, "status": 200, "headers": [], "body": ""},
        {"v": 1, "status": 200, "headers": "ab", "body": ""},
        {"v": 1, "status": 200, "headers": [["a"]], "body": ""},
        {"v": 1, "status": 200, "headers": [["a", 1]], "body": ""},
        {"v": 1, "status": 200, "headers": [["bad name", "1"]], "body": ""},
        {"v": 1, "status": 200, "headers": [["x", "1\r\nset-cookie: s=1"]], "body": ""},
        {"v": 1, "status": 200, "headers": [["x", "\u2603"]], "body": ""},
        {"v": 1, "status": 200, "headers": [], "body": 5},
        [1, 2],
        "text",
    ],
)
def test_from_stored_refuses_what_it_cannot_send_with_a_typed_error(data: object) -> None:
    with pytest.raises(IdempotencyStoredReplyError, match="not a stored HTTP response") as info:
        Reply.from_stored(data)
    assert isinstance(info.value, IdempotencyError)
    assert isinstance(info.value, ValueError)


def test_from_stored_keeps_latin1_header_values() -> None:
    reply = Reply(200, (("x-name", "caf\xe9"),), b"")
    assert Reply.from_stored(json.loads(json.dumps(reply.to_stored()))) == reply


def _completed(core: HttpIdempotency, data: str, body: bytes = b"{}") -> DataRecord:
    return DataRecord(
        idempotency_key=core.storage_key("POST", "/p", "k"),
        status=RecordStatus.COMPLETED,
        expiry_timestamp=int(time.time()) + 3600,
        response_data=data,
        payload_hash=hash_data(fingerprint(body)),
    )


async def test_a_foreign_result_under_the_key_is_a_500_problem_with_a_typed_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = InMemoryPersistenceLayer()
    core = _core(store)
    record = _completed(core, json.dumps({"amount": 5}))
    put_record(store, record)
    app = _App(Reply(201, (), b"x"))
    with caplog.at_level(logging.INFO, logger="aioidempotency.web"):
        outcome = await core.run(_request(), app)
    assert app.calls == 0
    assert isinstance(outcome.response, Reply)
    assert outcome.response.status == 500
    assert outcome.response.header("retry-after") is None
    assert json.loads(outcome.response.body)["type"].endswith(":stored-reply-invalid")
    assert isinstance(outcome.error, IdempotencyStoredReplyError)
    assert outcome.error.key == record.idempotency_key
    assert await store.get(record.idempotency_key) == record  # left for an operator
    [logged] = [r for r in caplog.records if r.name == "aioidempotency.web"]
    assert logged.levelno == logging.WARNING
    assert record.idempotency_key in logged.getMessage()
    assert "stored-reply-invalid" in logged.getMessage()


class _FailingStore(InMemoryPersistenceLayer):
    """Every claim raises `error`: fault injection for the middleware's answers."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (IdempotencyInvalidRecordError("not a record", key="k"), 500, "stored-record-invalid"),
        (
            IdempotencyInvalidStatusError("record 'k' has an invalid status"),
            500,
            "stored-record-invalid",
        ),
        (IdempotencyPersistenceLayerError("NOAUTH authentication required"), 500, "store-error"),
        (IdempotencyPersistenceConfigError("no such table"), 500, "store-misconfigured"),
        (IdempotencyPersistenceAccessDeniedError("WRONGPASS"), 500, "store-misconfigured"),
        (IdempotencyPersistenceConnectionError("timed out"), 503, "store-unavailable"),
    ],
    ids=["invalid-record", "invalid-status", "other", "config", "access-denied", "unreachable"],
)
async def test_store_errors_are_503_only_when_transient(
    error: Exception, status: int, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    core = _core(_FailingStore(error))
    app = _App(Reply(201, (), b"x"))
    request = _request(headers=[("Authorization", "Bearer secret-token")], body=b"card=4242")
    with caplog.at_level(logging.INFO, logger="aioidempotency.web"):
        outcome = await core.run(request, app)
    assert app.calls == 0
    assert outcome.error is not None
    assert outcome.error is error or outcome.error.__cause__ is error  # the engine's wrap
    assert isinstance(outcome.response, Reply)
    assert outcome.response.status == status
    assert json.loads(outcome.response.body)["type"].endswith(f":{kind}")
    retry_after = outcome.response.header("retry-after")
    assert retry_after == ("1" if status == 503 else None)
    [logged] = [r for r in caplog.records if r.name == "aioidempotency.web"]
    assert logged.levelno == logging.WARNING
    text = caplog.text
    assert kind in text
    assert type(outcome.error).__name__ in text
    storage_key = core.storage_key("POST", "/p", "k", credential_scope(request.headers))
    assert storage_key in text
    assert "secret-token" not in text
    assert "4242" not in text


async def test_409_and_422_are_logged_at_info_with_the_storage_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = _core()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> Reply:
        started.set()
        await release.wait()
        return Reply(201, (), b"done")

    first = asyncio.create_task(core.run(_request(body=b"1"), slow))
    await started.wait()
    with caplog.at_level(logging.INFO, logger="aioidempotency.web"):
        busy = await core.run(_request(body=b"1"), _App())
        release.set()
        await first
        mismatch = await core.run(_request(body=b"secret-body"), _App())
    assert isinstance(busy.response, Reply)
    assert isinstance(mismatch.response, Reply)
    assert [busy.response.status, mismatch.response.status] == [409, 422]
    key = core.storage_key("POST", "/p", "k")
    web = [r for r in caplog.records if r.name == "aioidempotency.web"]
    assert [(r.levelno, key in r.getMessage()) for r in web] == [
        (logging.INFO, True),
        (logging.INFO, True),
    ]
    assert "secret-body" not in caplog.text
