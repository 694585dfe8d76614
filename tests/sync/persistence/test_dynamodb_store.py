"""The native sync DynamoDB store (boto3) on moto's server.

What `SyncDynamoDBPersistenceLayer` writes and sends beyond the persistence contract
(tests/sync/persistence/test_contract.py runs that on it); one `DynamoDBPersistenceLayer`
serving `@idempotent` (natively, through boto3) and `@idempotent_async` with the same
requests per call; Powertools' constructor arguments; clients and sessions of either
kind; forks; bounded timeouts and connections; records shared with the async store
and with Powertools.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

from aioidempotency import (
    IdempotencyConfig,
    IdempotencyEngine,
    SyncIdempotencyEngine,
    idempotent,
    idempotent_async,
    idempotent_function,
    idempotent_function_async,
)
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._sync.bridge import BridgedStore
from aioidempotency._sync.clients import OpenedClients
from aioidempotency._sync.dynamodb import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_READ_TIMEOUT,
    MAX_ITEM_BYTES,
    SyncDynamoDBPersistenceLayer,
)
from aioidempotency._twins import as_sync_store
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceMisconfiguredError,
    IdempotencyResultTooLargeError,
)
from tests.backends.dynamodb import (
    COMPOSITE,
    CUSTOM_ATTRS,
    counting_requests,
    fresh_store,
    new_table_name,
)
from tests.faults.proxy import FaultProxy
from tests.faults_dynamodb import frozen_server
from tests.persistence.test_dynamodb_store import claim_record, completed_record, key_of, renewed
from tests.servers.moto import MotoServer, free_port

pytestmark = pytest.mark.filterwarnings(
    "ignore:Couldn't determine the remaining time left:UserWarning"  # Powertools, no context
)

NOW = time.time()
ORDER = {"order_id": "o-1", "amount": 42}
BOUND = 20.0
"""Seconds a failing call may take at most here (botocore's defaults: minutes)."""
OPTIONS: dict[str, dict[str, Any]] = {"simple": {}, "composite": COMPOSITE, "custom": CUSTOM_ATTRS}


@contextlib.contextmanager
def sync_store(server: MotoServer, **options: Any) -> Iterator[SyncDynamoDBPersistenceLayer]:
    """A sync layer on a new table of its own; the table is deleted and the layer closed after."""
    options.setdefault("endpoint_url", server.endpoint_url)
    store = SyncDynamoDBPersistenceLayer(new_table_name(), **options)
    assert store.create_table(exist_ok=False)
    try:
        yield store
    finally:
        store.client().delete_table(TableName=store.table_name)
        store.close()


@pytest.fixture(params=list(OPTIONS))
def ddb(
    request: pytest.FixtureRequest, moto_server: MotoServer, boto3_session: Any
) -> Iterator[SyncDynamoDBPersistenceLayer]:
    with sync_store(moto_server, session=boto3_session, **OPTIONS[request.param]) as store:
        yield store


def raw_item(store: SyncDynamoDBPersistenceLayer, key: str) -> dict[str, Any] | None:
    response = store.client().get_item(
        TableName=store.table_name,
        Key=key_of(store, key),  # type: ignore[arg-type]
        ConsistentRead=True,
    )
    item: dict[str, Any] | None = response.get("Item")
    return item


class Calls:
    """A function that counts its executions (and the threads it ran in)."""

    def __init__(self, result: Any = "ok", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.count = 0

    def __call__(self) -> Any:
        self.count += 1
        if self.error is not None:
            raise self.error
        return self.result


# -- items and requests --------------------------------------------------------------------------


def test_claim_writes_the_reference_item_plus_the_owner(ddb: SyncDynamoDBPersistenceLayer) -> None:
    record = claim_record(in_progress_ms=int(NOW * 1000) + 60_000, payload_hash="h" * 32)
    assert ddb.claim(record, now=NOW).claimed
    attrs = ddb.attributes
    assert raw_item(ddb, record.idempotency_key) == {
        **key_of(ddb, record.idempotency_key),  # type: ignore[arg-type]
        attrs.expiry_attr: {"N": str(record.expiry_timestamp)},
        attrs.status_attr: {"S": "INPROGRESS"},
        attrs.in_progress_expiry_attr: {"N": str(record.in_progress_expiry_timestamp)},
        attrs.validation_key_attr: {"S": "h" * 32},
        attrs.owner_attr: {"S": record.owner},
    }


def test_a_refused_claim_returns_the_stored_record_in_one_request(
    ddb: SyncDynamoDBPersistenceLayer,
) -> None:
    first = claim_record(in_progress_ms=int(NOW * 1000) + 60_000, payload_hash="p")
    assert ddb.claim(first, now=NOW).claimed
    with counting_requests(ddb.client()) as requests:
        refused = ddb.claim(claim_record(first.idempotency_key), now=NOW)
    assert requests.counts == {"PutItem": 1}
    assert not refused.claimed
    assert refused.existing == first
    assert type(refused.existing.expiry_timestamp) is int


def test_a_late_owner_can_neither_complete_renew_nor_release(
    ddb: SyncDynamoDBPersistenceLayer,
) -> None:
    late = claim_record(in_progress_ms=int(NOW * 1000) + 1_000)
    ddb.claim(late, now=NOW)
    new = claim_record(late.idempotency_key, in_progress_ms=int(NOW * 1000) + 60_000)
    assert ddb.claim(new, now=NOW + 2).claimed
    new_item = raw_item(ddb, new.idempotency_key)
    assert late.owner is not None
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        ddb.complete(completed_record(late, '"late"'), owner=late.owner)
    with pytest.raises(IdempotencyClaimLostError):
        ddb.renew(renewed(late))
    ddb.release(late.idempotency_key, owner=late.owner)
    assert raw_item(ddb, new.idempotency_key) == new_item


def test_completion_is_safe_to_repeat_and_never_creates_a_partial_item(
    ddb: SyncDynamoDBPersistenceLayer,
) -> None:
    claim = claim_record()
    ddb.claim(claim, now=NOW)
    assert claim.owner is not None
    done = completed_record(claim)
    ddb.complete(done, owner=claim.owner)
    ddb.complete(done, owner=claim.owner)  # resent after a lost reply: recognised as ours
    stored = ddb.get(claim.idempotency_key)
    assert stored is not None
    assert (stored.status, stored.response_data) == (RecordStatus.COMPLETED, '{"ok": true}')
    gone = claim_record()
    ddb.claim(gone, now=NOW)
    assert ddb.delete(gone.idempotency_key)
    assert gone.owner is not None
    with pytest.raises(IdempotencyClaimLostError, match="is gone"):
        ddb.complete(completed_record(gone), owner=gone.owner)
    assert raw_item(ddb, gone.idempotency_key) is None


def test_get_and_delete(ddb: SyncDynamoDBPersistenceLayer) -> None:
    assert ddb.get("fn#missing") is None
    assert not ddb.delete("fn#missing")
    expired = claim_record("fn#expired", expiry=int(time.time()) - 5)
    assert ddb.claim(expired, now=time.time() - 10).claimed
    assert ddb.get("fn#expired") is None  # expired: as good as absent
    assert ddb.delete("fn#expired")
    assert raw_item(ddb, "fn#expired") is None


def test_a_malformed_item_is_a_typed_error(moto_server: MotoServer, boto3_session: Any) -> None:
    with sync_store(moto_server, session=boto3_session) as store:
        store.client().put_item(
            TableName=store.table_name,
            Item={"id": {"S": "fn#bad"}, "expiration": {"N": "9999999999"}, "status": {"S": "?"}},
        )
        with pytest.raises(IdempotencyInvalidStatusError):
            store.get("fn#bad")
        with pytest.raises(IdempotencyInvalidStatusError):
            store.claim(claim_record("fn#bad"), now=NOW)


def test_a_result_over_400_kb_is_refused_before_any_request(
    ddb: SyncDynamoDBPersistenceLayer,
) -> None:
    claim = claim_record()
    ddb.claim(claim, now=NOW)
    assert claim.owner is not None
    too_big = completed_record(claim, '"' + "é" * 205_000 + '"')
    with (
        counting_requests(ddb.client()) as requests,
        pytest.raises(IdempotencyResultTooLargeError) as error,
    ):
        ddb.complete(too_big, owner=claim.owner)
    assert requests.total == 0
    assert error.value.limit == MAX_ITEM_BYTES
    assert ddb.get(claim.idempotency_key) == claim


# -- one store, both decorator kinds -------------------------------------------------------------


@pytest.mark.parametrize("options", ["simple", "composite"])
async def test_requests_per_call_are_the_same_sync_and_async(
    moto_server: MotoServer, options: str
) -> None:
    """First execution 2, replay 1, failure 2, on both paths of one store object."""
    async with fresh_store(moto_server, **OPTIONS[options]) as store:
        engine = IdempotencyEngine(store, key_prefix="async")
        sync_engine = SyncIdempotencyEngine(store, key_prefix="sync")
        twin = sync_engine.persistence_store
        assert type(twin) is SyncDynamoDBPersistenceLayer

        async def on_async() -> list[dict[str, int]]:
            fn, counts = Calls({"id": 7}), []
            with counting_requests(await store.client()) as requests:
                for payload, call in [
                    (ORDER, fn),
                    (ORDER, fn),
                    ({"o": 2}, Calls(error=KeyError())),
                ]:
                    with contextlib.suppress(KeyError):
                        await engine.run(payload, _as_async(call))
                    counts.append(dict(requests.counts))
                    requests.reset()
            assert fn.count == 1
            return counts

        def on_sync() -> list[dict[str, int]]:
            fn, counts = Calls({"id": 7}), []
            with counting_requests(twin.client()) as requests:
                for payload, call in [
                    (ORDER, fn),
                    (ORDER, fn),
                    ({"o": 2}, Calls(error=KeyError())),
                ]:
                    with contextlib.suppress(KeyError):
                        sync_engine.run(payload, call)
                    counts.append(dict(requests.counts))
                    requests.reset()
            assert fn.count == 1
            return counts

        expected = [
            {"PutItem": 1, "UpdateItem": 1},
            {"PutItem": 1},
            {"PutItem": 1, "DeleteItem": 1},
        ]
        assert await on_async() == expected
        assert await asyncio.wait_for(asyncio.to_thread(on_sync), BOUND) == expected


def _as_async(fn: Calls) -> Any:
    async def call() -> Any:
        return fn()

    return call


_README_TABLE = "idempotency"


@pytest.fixture
def readme_table(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, boto3_session: Any
) -> Iterator[str]:
    """The README's table name, on moto through the environment (no endpoint_url=)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto_server.endpoint_url)
    table = f"{_README_TABLE}-{uuid.uuid4().hex[:8]}"
    admin = SyncDynamoDBPersistenceLayer(table, session=boto3_session)
    assert admin.create_table(exist_ok=False)
    yield table
    admin.client().delete_table(TableName=table)
    admin.close()


async def test_the_readme_sync_example_runs_on_boto3_in_the_callers_thread(
    readme_table: str,
) -> None:
    store = DynamoDBPersistenceLayer(table_name=readme_table)
    runs: list[str] = []

    @idempotent(persistence_store=store)
    def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
        runs.append(event["body"])
        return {"statusCode": 200, "body": f"charged {event['body']}"}

    @idempotent_async(persistence_store=store)
    async def async_handler(event: dict[str, Any], context: object) -> dict[str, Any]:
        runs.append("async " + event["body"])
        return {"statusCode": 200, "body": "async"}

    twin = as_sync_store(store)
    assert isinstance(twin, SyncDynamoDBPersistenceLayer)
    sent_from: set[int] = set()
    twin.client().meta.events.register(
        "before-send.dynamodb", lambda **_: sent_from.add(threading.get_ident())
    )

    def lambda_runtime() -> tuple[list[Any], int]:
        results = [handler({"body": "42"}, None) for _ in range(3)]
        return results, threading.get_ident()

    results, caller = await asyncio.wait_for(asyncio.to_thread(lambda_runtime), BOUND)
    assert results == [{"statusCode": 200, "body": "charged 42"}] * 3
    assert sent_from == {caller}  # no event loop, no other thread: boto3 in the caller's
    assert await async_handler({"body": "7"}, None) == {"statusCode": 200, "body": "async"}
    assert await async_handler({"body": "7"}, None) == {"statusCode": 200, "body": "async"}
    assert runs == ["42", "async 7"]
    await store.aclose()


# -- Powertools' constructor and the clients given ------------------------------------------------


def test_powertools_arguments_boto3_session_and_boto_config(
    moto_server: MotoServer, readme_table: str
) -> None:
    session = boto3.session.Session(region_name="eu-west-1")
    store = DynamoDBPersistenceLayer(
        table_name=readme_table,
        boto3_session=session,
        boto_config=Config(read_timeout=5, max_pool_connections=7),
    )
    twin = as_sync_store(store)
    assert isinstance(twin, SyncDynamoDBPersistenceLayer)
    config = twin.client().meta.config
    assert config.read_timeout == 5  # the user's
    assert config.connect_timeout == DEFAULT_CONNECT_TIMEOUT  # bounded: the user left it
    assert config.max_pool_connections == 7
    assert config.retries == {"total_max_attempts": DEFAULT_MAX_ATTEMPTS, "mode": "standard"}
    calls = Calls({"paid": 1})

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def pay(order: dict[str, Any]) -> Any:
        return calls()

    assert [pay(order=ORDER), pay(order=ORDER)] == [{"paid": 1}] * 2
    assert calls.count == 1


def test_own_clients_have_the_same_bounds_on_both_sides(moto_server: MotoServer) -> None:
    store = DynamoDBPersistenceLayer(
        "t", endpoint_url=moto_server.endpoint_url, connect_timeout=1.5, max_attempts=3
    )
    twin = as_sync_store(store)
    assert isinstance(twin, SyncDynamoDBPersistenceLayer)
    sync_config = twin.client().meta.config
    async_config = store.client_config()
    for config in (sync_config, async_config):
        assert (config.connect_timeout, config.read_timeout) == (1.5, DEFAULT_READ_TIMEOUT)
        assert config.retries == {"total_max_attempts": 3, "mode": "standard"}
    assert (twin.table_name, twin.attributes) == (store.table_name, store.attributes)


def test_a_boto3_client_given_is_used_as_it_is_and_never_closed(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    with sync_store(moto_server, session=boto3_session) as admin:
        client = boto3_session.client("dynamodb", endpoint_url=moto_server.endpoint_url)
        for given in ({"boto3_client": client}, {"client": client}):
            store = DynamoDBPersistenceLayer(table_name=admin.table_name, **given)
            twin = as_sync_store(store)
            assert isinstance(twin, SyncDynamoDBPersistenceLayer)
            assert twin.client() is client
            calls = Calls("done")

            @idempotent_function(
                data_keyword_argument="order", persistence_store=store, key_prefix=str(given)
            )
            def pay(order: dict[str, Any], calls: Calls = calls) -> Any:
                return calls()

            with counting_requests(client) as requests:
                assert pay(order=ORDER) == pay(order=ORDER) == "done"
            assert requests.counts == {"PutItem": 2, "UpdateItem": 1}
            assert calls.count == 1
            twin.close()
            assert client.describe_table(TableName=admin.table_name)  # still open


@pytest.mark.parametrize("given", ["boto3_client", "client", "boto3_session", "session"])
async def test_a_boto3_client_or_session_used_by_async_code_says_what_to_pass(
    moto_server: MotoServer, given: str
) -> None:
    thing = (
        boto3.client("dynamodb", endpoint_url=moto_server.endpoint_url)
        if given.endswith("client")
        else boto3.session.Session()
    )
    store = DynamoDBPersistenceLayer(table_name="t", **{given: thing})
    with pytest.raises(TypeError) as when_decorated:

        @idempotent_function_async(data_keyword_argument="order", persistence_store=store)
        async def pay(order: dict[str, Any]) -> str:
            return "never"

    with pytest.raises(IdempotencyPersistenceConfigError) as when_used:
        await store.get("fn#k")  # the store used directly: the same words
    for error in (when_decorated.value, when_used.value):
        message = str(error)
        assert "boto3" in message
        assert "sync code only" in message
        assert "aiobotocore client as client=" in message
        assert "aioboto3 session as session=" in message
    assert type(as_sync_store(store)) is SyncDynamoDBPersistenceLayer  # sync code is served


async def test_an_aiobotocore_client_serves_async_code_and_is_refused_by_sync_code(
    moto_server: MotoServer, user_client: Any
) -> None:
    async with fresh_store(moto_server, client=user_client) as store:
        calls = Calls("paid")

        @idempotent_function_async(data_keyword_argument="order", persistence_store=store)
        async def pay(order: dict[str, Any]) -> Any:
            return calls()

        assert await pay(order=ORDER) == "paid"
        with pytest.raises(TypeError) as when_decorated:

            @idempotent_function(data_keyword_argument="order", persistence_store=store)
            def pay_sync(order: dict[str, Any]) -> str:
                return "never"

        with pytest.raises(IdempotencyPersistenceConfigError) as when_used:
            SyncDynamoDBPersistenceLayer.from_settings(store.settings).get("fn#k")
        for error in (when_decorated.value, when_used.value):
            assert "aiobotocore client (client=)" in str(error)
            assert "boto3_client=" in str(error)
        assert await pay(order=ORDER) == "paid"  # async code is still served
        assert calls.count == 1


async def test_a_client_of_each_kind_serves_each_kind_of_code(
    moto_server: MotoServer, user_client: Any
) -> None:
    boto3_client = boto3.client("dynamodb", endpoint_url=moto_server.endpoint_url)
    async with fresh_store(moto_server, client=user_client, boto3_client=boto3_client) as store:
        calls = Calls("paid")

        @idempotent_function_async(data_keyword_argument="order", persistence_store=store)
        async def pay(order: dict[str, Any]) -> Any:
            return calls()

        @idempotent_function(data_keyword_argument="order", persistence_store=store)
        def pay_sync(order: dict[str, Any]) -> Any:
            return calls()

        with counting_requests(user_client) as async_requests:
            assert await pay(order=ORDER) == "paid"
        with counting_requests(boto3_client) as sync_requests:
            assert await asyncio.to_thread(pay_sync, order=ORDER) == "paid"
        assert async_requests.counts == {"PutItem": 1, "UpdateItem": 1}
        assert sync_requests.counts == {"PutItem": 1, "UpdateItem": 1}
        assert calls.count == 2  # two functions (two keys), each once


async def test_an_aiobotocore_session_goes_through_the_bridge(
    moto_server: MotoServer, aws_session: Any
) -> None:
    async with fresh_store(moto_server, session=aws_session) as store:
        assert isinstance(as_sync_store(store), BridgedStore)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"client": "sync", "boto3_client": "sync"}, "two boto3 clients"),
        ({"boto3_client": "async"}, "boto3_client= takes a boto3 client"),
        ({"boto3_session": "async"}, "boto3_session= takes a boto3 session"),
    ],
)
async def test_clients_of_the_wrong_kind_are_refused_when_built(
    options: dict[str, str], match: str, user_client: Any, aws_session: Any
) -> None:
    things = {
        ("client", "sync"): boto3.client("dynamodb"),
        ("client", "async"): user_client,
        ("session", "async"): aws_session,
    }
    given = {name: things[(name.split("_")[-1], kind)] for name, kind in options.items()}
    with pytest.raises(IdempotencyPersistenceConfigError, match=match):
        DynamoDBPersistenceLayer("t", **given)


def test_a_subclass_goes_through_the_bridge(moto_server: MotoServer) -> None:
    class Custom(DynamoDBPersistenceLayer):
        pass

    assert isinstance(
        as_sync_store(Custom("t", endpoint_url=moto_server.endpoint_url)), BridgedStore
    )


# -- forks ------------------------------------------------------------------------------------


def _in_child(work: Any) -> str:
    """Run `work()` in a forked child; its answer (or its error) as text."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        answer = "no answer"
        try:
            os.close(read_fd)
            answer = str(work())
        except BaseException as exc:
            answer = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_fd, answer.encode())
            os._exit(0)
    os.close(write_fd)
    chunks = []
    try:
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        deadline = time.monotonic() + 30
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError("the forked child did not exit")
            time.sleep(0.02)
    return b"".join(chunks).decode()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_its_own_client(moto_server: MotoServer, boto3_session: Any) -> None:
    with sync_store(moto_server, session=boto3_session) as store:
        claim = claim_record(f"fn#{uuid.uuid4().hex}")
        assert store.claim(claim, now=NOW).claimed
        parent_client = store.client()

        def child() -> str:
            record = store.get(claim.idempotency_key)
            fresh = store.client() is not parent_client
            return f"{record == claim} {fresh}"

        assert _in_child(child) == "True True"
        assert store.client() is parent_client  # the parent's is untouched and still works
        assert store.get(claim.idempotency_key) == claim


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_boto3_client_given_is_refused_in_a_forked_child(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    client = boto3_session.client("dynamodb", endpoint_url=moto_server.endpoint_url)
    with sync_store(moto_server, client=client) as store:
        claim = claim_record(f"fn#{uuid.uuid4().hex}")
        assert store.claim(claim, now=NOW).claimed

        def child() -> str:
            store.get(claim.idempotency_key)
            return "used the parent's client"

        answer = _in_child(child)
        assert answer.startswith("IdempotencyPersistenceConfigError: "), answer
        assert "forked child" in answer
        assert "table_name=" in answer
        assert "boto3_client=" in answer
        assert store.get(claim.idempotency_key) == claim


# -- faults -------------------------------------------------------------------------------------


def _timed_claim(
    store: SyncDynamoDBPersistenceLayer,
) -> tuple[IdempotencyPersistenceConnectionError, float]:
    started = time.monotonic()
    with pytest.raises(IdempotencyPersistenceConnectionError) as error:
        store.claim(claim_record(f"fn#{uuid.uuid4().hex}"), now=time.time())
    return error.value, time.monotonic() - started


def test_a_closed_port_gives_the_typed_error_quickly(boto3_session: Any) -> None:
    store = SyncDynamoDBPersistenceLayer(
        "t", endpoint_url=f"http://127.0.0.1:{free_port()}", session=boto3_session
    )
    error, seconds = _timed_claim(store)
    assert error.transient
    assert isinstance(error.__cause__, EndpointConnectionError)
    assert seconds < BOUND


def test_a_frozen_server_gives_the_typed_error_within_the_read_timeouts(
    boto3_session: Any,
) -> None:
    with frozen_server() as server:
        store = SyncDynamoDBPersistenceLayer(
            "t", endpoint_url=server.endpoint_url, session=boto3_session, read_timeout=0.5
        )
        error, seconds = _timed_claim(store)
        attempts = server.connections
    assert isinstance(error.__cause__, ReadTimeoutError)
    assert "did not answer in time" in str(error)
    assert attempts == DEFAULT_MAX_ATTEMPTS
    assert seconds < DEFAULT_MAX_ATTEMPTS * (0.5 + 1) + 1  # each attempt, a retry wait of <= 1 s


def test_an_outage_through_the_fault_proxy_is_bounded_and_recovers(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    with (
        sync_store(moto_server, session=boto3_session) as admin,
        FaultProxy(moto_server.host, moto_server.port) as proxy,
    ):
        store = DynamoDBPersistenceLayer(
            admin.table_name,
            endpoint_url=f"http://{proxy.host}:{proxy.port}",
            session=boto3_session,
            read_timeout=0.5,
        )
        calls = Calls({"paid": 42})

        @idempotent_function(data_keyword_argument="order", persistence_store=store)
        def pay(order: dict[str, Any]) -> Any:
            return calls()

        for fault in (proxy.refuse, proxy.stall):
            fault()
            started = time.monotonic()
            with pytest.raises(IdempotencyPersistenceConnectionError) as error:
                pay(order=ORDER)
            assert error.value.transient
            assert time.monotonic() - started < BOUND
            proxy.drop()  # what a stall held is lost, not delivered late
            proxy.pass_through()
        assert calls.count == 0
        assert pay(order=ORDER) == pay(order=ORDER) == {"paid": 42}
        assert calls.count == 1
        assert pay.engine.drain(timeout=BOUND)  # the releases of the failed calls went out


# -- records shared with the async store and with Powertools --------------------------------------


async def test_a_record_the_sync_store_completed_is_replayed_by_the_async_store(
    moto_server: MotoServer,
) -> None:
    async with fresh_store(moto_server, **COMPOSITE) as store:
        sync_layer = SyncDynamoDBPersistenceLayer.from_settings(store.settings)
        calls = Calls({"charged": 42})

        def charge_sync(order: dict[str, Any]) -> Any:
            return calls()

        async def charge(order: dict[str, Any]) -> Any:
            return calls()

        options: dict[str, Any] = {"data_keyword_argument": "order", "key_prefix": "payments"}
        sync_pay = idempotent_function(persistence_store=sync_layer, **options)(charge_sync)
        async_pay = idempotent_function_async(persistence_store=store, **options)(charge)
        assert await asyncio.to_thread(sync_pay, order=ORDER) == {"charged": 42}
        assert await async_pay(order=ORDER) == {"charged": 42}
        assert calls.count == 1
        key = async_pay.engine.idempotency_key(ORDER, charge)
        stored = await store.get(key)
        assert stored is not None
        assert stored == sync_layer.get(key)
        assert stored.status is RecordStatus.COMPLETED
        sync_layer.close()


@pytest.mark.parametrize("options", ["simple", "composite"])
def test_powertools_replays_a_record_the_sync_store_completed(
    moto_server: MotoServer, boto3_session: Any, options: str
) -> None:
    from aws_lambda_powertools.utilities.idempotency import (
        DynamoDBPersistenceLayer as PowertoolsDynamoDB,
    )
    from aws_lambda_powertools.utilities.idempotency import (
        idempotent_function as pt_idempotent_function,
    )

    with sync_store(moto_server, session=boto3_session, **OPTIONS[options]) as store:
        runs: list[str] = []

        def charge(order: dict[str, Any]) -> dict[str, Any]:
            runs.append("ours")
            return {"charged": order["amount"]}

        def charge_pt(order: dict[str, Any]) -> dict[str, Any]:
            runs.append("powertools")
            return {"charged": -1}

        ours = idempotent_function(
            data_keyword_argument="order", persistence_store=store, key_prefix="payments"
        )(charge)
        theirs = pt_idempotent_function(
            data_keyword_argument="order",
            persistence_store=PowertoolsDynamoDB(
                table_name=store.table_name,
                boto3_client=boto3_session.client(
                    "dynamodb", endpoint_url=moto_server.endpoint_url
                ),
                **OPTIONS[options],
            ),
            key_prefix="payments",
        )(charge_pt)
        assert ours(order=ORDER) == {"charged": 42}
        assert theirs(order=ORDER) == {"charged": 42}
        assert runs == ["ours"]
        record = store.get(ours.engine.idempotency_key(ORDER, charge))
        assert isinstance(record, DataRecord)
        assert record.owner is not None  # our token, which Powertools ignores


def test_the_aws_configuration_of_a_boto3_session_sets_the_attempts(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A boto3 session's profile (read through its botocore session, `Session._session`)
    wins over the default attempts, as the AWS configuration does for aioboto3's."""
    config_file = tmp_path / "config"
    config_file.write_text("[profile retrying]\nmax_attempts = 5\nretry_mode = adaptive\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    session = boto3.session.Session(profile_name="retrying", region_name="eu-west-1")
    layer = SyncDynamoDBPersistenceLayer("t", boto3_session=session, endpoint_url="http://x")
    assert layer.client_config(session).retries == {}  # left to botocore: the profile's
    assert layer.client().meta.config.retries == {"total_max_attempts": 5, "mode": "adaptive"}
    explicit = SyncDynamoDBPersistenceLayer("t", boto3_session=session, max_attempts=2)
    assert explicit.client_config(session).retries == {"total_max_attempts": 2}


def test_sixteen_threads_share_one_client_and_run_each_payload_once(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    with sync_store(moto_server, session=boto3_session) as admin:
        store = DynamoDBPersistenceLayer(admin.table_name, endpoint_url=moto_server.endpoint_url)
        runs: list[int] = []
        started = threading.Barrier(16)

        @idempotent_function(
            data_keyword_argument="order",
            persistence_store=store,
            config=IdempotencyConfig(wait_for_in_progress_seconds=BOUND),
        )
        def pay(order: dict[str, Any]) -> dict[str, Any]:
            runs.append(order["id"])
            time.sleep(0.1)
            return {"paid": order["id"]}

        results: list[Any] = []

        def call(n: int) -> None:
            started.wait(BOUND)
            results.append(pay(order={"id": n % 4}))

        threads = [threading.Thread(target=call, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND)
        twin = as_sync_store(store)
        assert isinstance(twin, SyncDynamoDBPersistenceLayer)
        assert sorted(runs) == [0, 1, 2, 3]
        assert sorted(r["paid"] for r in results) == sorted(n % 4 for n in range(16))
        assert twin._clients.current() is not None  # one client, opened once for all threads


def test_requests_in_flight_stay_within_the_clients_connection_pool(
    moto_server: MotoServer, boto3_session: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Threads beyond `max_pool_connections` wait for a request to end, as the async
    layer's calls wait for aiobotocore's pool; urllib3 would open a connection for each
    of them, discard it after and warn ("Connection pool is full")."""
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    small_pool = Config(max_pool_connections=2)
    with sync_store(moto_server, session=boto3_session, boto_config=small_pool) as store:
        client = store.client()
        lock = threading.Lock()
        counts = {"in flight": 0, "peak": 0, "sent": 0}

        def sending(**_: Any) -> None:
            with lock:
                counts["in flight"] += 1
                counts["sent"] += 1
                counts["peak"] = max(counts["peak"], counts["in flight"])

        def received(**_: Any) -> None:
            with lock:
                counts["in flight"] -= 1

        client.meta.events.register("before-send.dynamodb", sending)
        client.meta.events.register("response-received.dynamodb", received)
        started = threading.Barrier(16)
        errors: list[BaseException] = []

        def call(n: int) -> None:
            try:
                started.wait(BOUND)
                for i in range(5):
                    assert store.get(f"fn#{n}-{i}") is None
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND)
        assert not any(thread.is_alive() for thread in threads), "a thread hung"
        assert errors == []
        assert counts["sent"] == 16 * 5
        assert counts["peak"] <= 2
        assert [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()] == []
    default = SyncDynamoDBPersistenceLayer("t", endpoint_url=moto_server.endpoint_url)
    assert isinstance(default._clients, OpenedClients)
    assert default._clients.max_concurrency == default.client_config().max_pool_connections == 10


def test_a_size_refusal_by_the_server_is_also_typed(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    # moto's limit (405,000 bytes) is a little under DynamoDB's (409,600): in between,
    # our check passes and the server refuses, as DynamoDB would for any miscount.
    with sync_store(moto_server, session=boto3_session) as store:
        claim = claim_record()
        store.claim(claim, now=NOW)
        assert claim.owner is not None
        data = '"' + "x" * 407_000 + '"'
        with (
            counting_requests(store.client()) as requests,
            pytest.raises(IdempotencyResultTooLargeError) as error,
        ):
            store.complete(completed_record(claim, data), owner=claim.owner)
        assert requests.counts == {"UpdateItem": 1}
        assert error.value.__cause__ is not None
        assert store.get(claim.idempotency_key) == claim


def test_a_completion_on_a_missing_table_is_no_size_refusal(moto_server: MotoServer) -> None:
    table = new_table_name()
    store = SyncDynamoDBPersistenceLayer(table, endpoint_url=moto_server.endpoint_url)
    try:
        claim = claim_record()
        assert claim.owner is not None
        with pytest.raises(IdempotencyPersistenceMisconfiguredError) as raised:
            store.complete(completed_record(claim), owner=claim.owner)
    finally:
        store.close()
    assert not isinstance(raised.value, IdempotencyResultTooLargeError)
    assert "the table does not exist" in str(raised.value)


def test_a_renewal_needs_an_owner_and_an_in_progress_expiry(
    ddb: SyncDynamoDBPersistenceLayer,
) -> None:
    claim = claim_record(in_progress_ms=int(NOW * 1000) + 60_000)
    assert ddb.claim(claim, now=NOW).claimed
    with counting_requests(ddb.client()) as requests:
        with pytest.raises(ValueError, match="renew needs an owner and an in-progress expiry"):
            ddb.renew(dataclasses.replace(claim, in_progress_expiry_timestamp=None))
        with pytest.raises(ValueError, match="renew needs an owner"):
            ddb.renew(dataclasses.replace(claim, owner=None))
    assert requests.total == 0
    assert ddb.get(claim.idempotency_key) == claim
