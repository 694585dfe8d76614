"""The DynamoDB store's client: lazy, one per event loop, closed by us only if ours; errors."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError, EndpointConnectionError

from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._twins import as_sync_store
from aioidempotency.exceptions import (
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from tests.backends.dynamodb import fresh_store, inject_error
from tests.servers.moto import MotoServer, free_port


def in_progress(key: str = "fn#k") -> DataRecord:
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=int(time.time()) + 600,
        owner=uuid.uuid4().hex,
    )


def http_sessions(client: Any) -> list[Any]:
    """The aiohttp sessions behind an aiobotocore client (created on its first request)."""
    return list(client._endpoint.http_session._sessions.values())


# -- lifecycle -----------------------------------------------------------------------------


async def test_a_given_client_is_used_and_never_closed(
    moto_server: MotoServer, user_client: Any
) -> None:
    async with fresh_store(moto_server, client=user_client) as store:
        assert await store.client() is user_client
        assert (await store.claim(in_progress(), now=time.time())).claimed
        sessions = http_sessions(user_client)
        assert sessions
        await store.aclose()
        async with store:
            assert await store.get("fn#k") is not None
        assert http_sessions(user_client) == sessions
        assert not any(session.closed for session in sessions)
    assert (await user_client.list_tables())["ResponseMetadata"]["HTTPStatusCode"] == 200


async def test_own_client_is_opened_once_per_loop_and_closed_by_aclose(
    moto_server: MotoServer,
) -> None:
    async with fresh_store(moto_server) as store:
        clients = await asyncio.gather(*(store.client() for _ in range(20)))
        assert all(client is clients[0] for client in clients)
        await store.get("fn#k")
        sessions = http_sessions(clients[0])
        assert sessions
        await store.aclose()
        assert all(session.closed for session in sessions)
        assert await store.get("fn#k") is None  # reopened on demand
        assert await store.client() is not clients[0]


async def test_async_context_manager_closes_own_client(moto_server: MotoServer) -> None:
    async with fresh_store(moto_server) as store:
        async with store as same:
            assert same is store
            await store.get("fn#k")
            sessions = http_sessions(await store.client())
        assert sessions
        assert all(session.closed for session in sessions)


async def test_asyncio_run_per_invocation_reopens_and_closes_the_client(
    moto_server: MotoServer,
) -> None:
    """A layer built once keeps working when each call has a new loop."""
    async with fresh_store(moto_server) as store:
        seen: list[tuple[Any, list[Any]]] = []

        async def invocation(index: int) -> bool:
            client = await store.client()
            result = await store.claim(in_progress(f"fn#{index % 2}"), now=time.time())
            seen.append((client, http_sessions(client)))
            return result.claimed

        def lambda_runtime() -> list[bool]:
            return [asyncio.run(invocation(i)) for i in range(3)]

        claimed = await asyncio.wait_for(asyncio.to_thread(lambda_runtime), timeout=30)
        assert claimed == [True, True, False]
        clients = [client for client, _ in seen]
        assert len({id(client) for client in clients}) == 3
        # each loop's client was closed when asyncio.run shut that loop down
        assert all(session.closed for _, sessions in seen for session in sessions)
        assert await store.get("fn#0") is not None  # and the suite's loop still works


async def test_aclose_closes_a_client_opened_in_another_running_loop(
    moto_server: MotoServer,
) -> None:
    async with fresh_store(moto_server) as store:
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        sessions: list[Any] = []

        async def other_thread_main() -> None:
            await store.get("fn#k")
            sessions.extend(http_sessions(await store.client()))
            ready.set()
            await stop.wait()

        ready = threading.Event()
        thread = threading.Thread(target=loop.run_until_complete, args=(other_thread_main(),))
        thread.start()
        try:
            assert await asyncio.to_thread(ready.wait, 30)
            await store.aclose()
            assert sessions
            assert all(session.closed for session in sessions)
        finally:
            loop.call_soon_threadsafe(stop.set)
            await asyncio.to_thread(thread.join, 30)
            loop.close()


async def test_region_comes_from_the_environment_or_the_arguments(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    url = moto_server.endpoint_url
    from_env = DynamoDBPersistenceLayer("t", endpoint_url=url)
    explicit = DynamoDBPersistenceLayer("t", endpoint_url=url, region_name="us-west-2")
    via_session = DynamoDBPersistenceLayer(
        "t", endpoint_url=url, session=aioboto3.Session(region_name="sa-east-1")
    )
    try:
        assert (await from_env.client()).meta.region_name == "ap-southeast-2"
        assert (await explicit.client()).meta.region_name == "us-west-2"
        assert (await via_session.client()).meta.region_name == "sa-east-1"
    finally:
        for layer in (from_env, explicit, via_session):
            await layer.aclose()


# -- errors --------------------------------------------------------------------------------


async def test_no_region_is_a_configuration_error(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    layer = DynamoDBPersistenceLayer("t", endpoint_url=moto_server.endpoint_url)
    with pytest.raises(IdempotencyPersistenceConfigError, match="region"):
        await layer.get("fn#k")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with pytest.raises(IdempotencyPersistenceLayerError, match="ResourceNotFoundException"):
        await layer.get("fn#k")  # a failed opening is retried on the next call
    await layer.aclose()


@pytest.mark.parametrize("operation", ["claim", "get", "complete", "release", "renew", "delete"])
async def test_a_missing_table_is_a_persistence_error(
    moto_server: MotoServer, aws_session: Any, operation: str
) -> None:
    layer = DynamoDBPersistenceLayer(
        "no-such-table", endpoint_url=moto_server.endpoint_url, session=aws_session
    )
    record = in_progress()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "claim": lambda: layer.claim(record, now=time.time()),
        "get": lambda: layer.get("fn#k"),
        "complete": lambda: layer.complete(record, owner="o"),
        "release": lambda: layer.release("fn#k", owner="o"),
        "renew": lambda: layer.renew(dataclasses.replace(record, in_progress_expiry_timestamp=1)),
        "delete": lambda: layer.delete("fn#k"),
    }
    with pytest.raises(IdempotencyPersistenceLayerError, match="does not exist") as error:
        await calls[operation]()
    assert not isinstance(error.value, IdempotencyPersistenceConnectionError)
    assert isinstance(error.value.__cause__, ClientError)
    assert error.value.__cause__.response["Error"]["Code"] == "ResourceNotFoundException"
    await layer.aclose()


async def test_an_unreachable_endpoint_is_a_connection_error(aws_session: Any) -> None:
    layer = DynamoDBPersistenceLayer(
        "t",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        session=aws_session,
        boto_config=AioConfig(retries={"total_max_attempts": 1}, connect_timeout=2),
    )
    with pytest.raises(IdempotencyPersistenceConnectionError, match="could not be reached") as e:
        await layer.claim(in_progress(), now=time.time())
    assert isinstance(e.value.__cause__, EndpointConnectionError)
    await layer.aclose()


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("ProvisionedThroughputExceededException", "throttled"),
        ("ThrottlingException", "throttled"),
        ("AccessDeniedException", "access denied"),
    ],
)
async def test_throttling_and_access_denied_are_persistence_errors(
    moto_server: MotoServer, user_client: Any, code: str, reason: str
) -> None:
    async with fresh_store(moto_server, client=user_client) as store:
        inject_error(user_client, "PutItem", code)
        with pytest.raises(IdempotencyPersistenceLayerError, match=reason) as error:
            await store.claim(in_progress(), now=time.time())
        assert not isinstance(error.value, IdempotencyPersistenceConnectionError)
        assert isinstance(error.value.__cause__, ClientError)
        assert error.value.__cause__.response["Error"]["Code"] == code
        assert code in str(error.value)
        assert await store.get("fn#k") is None  # other operations still work


def _forked_child(store: DynamoDBPersistenceLayer, results: Any) -> None:  # pragma: no cover
    async def main() -> str:
        record = await store.get("fn#k")
        await store.aclose()  # must not touch the parent's client or loop
        return "missing" if record is None else record.status.value

    try:
        results.put(asyncio.run(asyncio.wait_for(main(), 30)))
    except BaseException as exc:
        results.put(repr(exc))


async def test_a_forked_child_opens_its_own_client(moto_server: MotoServer) -> None:
    async with fresh_store(moto_server) as store:
        assert (await store.claim(in_progress(), now=time.time())).claimed
        parent_client = await store.client()
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_forked_child, args=(store, results), daemon=True)
        child.start()
        try:
            answer = await asyncio.to_thread(results.get, True, 60)
        finally:
            await asyncio.to_thread(child.join, 30)
            if child.is_alive():
                child.kill()
        assert answer == "INPROGRESS"
        assert child.exitcode == 0
        assert await store.client() is parent_client  # the parent's client is untouched
        assert not any(session.closed for session in http_sessions(parent_client))


@pytest.mark.parametrize("validation", [None, True], ids=["default", "boto_config"])
async def test_own_clients_leave_parameter_validation_to_the_server_unless_asked(
    moto_server: MotoServer, validation: bool | None
) -> None:
    """The layer's requests have fixed shapes: its own clients skip botocore's
    client-side validation (CPU per request), both worlds alike; a `boto_config` that
    asks for it gets it. An unknown parameter shows whether the validator looked."""
    from botocore.exceptions import ParamValidationError

    user = None if validation is None else AioConfig(parameter_validation=validation)
    layer = DynamoDBPersistenceLayer("t", endpoint_url=moto_server.endpoint_url, boto_config=user)
    sync_client = as_sync_store(layer).client()  # type: ignore[attr-defined]
    try:
        client = await layer.client()
        # Unvalidated, the serializer stumbles on the name (KeyError): no request either.
        with pytest.raises((ParamValidationError, KeyError)) as in_async:
            await client.describe_table(TableName="t", Unknown=1)
        with pytest.raises((ParamValidationError, KeyError)) as in_sync:
            await asyncio.to_thread(sync_client.describe_table, TableName="t", Unknown=1)
        for raised in (in_async.value, in_sync.value):
            assert isinstance(raised, ParamValidationError) is bool(validation)
    finally:
        await layer.aclose()
        as_sync_store(layer).close()


async def test_a_botocore_config_given_to_the_async_layer_keeps_its_options(
    moto_server: MotoServer,
) -> None:
    """Powertools' layer takes a botocore `Config`; the async layer turns it into the
    `AioConfig` aiobotocore needs, with the options it sets winning over the defaults."""
    from botocore.config import Config

    given = Config(read_timeout=7, user_agent_extra="orders")
    layer = DynamoDBPersistenceLayer("t", endpoint_url=moto_server.endpoint_url, boto_config=given)
    try:
        config = layer.client_config()
        assert isinstance(config, AioConfig)
        assert config.read_timeout == 7
        assert config.user_agent_extra == "orders"
        assert config.connect_timeout == layer.connect_timeout  # a default under it
        client = await layer.client()
        assert client.meta.config.read_timeout == 7
    finally:
        await layer.aclose()
