"""The DynamoDB store under faults: dead and frozen endpoints, lost replies, a fork with
a client passed in, and items that are not usable records."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency._async.dynamodb import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_READ_TIMEOUT,
    DynamoDBPersistenceLayer,
)
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._urls import store_from_url
from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from tests.backends.dynamodb import counting_requests, fresh_store, inject_error
from tests.faults_dynamodb import ReplyDroppingProxy, frozen_server
from tests.servers.moto import MotoServer, free_port

BOUND = 20.0
"""Seconds a failing request may take at most in these tests (botocore's defaults took
25-50 s against a closed port and never answered for a frozen server)."""


def in_progress(key: str | None = None, lease_ms: int | None = None) -> DataRecord:
    return DataRecord(
        idempotency_key=key or f"fn#{uuid.uuid4().hex}",
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(time.time()) + 600,
        in_progress_expiry_timestamp=lease_ms,
        owner=uuid.uuid4().hex,
    )


def completed(claim: DataRecord, data: str = '{"paid": 1}') -> DataRecord:
    return DataRecord(
        idempotency_key=claim.idempotency_key,
        status=RecordStatus.COMPLETED,
        expiry_timestamp=claim.expiry_timestamp + 60,
        response_data=data,
    )


async def raw_item(store: DynamoDBPersistenceLayer, key: str) -> dict[str, Any] | None:
    client = await store.client()
    response = await client.get_item(
        TableName=store.table_name, Key={"id": {"S": key}}, ConsistentRead=True
    )
    item: dict[str, Any] | None = response.get("Item")
    return item


# -- dead and frozen endpoints ---------------------------------------------------------------


async def _fail_timed(layer: DynamoDBPersistenceLayer) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(IdempotencyPersistenceLayerError) as error:
        await asyncio.wait_for(layer.claim(in_progress(), now=time.time()), BOUND)
    return error.value, time.monotonic() - started


async def test_a_closed_port_gives_the_typed_error_quickly(
    aws_session: Any, record_property: Any
) -> None:
    layer = DynamoDBPersistenceLayer(
        "t", endpoint_url=f"http://127.0.0.1:{free_port()}", session=aws_session
    )
    try:
        error, seconds = await _fail_timed(layer)
    finally:
        await layer.aclose()
    record_property("seconds_to_error", round(seconds, 2))
    assert isinstance(error, IdempotencyPersistenceConnectionError)
    assert error.transient
    assert isinstance(error.__cause__, EndpointConnectionError)


async def test_a_frozen_server_gives_the_typed_error_within_the_read_timeouts(
    aws_session: Any, record_property: Any
) -> None:
    with frozen_server() as server:
        layer = DynamoDBPersistenceLayer("t", endpoint_url=server.endpoint_url, session=aws_session)
        try:
            error, seconds = await _fail_timed(layer)
        finally:
            await layer.aclose()
        attempts = server.connections
    record_property("seconds_to_error", round(seconds, 2))
    assert isinstance(error, IdempotencyPersistenceConnectionError)
    assert isinstance(error.__cause__, ReadTimeoutError)
    assert "did not answer in time" in str(error)
    assert attempts == DEFAULT_MAX_ATTEMPTS  # each attempt after a timeout: a new connection


async def test_the_url_sets_the_timeouts_and_attempts(aws_session: Any) -> None:
    with frozen_server() as server:
        layer = store_from_url(
            f"dynamodb://t?endpoint_url={server.endpoint_url}"
            "&connect_timeout=0.5&read_timeout=0.2&max_attempts=3"
        )
        assert isinstance(layer, DynamoDBPersistenceLayer)
        layer._session = aws_session  # the suite's: its credentials, its model cache
        try:
            error, _ = await _fail_timed(layer)
            config = (await layer.client()).meta.config
        finally:
            await layer.aclose()
        attempts = server.connections
    assert isinstance(error, IdempotencyPersistenceConnectionError)
    assert (config.connect_timeout, config.read_timeout) == (0.5, 0.2)
    assert attempts == 3


@pytest.mark.parametrize(
    "fault",
    [
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ],
    ids=["connect-timeout", "read-timeout"],
)
async def test_timeouts_are_connection_errors(
    moto_server: MotoServer, aws_session: Any, fault: Exception
) -> None:
    layer = DynamoDBPersistenceLayer(
        "t", endpoint_url=moto_server.endpoint_url, session=aws_session, max_attempts=2
    )
    sent = 0

    def fail(**_: Any) -> None:
        nonlocal sent
        sent += 1
        raise fault

    (await layer.client()).meta.events.register("before-send.dynamodb", fail)
    try:
        with pytest.raises(IdempotencyPersistenceConnectionError) as error:
            await asyncio.wait_for(layer.get("fn#k"), BOUND)
    finally:
        await layer.aclose()
    assert error.value.__cause__ is fault
    assert sent == 2  # retried once, as max_attempts says


async def test_a_server_side_outage_is_transient(moto_server: MotoServer, user_client: Any) -> None:
    async with fresh_store(moto_server, client=user_client) as store:
        inject_error(user_client, "PutItem", "ServiceUnavailable")
        with pytest.raises(IdempotencyPersistenceConnectionError, match="unavailable") as error:
            await store.claim(in_progress(), now=time.time())
    assert error.value.transient


# -- the client configuration ------------------------------------------------------------------


def retries_of(config: Any) -> dict[str, Any]:
    return dict(config.retries or {})


async def test_own_clients_get_bounded_timeouts_and_retries(
    moto_server: MotoServer, aws_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    layer = DynamoDBPersistenceLayer(
        "t", endpoint_url=moto_server.endpoint_url, session=aws_session
    )
    try:
        config = (await layer.client()).meta.config
    finally:
        await layer.aclose()
    assert config.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert config.read_timeout == DEFAULT_READ_TIMEOUT
    assert retries_of(config) == {"total_max_attempts": DEFAULT_MAX_ATTEMPTS, "mode": "standard"}


async def test_explicit_boto_config_values_win_and_the_rest_is_bounded(
    moto_server: MotoServer, aws_session: Any
) -> None:
    user = AioConfig(
        read_timeout=9,
        retries={"mode": "adaptive"},
        connector_args={"keepalive_timeout": 7},
        max_pool_connections=33,
    )
    layer = DynamoDBPersistenceLayer(
        "t",
        endpoint_url=moto_server.endpoint_url,
        session=aws_session,
        boto_config=user,
        connect_timeout=1.5,
        read_timeout=1.0,
    )
    try:
        config = (await layer.client()).meta.config
    finally:
        await layer.aclose()
    assert config.read_timeout == 9  # the user's
    assert config.connect_timeout == 1.5  # the constructor's, boto_config left it unset
    assert retries_of(config) == {"mode": "adaptive", "total_max_attempts": DEFAULT_MAX_ATTEMPTS}
    assert config.max_pool_connections == 33
    assert config.connector_args["keepalive_timeout"] == 7
    assert user.read_timeout == 9  # the user's config is left as it was
    assert user.connect_timeout == 60


def test_the_aws_configuration_of_attempts_wins_over_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiobotocore.session import AioSession

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "6")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    session = AioSession()
    default = DynamoDBPersistenceLayer("t").client_config(session)
    assert retries_of(default) == {}  # left to botocore, which reads the environment
    explicit = DynamoDBPersistenceLayer("t", max_attempts=3).client_config(session)
    assert retries_of(explicit) == {"total_max_attempts": 3}


@pytest.mark.parametrize(
    "query",
    ["read_timeout=soon", "max_attempts=1.5", "max_attempts=0", "connect_timeout=-1"],
)
def test_bad_timeouts_are_configuration_errors(query: str) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError):
        DynamoDBPersistenceLayer.from_url(f"dynamodb://t?{query}")


# -- a fork with a client passed in ------------------------------------------------------------


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _wait_child(pid: int, timeout: float) -> int:
    """The exit code of a forked child; killed if it has not exited within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"the forked child {pid} did not exit within {timeout} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
async def test_a_client_passed_in_is_refused_in_a_forked_child(
    moto_server: MotoServer, user_client: Any
) -> None:
    async with fresh_store(moto_server, client=user_client) as store:
        claim = in_progress()
        assert (await store.claim(claim, now=time.time())).claimed
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            answer = "no answer"
            try:
                os.close(read_fd)

                async def child() -> str:
                    try:
                        await store.get(claim.idempotency_key)
                    except IdempotencyPersistenceConfigError as exc:
                        return f"refused: {exc}"
                    return "used the parent's client"

                answer = asyncio.run(asyncio.wait_for(child(), 10))
            except BaseException as exc:
                answer = repr(exc)
            finally:
                os.write(write_fd, answer.encode())
                os._exit(0)
        os.close(write_fd)
        try:
            answer = (await asyncio.wait_for(asyncio.to_thread(_read_all, read_fd), 30)).decode()
        finally:
            os.close(read_fd)
            exit_code = await asyncio.to_thread(_wait_child, pid, 30)
        assert exit_code == 0
        assert answer.startswith("refused: "), answer
        assert "table_name=" in answer
        assert "client=" in answer
        assert await store.get(claim.idempotency_key) == claim  # the parent's client still works


# -- lost replies: every write is safe to repeat -------------------------------------------------


@pytest.fixture
async def proxied(moto_server: MotoServer, aws_session: Any) -> Any:
    """A store whose requests go through a `ReplyDroppingProxy` in front of moto."""
    async with (
        ReplyDroppingProxy(moto_server.host, moto_server.port) as proxy,
        fresh_store(
            moto_server, session=aws_session, endpoint_url=proxy.endpoint_url, max_attempts=3
        ) as store,
    ):
        yield store, proxy


async def test_a_claim_resent_after_a_lost_reply_returns_the_callers_own_record(
    proxied: tuple[DynamoDBPersistenceLayer, ReplyDroppingProxy],
) -> None:
    store, proxy = proxied
    claim = in_progress(lease_ms=int(time.time() * 1000) + 60_000)
    proxy.drop("PutItem")
    result = await asyncio.wait_for(store.claim(claim, now=time.time()), BOUND)
    assert (proxy.seen["PutItem"], proxy.dropped["PutItem"]) == (2, 1)
    assert not result.claimed
    assert result.existing == claim  # the owner token says: this claim is ours


async def test_the_same_claim_twice_returns_the_owners_record(
    store_dynamodb_simple: DynamoDBPersistenceLayer,
) -> None:
    store = store_dynamodb_simple
    claim = in_progress()
    assert (await store.claim(claim, now=time.time())).claimed
    again = await store.claim(claim, now=time.time())
    assert not again.claimed
    assert again.existing is not None
    assert again.existing.owner == claim.owner


async def test_a_completion_resent_after_a_lost_reply_succeeds(
    proxied: tuple[DynamoDBPersistenceLayer, ReplyDroppingProxy],
) -> None:
    store, proxy = proxied
    claim = in_progress()
    assert (await store.claim(claim, now=time.time())).claimed
    assert claim.owner is not None
    proxy.drop("UpdateItem")
    await asyncio.wait_for(store.complete(completed(claim), owner=claim.owner), BOUND)
    assert (proxy.seen["UpdateItem"], proxy.dropped["UpdateItem"]) == (2, 1)
    stored = await store.get(claim.idempotency_key)
    assert stored is not None
    assert (stored.status, stored.response_data) == (RecordStatus.COMPLETED, '{"paid": 1}')


async def test_the_same_completion_twice_succeeds_and_another_owners_is_refused(
    store_dynamodb_simple: DynamoDBPersistenceLayer,
) -> None:
    from aioidempotency.exceptions import IdempotencyClaimLostError

    store = store_dynamodb_simple
    claim = in_progress()
    await store.claim(claim, now=time.time())
    assert claim.owner is not None
    await store.complete(completed(claim), owner=claim.owner)
    await store.complete(completed(claim), owner=claim.owner)
    with pytest.raises(IdempotencyClaimLostError):
        await store.complete(completed(claim, '"other"'), owner="someone-else")
    await store.release(claim.idempotency_key, owner=claim.owner)  # completed: kept
    stored = await store.get(claim.idempotency_key)
    assert stored is not None
    assert stored.response_data == '{"paid": 1}'


async def test_release_and_renew_resent_after_a_lost_reply_succeed(
    proxied: tuple[DynamoDBPersistenceLayer, ReplyDroppingProxy],
) -> None:
    store, proxy = proxied
    claim = in_progress(lease_ms=int(time.time() * 1000) + 10_000)
    assert (await store.claim(claim, now=time.time())).claimed
    until = int(time.time() * 1000) + 90_000
    proxy.drop("UpdateItem")
    await asyncio.wait_for(
        store.renew(dataclasses.replace(claim, in_progress_expiry_timestamp=until)), BOUND
    )
    assert await store.get(claim.idempotency_key) == dataclasses.replace(
        claim, in_progress_expiry_timestamp=until
    )
    assert claim.owner is not None
    proxy.drop("DeleteItem")
    await asyncio.wait_for(store.release(claim.idempotency_key, owner=claim.owner), BOUND)
    assert (proxy.seen["DeleteItem"], proxy.dropped["DeleteItem"]) == (2, 1)
    assert await raw_item(store, claim.idempotency_key) is None


@pytest.mark.parametrize("lost", ["PutItem", "UpdateItem"])
async def test_the_engine_runs_once_when_a_reply_is_lost(
    proxied: tuple[DynamoDBPersistenceLayer, ReplyDroppingProxy], lost: str
) -> None:
    store, proxy = proxied
    engine = IdempotencyEngine(store, IdempotencyConfig(), key_prefix="orders")
    runs = 0

    async def pay() -> dict[str, int]:
        nonlocal runs
        runs += 1
        return {"paid": 42}

    proxy.drop(lost)
    assert await asyncio.wait_for(engine.run({"order": 1}, pay), BOUND) == {"paid": 42}
    assert proxy.dropped[lost] == 1
    with counting_requests(await store.client()) as requests:
        assert await asyncio.wait_for(engine.run({"order": 1}, pay), BOUND) == {"paid": 42}
    assert requests.counts == {"PutItem": 1}  # a replay: one request
    assert runs == 1


# -- items that are not usable records ------------------------------------------------------------

PAST = {"N": str(int(time.time()) - 3600)}
FUTURE = {"N": str(int(time.time()) + 3600)}
PAST_MS = {"N": str(int(time.time() * 1000) - 60_000)}

UNUSABLE: dict[str, dict[str, Any]] = {
    "expiration-as-text": {"status": {"S": "INPROGRESS"}, "expiration": {"S": PAST["N"]}},
    "no-status": {"expiration": PAST},
    "number-status": {"status": {"N": "1"}, "expiration": PAST},
    "stored-expired-status": {"status": {"S": "EXPIRED"}, "expiration": PAST},
    "bool-status": {"status": {"BOOL": True}, "expiration": PAST},
    "data-as-number": {"status": {"S": "COMPLETED"}, "expiration": PAST, "data": {"N": "123"}},
    "data-null": {"status": {"S": "COMPLETED"}, "expiration": FUTURE, "data": {"NULL": True}},
    "lease-as-text": {
        "status": {"S": "INPROGRESS"},
        "expiration": PAST,
        "in_progress_expiration": {"S": PAST_MS["N"]},
    },
    "lease-null": {
        "status": {"S": "INPROGRESS"},
        "expiration": PAST,
        "in_progress_expiration": {"NULL": True},
    },
    "no-expiration": {"status": {"S": "INPROGRESS"}, "in_progress_expiration": PAST_MS},
}


@pytest.mark.parametrize("shape", sorted(UNUSABLE))
async def test_an_unusable_item_is_refused_and_never_overwritten(
    store_dynamodb_simple: DynamoDBPersistenceLayer, shape: str
) -> None:
    store = store_dynamodb_simple
    key = f"fn#{shape}"
    item = {"id": {"S": key}, **UNUSABLE[shape]}
    client = await store.client()
    await client.put_item(TableName=store.table_name, Item=item)
    with pytest.raises(IdempotencyInvalidStatusError):
        await store.claim(in_progress(key), now=time.time())
    assert await raw_item(store, key) == item
    with pytest.raises(IdempotencyInvalidStatusError):
        await store.get(key)


NOW_S = 1_767_225_600  # a fixed "now" for the property test: the items are built around it


def _number(base: int, offset: int, fraction: bool) -> dict[str, str]:
    return {"N": f"{base + offset}.5" if fraction else str(base + offset)}


_VALUE_KINDS = st.sampled_from(["N", "N.5", "S", "NULL", "BOOL", "absent"])


@st.composite
def items(draw: st.DrawFn) -> tuple[dict[str, Any], float]:
    """Items around a fixed `now`: well-typed mostly, with mistyped attributes mixed in."""
    now = NOW_S + draw(st.sampled_from([0.0, 0.25, 0.5, 0.999]))
    now_ms = int(now * 1000)
    item: dict[str, Any] = {}
    status = draw(st.sampled_from(["INPROGRESS", "COMPLETED", "EXPIRED", None, 7]))
    if isinstance(status, str):
        item["status"] = {"S": status}
    elif status is not None:
        item["status"] = {"N": str(status)}
    for name, base, span, required in (
        ("expiration", NOW_S, 2, True),
        ("in_progress_expiration", now_ms, 2, False),
    ):
        kind = draw(_VALUE_KINDS if draw(st.booleans()) else st.sampled_from(["N", "N.5"]))
        if kind == "absent" and required and draw(st.booleans()):
            kind = "N"
        if not required and draw(st.booleans()):
            kind = "absent"
        offset = draw(st.integers(-span, span))
        if kind in ("N", "N.5"):
            item[name] = _number(base, offset, kind == "N.5")
        elif kind == "S":
            item[name] = {"S": str(base + offset)}
        elif kind == "NULL":
            item[name] = {"NULL": True}
        elif kind == "BOOL":
            item[name] = {"BOOL": False}
    data = draw(st.sampled_from(["text", "number", "absent"]))
    if data == "text":
        item["data"] = {"S": '{"ok": 1}'}
    elif data == "number":
        item["data"] = {"N": "1"}
    return item, now


def _python_reading(store: DynamoDBPersistenceLayer, item: dict[str, Any]) -> Any:
    """What `records.py` makes of the item: the record, or the error it raises."""
    plain: dict[str, Any] = {}
    for name, value in item.items():
        if "S" in value:
            plain[name] = value["S"]
        elif "N" in value:
            number = Decimal(value["N"])
            plain[name] = int(number) if number == number.to_integral_value() else number
        else:
            plain[name] = dict(value)
    try:
        return store.attributes.from_mapping("fn#k", plain)
    except IdempotencyInvalidStatusError as exc:
        return exc


async def test_the_claim_condition_and_the_record_reader_agree(
    store_dynamodb_simple: DynamoDBPersistenceLayer,
) -> None:
    """DynamoDB's condition and `records.py` classify every item alike (one reader of
    records, docs/reliability.md): claimed iff `records.py` reads a claimable record; an
    item it refuses is refused by the claim too (the error propagates) and left unchanged."""
    store = store_dynamodb_simple
    loop = asyncio.get_running_loop()
    client = await store.client()
    checked = {"claimed": 0, "refused": 0, "invalid": 0}

    async def check(item: dict[str, Any], now: float) -> None:
        key = f"fn#{uuid.uuid4().hex}"
        stored = {"id": {"S": key}, **item}
        await client.put_item(TableName=store.table_name, Item=stored)
        reading = _python_reading(store, stored)
        claim = dataclasses.replace(in_progress(key), expiry_timestamp=NOW_S + 3600)
        if isinstance(reading, IdempotencyInvalidStatusError):
            with pytest.raises(IdempotencyInvalidStatusError):
                await store.claim(claim, now=now)
            assert await raw_item(store, key) == stored
            checked["invalid"] += 1
            return
        result = await store.claim(claim, now=now)
        expected = reading.is_claimable(now)
        assert result.claimed is expected, (stored, now)
        if result.claimed:
            checked["claimed"] += 1
        else:
            assert result.existing == dataclasses.replace(reading, idempotency_key=key)
            checked["refused"] += 1

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(items())
    def property_holds(case: tuple[dict[str, Any], float]) -> None:
        asyncio.run_coroutine_threadsafe(check(*case), loop).result(timeout=30)

    await asyncio.wait_for(asyncio.to_thread(property_holds), 300)
    assert all(checked.values()), checked  # every class of item was exercised


async def test_the_engine_names_the_unusable_key_and_runs_nothing(
    store_dynamodb_simple: DynamoDBPersistenceLayer,
) -> None:
    from aioidempotency.exceptions import IdempotencyInvalidRecordError

    store = store_dynamodb_simple
    engine = IdempotencyEngine(store, IdempotencyConfig(), key_prefix="orders")
    key = engine.idempotency_key({"order": 9})
    item = {"id": {"S": key}, **UNUSABLE["expiration-as-text"]}
    await (await store.client()).put_item(TableName=store.table_name, Item=item)
    runs = 0

    async def pay() -> int:
        nonlocal runs
        runs += 1
        return 1

    with pytest.raises(IdempotencyInvalidRecordError) as error:
        await engine.run({"order": 9}, pay)
    assert error.value.key == key
    assert isinstance(error.value.__cause__, IdempotencyInvalidStatusError)
    assert runs == 0
    assert await raw_item(store, key) == item
