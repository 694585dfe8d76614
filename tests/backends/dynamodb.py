"""DynamoDB backends on moto's server: simple key, composite key, custom attribute names.

Each test gets a table of its own (moto creates one in milliseconds), dropped after.
`store_dynamodb_*` are async layers on an aiobotocore session; `sync_store_dynamodb_*`
are, for the sync suites (tests/sync/conftest.py), what sync code gets from a layer
given boto3's session or client: the native `SyncDynamoDBPersistenceLayer`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer
from aioidempotency._twins import as_sync_store
from tests.servers.moto import DUMMY_AWS_ENV, MotoServer, running_moto_server

BACKENDS = ["dynamodb_simple", "dynamodb_composite", "dynamodb_custom_attrs"]

COMPOSITE: dict[str, Any] = {"key_attr": "pk", "sort_key_attr": "sk"}
CUSTOM_ATTRS: dict[str, Any] = {
    # reserved words of DynamoDB on purpose: every name must go through #placeholders
    "key_attr": "key",
    "sort_key_attr": "range",
    "static_pk_value": "orders-service",
    "expiry_attr": "ttl",
    "in_progress_expiry_attr": "lease_until",
    "status_attr": "state",
    "data_attr": "result",
    "validation_key_attr": "hash",
    "owner_attr": "owner",
}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's DynamoDB on a free port, with dummy credentials and region in the env."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in DUMMY_AWS_ENV.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aioidempotency-tests/config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aioidempotency-tests/credentials")
        with running_moto_server() as server:
            yield server


@pytest.fixture(scope="session")
def aws_session(moto_server: MotoServer) -> Any:
    """One aiobotocore session for the suite: it caches the service model (~40 ms a client)."""
    from aiobotocore.session import AioSession

    return AioSession()


@pytest.fixture(scope="session")
def boto3_session(moto_server: MotoServer) -> Any:
    """One boto3 session for the suite: it caches the service model (~100 ms a session)."""
    import boto3

    return boto3.session.Session()


@pytest.fixture
async def user_client(moto_server: MotoServer, aws_session: Any) -> AsyncIterator[Any]:
    """A DynamoDB client of the test's own, as a user would pass it to the layer."""
    async with aws_session.create_client("dynamodb", endpoint_url=moto_server.endpoint_url) as c:
        yield c


def new_table_name() -> str:
    return f"idempotency-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def fresh_store(
    server: MotoServer, **options: Any
) -> AsyncIterator[DynamoDBPersistenceLayer]:
    """A layer on a new table of its own; the table is deleted and the layer closed after."""
    options.setdefault("endpoint_url", server.endpoint_url)
    store = DynamoDBPersistenceLayer(new_table_name(), **options)
    await store.create_table(exist_ok=False)
    try:
        yield store
    finally:
        client = await store.client()
        await client.delete_table(TableName=store.table_name)
        await store.aclose()


@pytest.fixture
async def store_dynamodb_simple(
    moto_server: MotoServer, aws_session: Any
) -> AsyncIterator[DynamoDBPersistenceLayer]:
    async with fresh_store(moto_server, session=aws_session) as store:
        yield store


@pytest.fixture
async def store_dynamodb_composite(
    moto_server: MotoServer, aws_session: Any
) -> AsyncIterator[DynamoDBPersistenceLayer]:
    async with fresh_store(moto_server, session=aws_session, **COMPOSITE) as store:
        yield store


@pytest.fixture
async def store_dynamodb_custom_attrs(
    moto_server: MotoServer, aws_session: Any
) -> AsyncIterator[DynamoDBPersistenceLayer]:
    async with fresh_store(moto_server, session=aws_session, **CUSTOM_ATTRS) as store:
        yield store


@contextlib.contextmanager
def fresh_sync_store(server: MotoServer, **options: Any) -> Iterator[SyncDynamoDBPersistenceLayer]:
    """What sync code gets from a `DynamoDBPersistenceLayer` on a new table of its own,
    built with `options` (boto3's session or client): its sync twin, which must be the
    native store. The table is created and deleted, and the twin closed, through boto3."""
    options.setdefault("endpoint_url", server.endpoint_url)
    store = as_sync_store(DynamoDBPersistenceLayer(new_table_name(), **options))
    assert type(store) is SyncDynamoDBPersistenceLayer, store
    assert store.create_table(exist_ok=False)
    try:
        yield store
    finally:
        store.client().delete_table(TableName=store.table_name)
        store.close()


@pytest.fixture
def sync_store_dynamodb_simple(
    moto_server: MotoServer, boto3_session: Any
) -> Iterator[SyncDynamoDBPersistenceLayer]:
    """The sync twin of a layer given a boto3 session (`boto3_session=`)."""
    with fresh_sync_store(moto_server, boto3_session=boto3_session) as store:
        yield store


@pytest.fixture
def sync_store_dynamodb_composite(
    moto_server: MotoServer, boto3_session: Any
) -> Iterator[SyncDynamoDBPersistenceLayer]:
    """The sync twin of a layer given a boto3 client (`boto3_client=`), which the
    layer never closes: the fixture does, after."""
    client = boto3_session.client("dynamodb", endpoint_url=moto_server.endpoint_url)
    try:
        with fresh_sync_store(moto_server, boto3_client=client, **COMPOSITE) as store:
            yield store
    finally:
        client.close()


@pytest.fixture
def sync_store_dynamodb_custom_attrs(
    moto_server: MotoServer, boto3_session: Any
) -> Iterator[SyncDynamoDBPersistenceLayer]:
    """The sync twin of a layer given a boto3 session as `session=` (sorted by kind)."""
    with fresh_sync_store(moto_server, session=boto3_session, **CUSTOM_ATTRS) as store:
        yield store


class RequestCounter:
    """Counts the HTTP requests a DynamoDB client sends, per operation.

    Hooks botocore's ``before-send`` event, so retries count and short-circuited
    calls do not: it sees what reaches the wire.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, event_name: str, **_: Any) -> None:
        self.counts[event_name.rsplit(".", 1)[-1]] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()


@contextlib.contextmanager
def counting_requests(client: Any) -> Iterator[RequestCounter]:
    """Count the requests `client` sends inside the block."""
    counter = RequestCounter()
    client.meta.events.register("before-send.dynamodb", counter)
    try:
        yield counter
    finally:
        client.meta.events.unregister("before-send.dynamodb", counter)


def inject_error(client: Any, operation: str, code: str) -> Callable[[], None]:
    """Make every `operation` call of `client` fail with `code`, without a request.

    Returns the function that ends the fault.
    """

    class Response:
        status_code = 400
        headers: dict[str, str] = {}

    def fail(**_: Any) -> tuple[Any, dict[str, Any]]:
        error = {"Error": {"Code": code, "Message": f"injected {code}"}}
        return Response(), {**error, "ResponseMetadata": {"HTTPStatusCode": 400}}

    event = f"before-call.dynamodb.{operation}"
    client.meta.events.register(event, fail)
    return lambda: client.meta.events.unregister(event, fail)
