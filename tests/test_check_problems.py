"""What `store.check()` reports for the failures not covered by the misconfigurations of
tests/persistence/test_check.py: a store of one's own that answers the probe wrongly or
raises the package's errors, a Redis server without the commands a path needs, a
DynamoDB endpoint that is down, a table whose key is a number, a table whose key is not
the layer's when ``DescribeTable`` is refused, a table that is not ACTIVE, and a
standalone client redirected by a cluster node when INFO is refused."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiobotocore.config import AioConfig

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._check import StoreCheckReport, StoreProblem, parse_info, table_status_problem
from aioidempotency._contract import ClaimResult
from aioidempotency._records import DataRecord
from aioidempotency.exceptions import (
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
)
from tests.backends.dynamodb import fresh_store, inject_error, new_table_name
from tests.persistence.test_check import iam_enforced, iam_user
from tests.servers.moto import MotoServer
from tests.servers.redis import Server, ServerPool, _wait_until

BOUND = 60.0  # no check here takes longer than this


def only(report: StoreCheckReport) -> StoreProblem:
    """The report's one problem."""
    assert len(report.problems) == 1, str(report)
    return report.problems[0]


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a store of one's own ----------------------------------------------------------------


class ReadOnlyReplica(InMemoryPersistenceLayer):
    """A store of one's own that refuses every claim (a read-only copy of the records)."""

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        return ClaimResult(claimed=False)


class LosesWrites(InMemoryPersistenceLayer):
    """A store of one's own whose reads never see what it wrote."""

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        return None


class RenewRaises(InMemoryPersistenceLayer):
    """A store of one's own whose renewal raises the error it was built with."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def renew(self, record: DataRecord) -> None:
        raise self.error


async def test_a_store_that_refuses_the_probes_claim_answered_wrongly() -> None:
    report = await ReadOnlyReplica().check()
    problem = only(report)
    assert problem.kind == "store-error"
    assert problem.message == (
        "the store answered claim of a probe record wrongly: a claim of a new key was refused"
    )
    assert problem.fix == "check the store's implementation against the PersistenceLayer contract"
    assert not problem.transient
    assert report.store == "ReadOnlyReplica"


async def test_a_store_that_loses_its_writes_answered_the_get_wrongly() -> None:
    problem = only(await LosesWrites().check())
    assert problem.kind == "store-error"
    assert problem.message == (
        "the store answered get of a probe record wrongly: "
        "the claim just written reads back as None"
    )


@pytest.mark.parametrize(
    ("error", "kind", "message", "transient"),
    [
        (
            IdempotencyPersistenceAccessDeniedError("token expired"),
            "permission",
            "the store refused access during renew: token expired",
            False,
        ),
        (
            IdempotencyPersistenceConnectionError("no route to host"),
            "unreachable",
            "the store could not be reached during renew: no route to host",
            True,
        ),
        (
            IdempotencyPersistenceConfigError("no table configured"),
            "client",
            "the store is misconfigured during renew: no table configured",
            False,
        ),
    ],
)
async def test_the_errors_a_store_of_ones_own_raises_are_judged_by_their_class(
    error: Exception, kind: str, message: str, transient: bool
) -> None:
    problem = only(await RenewRaises(error).check())
    assert (problem.kind, problem.message, problem.transient) == (kind, message, transient)


# -- Redis -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renamed_server() -> Iterator[Server]:
    """A Redis whose EVALSHA, EVAL and SET are renamed away (as some managed services do)."""
    pool = ServerPool()
    try:
        renames = [("evalsha", "hidden_evalsha"), ("eval", "hidden_eval"), ("set", "hidden_set")]
        args = [arg for old, new in renames for arg in ("--rename-command", old, new)]
        yield pool._start("redis", *args)
    finally:
        pool.close()


async def test_a_server_without_scripts_is_a_scripts_problem(renamed_server: Server) -> None:
    url = f"redis://{renamed_server.host}:{renamed_server.port}?client=redis&timeout=5"
    async with CachePersistenceLayer.from_url(url) as layer:
        problem = only(await asyncio.wait_for(layer.check(), BOUND))
    assert problem.kind == "scripts"
    where = f"{renamed_server.host}:{renamed_server.port}"
    assert problem.message.startswith(f"{where} refused the store's Lua scripts during a script: ")
    assert "unknown command" in problem.message
    assert problem.fix.startswith("enable scripting on the server")


async def test_a_server_without_set_fails_the_protocol_paths_claim(
    renamed_server: Server,
) -> None:
    url = f"redis://{renamed_server.host}:{renamed_server.port}?client=redis&atomic=false"
    async with CachePersistenceLayer.from_url(url) as layer:
        problem = only(await asyncio.wait_for(layer.check(), BOUND))
    assert problem.kind == "store-error"
    where = f"{renamed_server.host}:{renamed_server.port}"
    assert problem.message.startswith(f"{where} failed during claim: ResponseError: ")
    assert "unknown command 'SET'" in problem.message
    assert problem.fix.startswith("see the error")


def test_an_info_reply_given_as_text_is_parsed() -> None:
    text = "# Server\r\nredis_version:7.2.4\r\nserver_mode:cluster\r\n"
    assert parse_info(text) == {"redis_version": "7.2.4", "server_mode": "cluster"}


# -- DynamoDB -----------------------------------------------------------------------------------


@pytest.fixture
async def down_layer(aws_session: Any) -> AsyncIterator[DynamoDBPersistenceLayer]:
    layer = DynamoDBPersistenceLayer(
        "t",
        endpoint_url=f"http://127.0.0.1:{dead_port()}",
        region_name="eu-west-1",
        session=aws_session,
        boto_config=AioConfig(retries={"total_max_attempts": 1}, connect_timeout=2),
    )
    try:
        yield layer
    finally:
        await layer.aclose()


async def test_a_dynamodb_endpoint_that_is_down_is_unreachable(
    down_layer: DynamoDBPersistenceLayer,
) -> None:
    problem = only(await asyncio.wait_for(down_layer.check(), BOUND))
    assert problem.kind == "unreachable"
    assert problem.transient
    assert problem.message.startswith(
        f"region eu-west-1 at {down_layer.endpoint_url} could not be reached during DescribeTable: "
    )
    assert problem.fix.startswith("check region_name (or AWS_REGION), endpoint_url")


async def test_a_table_keyed_by_a_number_is_a_key_schema_problem(
    moto_server: MotoServer, aws_session: Any
) -> None:
    table = new_table_name()
    layer = DynamoDBPersistenceLayer(
        table, endpoint_url=moto_server.endpoint_url, region_name="eu-west-1", session=aws_session
    )
    try:
        client = await layer.client()
        await client.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "N"}],
            BillingMode="PAY_PER_REQUEST",
        )
        try:
            report = await asyncio.wait_for(layer.check(), BOUND)
        finally:
            await client.delete_table(TableName=table)
    finally:
        await layer.aclose()
    problem = [p for p in report.problems if p.kind == "key-schema"]
    assert len(problem) == 1, str(report)
    assert problem[0].message == f"table {table!r}'s key attributes must be strings (S): 'id' is N"
    assert not any(name == "probe" for name, _ in report.facts)  # the probe did not run


async def test_a_throttled_probe_is_a_store_error(
    moto_server: MotoServer, user_client: Any
) -> None:
    async with fresh_store(moto_server, client=user_client) as store:
        inject_error(user_client, "PutItem", "ThrottlingException")
        problem = only(await asyncio.wait_for(store.check(), BOUND))
    assert problem.kind == "store-error"
    assert problem.message == (
        f"table {store.table_name!r} in region eu-west-1 at {moto_server.endpoint_url} failed "
        "during claim: ThrottlingException: injected ThrottlingException"
    )


@pytest.mark.parametrize(
    ("status", "fix", "transient"),
    [("CREATING", "wait until it is ACTIVE", True), ("DELETING", "restore or recreate", False)],
)
def test_a_table_that_is_not_active_is_reported(status: str, fix: str, transient: bool) -> None:
    # moto creates and deletes tables at once: DescribeTable's reply for one in between.
    problem = table_status_problem({"TableName": "t", "TableStatus": status}, table="t")
    assert problem is not None
    assert problem.kind == "table-status"
    assert problem.message == f"table 't' is {status}"
    assert problem.fix.startswith(fix)
    assert problem.transient is transient
    assert table_status_problem({"TableStatus": "UPDATING"}, table="t") is None


async def test_a_layer_without_a_region_is_told_to_set_one(
    moto_server: MotoServer, aws_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    layer = DynamoDBPersistenceLayer(
        new_table_name(), endpoint_url=moto_server.endpoint_url, session=aws_session
    )
    try:
        problem = only(await asyncio.wait_for(layer.check(), BOUND))
    finally:
        await layer.aclose()
    # The client does not open: reported as a request reports it, with the fix.
    assert problem.kind == "client"
    assert problem.message == (
        f"DynamoDB opening a client on table {layer.table_name!r}: no AWS region; set "
        "AWS_DEFAULT_REGION or pass region_name - (You must specify a region.)"
    )


async def test_a_key_the_table_refuses_is_found_by_the_probe_without_describe(
    moto_server: MotoServer, aws_session: Any
) -> None:
    actions = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"]
    session = await iam_user(moto_server, aws_session, actions)
    async with fresh_store(moto_server, session=aws_session, key_attr="pk") as store:
        layer = DynamoDBPersistenceLayer(
            store.table_name,
            endpoint_url=moto_server.endpoint_url,
            region_name="eu-west-1",
            session=session,
        )
        try:
            with iam_enforced():
                report = await asyncio.wait_for(layer.check(), BOUND)
        finally:
            await layer.aclose()
    assert ("table", "not checked (DescribeTable refused, and not needed)") in report.facts
    problem = only(report)
    assert problem.kind == "key-schema"
    assert problem.message.startswith(
        f"table {store.table_name!r} refused the layer's key during claim: "
    )
    assert problem.fix.startswith("make key_attr (and sort_key_attr for a composite key)")


async def test_a_user_without_wait_is_told_to_add_it(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("redis")
    user = f"app{uuid.uuid4().hex[:8]}"
    with node.admin() as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-wait")
    try:
        url = f"redis://{user}:pw@{node.host}:{node.port}?client=redis&wait_replicas=1"
        async with CachePersistenceLayer.from_url(url) as layer:
            problem = only(await asyncio.wait_for(layer.check(), BOUND))
    finally:
        with node.admin() as admin:
            admin.execute_command("ACL", "DELUSER", user)
    assert problem.kind == "permission"
    assert problem.message.startswith(f"{node.host}:{node.port} refused a command of user ")
    assert "wait" in problem.message.lower()
    assert problem.fix.startswith(f"ACL SETUSER {user} +evalsha")
    assert " +wait (the commands of the atomic path" in problem.fix


def _knows_all_slots(node: Server) -> bool:
    with node.admin() as admin:
        info = admin.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text and "cluster_known_nodes:2" in text


@pytest.fixture(scope="module")
def slotless_node() -> Iterator[Server]:
    """A cluster node holding no slot: the other node of its cluster holds them all, so
    every key sent to this one is answered with MOVED."""
    pool = ServerPool()
    try:
        empty, full = pool._start("redis", cluster=True), pool._start("redis", cluster=True)
        with full.admin() as admin:
            admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        with empty.admin() as admin:
            admin.execute_command("CLUSTER", "MEET", full.host, full.port)
        _wait_until(lambda: _knows_all_slots(empty), "the slotless node to see the cluster")
        yield empty
    finally:
        pool.close()


async def test_a_client_redirected_by_a_cluster_without_info_is_a_cluster_mode_problem(
    slotless_node: Server,
) -> None:
    # A user who may not run INFO: the server's mode is learnt from its first reply.
    user = f"app{uuid.uuid4().hex[:8]}"
    with slotless_node.admin() as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-info")

    async def make() -> Any:
        return aioredis.Redis(
            host=slotless_node.host, port=slotless_node.port, username=user, password="pw"
        )

    async with CachePersistenceLayer(client_factory=make) as layer:
        report = await asyncio.wait_for(layer.check(), BOUND)
    assert ("server", "not checked (INFO refused, and not needed)") in report.facts
    problem = only(report)
    assert problem.kind == "cluster-mode"
    assert problem.message == (
        "the server runs in cluster mode, but the layer connects to it as a standalone "
        "server: keys held by the other nodes fail with MOVED"
    )


class ForgetfulClient:
    """A fault: a cache client (of one's own, so the protocol path) in front of a real
    Redis that acknowledges every write and drops it."""

    def __init__(self, inner: aioredis.Redis) -> None:
        self.inner = inner

    async def get(self, name: str, /) -> bytes | str | None:
        value: bytes | str | None = await self.inner.get(name)
        return value

    async def set(self, name: str, value: str, /, **options: Any) -> Any:
        return True

    async def delete(self, *names: str) -> Any:
        return await self.inner.delete(*names)


async def test_a_cache_that_loses_its_writes_answered_the_probe_wrongly(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")
    inner = aioredis.Redis(host=node.host, port=node.port)
    try:
        layer = CachePersistenceLayer(client=ForgetfulClient(inner))
        problem = only(await asyncio.wait_for(layer.check(), BOUND))
    finally:
        await inner.aclose()
    assert problem.kind == "store-error"
    assert problem.message == (
        "the store answered get of a probe record wrongly: "
        "the claim just written reads back as None"
    )


def reply_without_item(client: Any) -> None:
    """A fault: every GetItem of `client` answers 200 without the item (as if the
    write before it had been lost), without a request."""

    class Response:
        status_code = 200
        headers: dict[str, str] = {}

    def answer(**_: Any) -> tuple[Any, dict[str, Any]]:
        return Response(), {"ResponseMetadata": {"HTTPStatusCode": 200}}

    client.meta.events.register("before-call.dynamodb.GetItem", answer)


async def test_a_table_that_loses_its_writes_answered_the_probe_wrongly(
    moto_server: MotoServer, user_client: Any
) -> None:
    async with fresh_store(moto_server, client=user_client) as store:
        reply_without_item(user_client)
        problem = only(await asyncio.wait_for(store.check(), BOUND))
    assert problem.kind == "store-error"
    assert problem.message == (
        "the store answered get of a probe record wrongly: "
        "the claim just written reads back as None"
    )


async def test_an_async_check_of_a_layer_given_only_a_boto3_client_is_a_client_problem(
    moto_server: MotoServer, boto3_session: Any
) -> None:
    client = boto3_session.client(
        "dynamodb", endpoint_url=moto_server.endpoint_url, region_name="eu-west-1"
    )
    try:
        layer = DynamoDBPersistenceLayer("idempotency", boto3_client=client)
        problem = only(await asyncio.wait_for(layer.check(), BOUND))
    finally:
        client.close()
    assert problem.kind == "client"
    assert problem.message.startswith(
        "the DynamoDB layer of table 'idempotency' was given a boto3 client, which serves "
        "sync code only"
    )
    assert problem.fix.startswith("follow the error's message")
