"""`store.check()` on real servers: a healthy store of every backend reports nothing;
each misconfiguration (a wrong password, an ACL user without the store's commands, a
cluster mode that is not the server's, an unreachable server, a missing table, a table
with another key schema, no TTL, IAM credentials that are refused or lack a permission)
is reported with its message and fix, by the async store and by its sync twin. The
errors the stores raise at run time are classified by the same causes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import pytest

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._check import (
    PROBE_PREFIX,
    StoreCheckReport,
    StoreProblem,
    parse_info,
    probe_records,
    script_problems,
    version_problem,
)
from aioidempotency._contract import ClaimResult
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer
from aioidempotency._twins import as_sync_store
from aioidempotency.exceptions import (
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceLayerError,
    IdempotencyPersistenceMisconfiguredError,
    IdempotencyStoreCheckError,
)
from tests.backends.dynamodb import fresh_store, new_table_name
from tests.servers.moto import MotoServer
from tests.servers.redis import Kind, Server, ServerPool

World = Literal["async", "sync"]
WORLDS: list[World] = ["async", "sync"]
BOUND = 60.0  # no check here takes longer than this


def only(report: StoreCheckReport) -> StoreProblem:
    """The report's one problem."""
    assert len(report.problems) == 1, str(report)
    return report.problems[0]


async def check_cache(url: str, world: World, *, probe: bool = True) -> StoreCheckReport:
    """`check()` of a layer built from `url`, by the async layer or its sync twin."""
    if world == "async":
        async with CachePersistenceLayer.from_url(url) as layer:
            return await asyncio.wait_for(layer.check(probe=probe), BOUND)

    def in_a_thread() -> StoreCheckReport:
        with SyncCachePersistenceLayer(url=url) as layer:
            return layer.check(probe=probe)

    return await asyncio.wait_for(asyncio.to_thread(in_a_thread), BOUND)


# -- every backend -----------------------------------------------------------------------


async def test_a_healthy_store_of_every_backend_reports_no_problem(
    store: PersistenceLayer,
) -> None:
    report = await asyncio.wait_for(store.check(), BOUND)
    assert report.ok, str(report)
    assert ("probe", "claim, get, renew, release, complete, delete: ok") in report.facts
    report.raise_for_problems()  # nothing to raise
    twin = as_sync_store(store)
    synced = await asyncio.wait_for(asyncio.to_thread(twin.check), BOUND)
    assert synced.ok, str(synced)
    assert "no problems found" in str(synced)


async def test_the_probe_leaves_nothing_behind(store: PersistenceLayer) -> None:
    claim, _, _ = probe_records()
    assert (await store.check()).ok
    # The probe used a key of its own; the key a new probe would use is free, and so is
    # every key the check wrote (it deleted them).
    assert await store.get(claim.idempotency_key) is None
    assert claim.idempotency_key.startswith(PROBE_PREFIX)


class Broken(PersistenceLayer):
    """A store of one's own whose completion loses the record: `check` must say so."""

    def __init__(self) -> None:
        self.records: dict[str, DataRecord] = {}

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self.records[record.idempotency_key] = record
        return ClaimResult(claimed=True)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        return self.records.get(key)

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        self.records.pop(record.idempotency_key, None)

    async def release(self, key: str, *, owner: str) -> None:
        self.records.pop(key, None)

    async def renew(self, record: DataRecord) -> None:
        raise ConnectionError("the server went away")

    async def delete(self, key: str) -> bool:
        return self.records.pop(key, None) is not None


async def test_the_default_check_runs_the_contract_on_a_store_of_ones_own() -> None:
    report = await Broken().check()
    problem = only(report)
    assert problem.kind == "store-error"
    assert problem.message == "the store failed during renew: ConnectionError: the server went away"
    assert report.store == "Broken"
    assert not (await Broken().check(probe=False)).problems  # a read alone works
    with pytest.raises(IdempotencyStoreCheckError) as raised:
        await Broken().check(raise_on_problem=True)
    assert raised.value.report is not None
    assert raised.value.report.problems[0].kind == "store-error"
    assert isinstance(raised.value, IdempotencyPersistenceConfigError)
    assert "[store-error] the store failed during renew" in str(raised.value)


# -- Redis and Valkey ------------------------------------------------------------------------


@contextlib.contextmanager
def acl_user(node: Server, *rules: str) -> Iterator[str]:
    """An ACL user with password ``pw`` and `rules` on every key, deleted afterwards."""
    user = f"app{uuid.uuid4().hex[:8]}"
    with node.admin() as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", *rules)
    try:
        yield user
    finally:
        with node.admin() as admin:
            admin.execute_command("ACL", "DELUSER", user)


def url_of(
    node: Server, client: str, *, user: str = "", cluster: bool = False, **query: str
) -> str:
    auth = f"{user}@" if user else ""
    options = f"client={client}&timeout=5" + "".join(f"&{k}={v}" for k, v in query.items())
    return f"redis://{auth}{node.host}:{node.port}?{options}" + ("&cluster=true" if cluster else "")


SERVER_CLIENTS = [("redis", "redis"), ("valkey", "glide")]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("kind", "client"), SERVER_CLIENTS)
async def test_a_wrong_password_is_an_authentication_problem(
    cache_servers: ServerPool, kind: Kind, client: str, world: World
) -> None:
    node = cache_servers.standalone(kind)
    with acl_user(node, "+@all") as user:
        report = await check_cache(url_of(node, client, user=f"{user}:wrong"), world)
        problem = only(report)
        assert problem.kind == "authentication"
        assert problem.message.startswith(
            f"{node.host}:{node.port} refused the login of user {user!r}: "
        )
        assert "WRONGPASS" in problem.message or "invalid username-password" in problem.message
        assert problem.fix.startswith("put the right user and password in the URL")
        assert not problem.transient
        assert f"{user}@" in report.store
        assert "wrong" not in report.store


@pytest.mark.parametrize(("kind", "client"), SERVER_CLIENTS)
async def test_a_wrong_password_fails_calls_as_access_denied_a_config_error(
    cache_servers: ServerPool, kind: Kind, client: str
) -> None:
    node = cache_servers.standalone(kind)
    with acl_user(node, "+@all") as user:
        async with CachePersistenceLayer.from_url(url_of(node, client, user=f"{user}:no")) as layer:
            with pytest.raises(IdempotencyPersistenceLayerError) as raised:
                await asyncio.wait_for(layer.get("k"), BOUND)
    assert isinstance(raised.value, IdempotencyPersistenceAccessDeniedError)
    assert isinstance(raised.value, IdempotencyPersistenceConfigError)
    assert not raised.value.transient


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("kind", "client"), SERVER_CLIENTS)
async def test_a_user_without_the_script_commands_is_a_permission_problem(
    cache_servers: ServerPool, kind: Kind, client: str, world: World
) -> None:
    node = cache_servers.standalone(kind)
    with acl_user(node, "+@all", "-evalsha", "-eval") as user:
        problem = only(await check_cache(url_of(node, client, user=f"{user}:pw"), world))
    assert problem.kind == "permission"
    assert problem.message.startswith(
        f"{node.host}:{node.port} refused a command of user {user!r} during a script: "
    )
    assert "'evalsha'" in problem.message
    glide = "+@connection +info " if client == "glide" else ""
    assert problem.fix.startswith(
        f"ACL SETUSER {user} {glide}+evalsha +eval +get +set +del +strlen +getrange +exists "
        "+type +time (the commands of the atomic path"
    )


@pytest.mark.parametrize(("kind", "client"), SERVER_CLIENTS)
async def test_commands_refused_inside_scripts_are_named(
    cache_servers: ServerPool, kind: Kind, client: str
) -> None:
    # Without STRLEN the scripts take every record for another Redis type: each
    # completion would fail as "taken over". Only the check names the command.
    node = cache_servers.standalone(kind)
    with acl_user(node, "+@all", "-strlen", "-time") as user:
        problem = only(await check_cache(url_of(node, client, user=f"{user}:pw"), "async"))
    assert problem.kind == "permission"
    assert problem.message == (
        f"{node.host}:{node.port} refuses user {user!r} the commands TIME, STRLEN inside "
        "scripts; the store's scripts need them (without STRLEN a record looks like another "
        "Redis type)"
    )


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("kind", "client"), SERVER_CLIENTS)
async def test_the_protocol_path_needs_set(
    cache_servers: ServerPool, kind: Kind, client: str, world: World
) -> None:
    node = cache_servers.standalone(kind)
    with acl_user(node, "+@all", "-set") as user:
        url = url_of(node, client, user=f"{user}:pw", atomic="false")
        problem = only(await check_cache(url, world))
    assert problem.kind == "permission"
    assert "during claim" in problem.message
    assert "'set'" in problem.message
    assert f"ACL SETUSER {user} " in problem.fix
    assert "+get +set +del (the commands" in problem.fix


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("client", ["redis", "glide"])
async def test_cluster_mode_must_be_the_servers(
    cache_servers: ServerPool, client: str, world: World
) -> None:
    standalone = cache_servers.standalone("valkey")
    node = cache_servers.cluster("valkey")[0]

    problem = only(await check_cache(url_of(node, client), world))
    assert problem.kind == "cluster-mode"
    assert problem.message == (
        f"{node.host}:{node.port} runs in cluster mode, but the layer connects to it as a "
        "standalone server: keys held by the other nodes fail with MOVED"
    )
    assert problem.fix.startswith("add cluster=true to the URL (or pass mode='cluster')")

    problem = only(await check_cache(url_of(standalone, client, cluster=True), world))
    assert problem.kind == "cluster-mode"
    assert problem.message == (
        f"{standalone.host}:{standalone.port} is not a cluster node, but the layer connects "
        "in cluster mode"
    )
    assert problem.fix == "remove cluster=true from the URL (or pass mode='standalone')"

    healthy = await check_cache(url_of(node, client, cluster=True), world)
    assert healthy.ok, str(healthy)
    assert ("server", "Valkey 9.1.2 (cluster)") in healthy.facts


async def test_a_standalone_client_redirected_by_a_cluster_is_misconfigured(
    cache_servers: ServerPool,
) -> None:
    # Some key of every batch of ten lives on another node than the one in the URL.
    node = cache_servers.cluster("redis")[0]

    async def read_ten() -> None:
        async with CachePersistenceLayer.from_url(url_of(node, "redis")) as layer:
            for index in range(10):
                await asyncio.wait_for(layer.get(f"key-{index}"), BOUND)

    with pytest.raises(IdempotencyPersistenceMisconfiguredError) as raised:
        await read_ten()
    assert "cluster mode is not the server's" in str(raised.value)
    assert not raised.value.transient


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("client", ["redis", "glide"])
async def test_a_server_that_is_down_is_unreachable_and_transient(
    client: str, world: World
) -> None:
    port = dead_port()
    problem = only(await check_cache(f"redis://127.0.0.1:{port}?client={client}&timeout=1", world))
    assert problem.kind == "unreachable"
    assert problem.transient
    assert problem.message.startswith(f"127.0.0.1:{port} could not be reached during the login: ")
    assert problem.fix.startswith("check the host and port, that the server runs, TLS")


async def test_a_check_without_probe_writes_nothing(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("redis")
    with node.admin() as admin:
        admin.flushall()
        report = await check_cache(url_of(node, "redis"), "async", probe=False)
        assert admin.dbsize() == 0
        assert report.ok
        assert report.facts == (("server", "Redis 7.0.15 (standalone)"),)
        probed = await check_cache(url_of(node, "redis"), "async")
        assert probed.ok
        assert admin.dbsize() == 0  # the probe deleted its key


@pytest.mark.parametrize("world", WORLDS)
async def test_a_layer_on_a_client_factory_is_checked_through_its_client(
    cache_servers: ServerPool, world: World
) -> None:
    node = cache_servers.standalone("redis")
    with acl_user(node, "+@all", "-evalsha", "-eval") as user:
        if world == "async":
            import redis.asyncio as aioredis

            async def make() -> Any:
                return aioredis.Redis(host=node.host, port=node.port, username=user, password="pw")

            async with CachePersistenceLayer(client_factory=make) as layer:
                report = await asyncio.wait_for(layer.check(), BOUND)
        else:
            import redis

            def make_sync() -> Any:
                return redis.Redis(host=node.host, port=node.port, username=user, password="pw")

            def in_a_thread() -> StoreCheckReport:
                with SyncCachePersistenceLayer(client_factory=make_sync) as layer:
                    return layer.check()

            report = await asyncio.wait_for(asyncio.to_thread(in_a_thread), BOUND)
    problem = only(report)
    assert report.store == "Redis/Valkey through client_factory (atomic path)"
    assert ("server", "Redis 7.0.15 (standalone)") in report.facts
    assert problem.kind == "permission"
    assert "refused a command of user the client's user" not in problem.message
    assert "'evalsha'" in problem.message
    assert problem.fix.startswith("ACL SETUSER default +evalsha")


def test_an_old_server_is_reported_with_the_version_it_runs() -> None:
    # No Redis older than 6.2 is available to the suite: the INFO reply of one is.
    info = parse_info(b"# Server\r\nredis_version:6.0.16\r\nredis_mode:standalone\r\n")
    problem = version_problem(info, "cache:6379")
    assert problem is not None
    assert problem.kind == "server-version"
    assert problem.message == (
        "cache:6379 runs Redis 6.0.16, older than 6.2: the store writes records with "
        "SET ... EXAT (and renews them with KEEPTTL), which it does not know"
    )
    assert version_problem(parse_info({"redis_version": "6.2.0"}), "x") is None
    valkey = parse_info({"redis_version": "7.2.4", "valkey_version": "8.0.1"})
    assert version_problem(valkey, "x") is None
    # What such a server answers inside the scripts: a syntax error, not an ACL refusal.
    problems = script_problems(
        [b"SET", b"ERR syntax error"], where="cache:6379", user=None, glide=False, wait=False
    )
    assert [p.kind for p in problems] == ["scripts"]
    assert problems[0].message == (
        "cache:6379 refused commands the store's scripts run: SET: ERR syntax error"
    )


# -- DynamoDB --------------------------------------------------------------------------------


async def check_dynamodb(layer: DynamoDBPersistenceLayer, world: World) -> StoreCheckReport:
    if world == "async":
        return await asyncio.wait_for(layer.check(), BOUND)
    twin = SyncDynamoDBPersistenceLayer(  # with a boto3 client of its own
        layer.table_name,
        key_attr=layer.key_attr,
        sort_key_attr=layer.sort_key_attr,
        static_pk_value=layer.static_pk_value,
        attributes=layer.attributes,
        endpoint_url=layer.endpoint_url,
        region_name=layer.region_name,
    )

    def in_a_thread() -> StoreCheckReport:
        try:
            return twin.check()
        finally:
            twin.close()

    return await asyncio.wait_for(asyncio.to_thread(in_a_thread), BOUND)


@contextlib.asynccontextmanager
async def layer_on(
    moto_server: MotoServer, table: str, **options: Any
) -> AsyncIterator[DynamoDBPersistenceLayer]:
    layer = DynamoDBPersistenceLayer(
        table, endpoint_url=moto_server.endpoint_url, region_name="eu-west-1", **options
    )
    try:
        yield layer
    finally:
        await layer.aclose()


@pytest.mark.parametrize("world", WORLDS)
async def test_a_missing_table_is_reported(moto_server: MotoServer, world: World) -> None:
    table = new_table_name()
    async with layer_on(moto_server, table) as layer:
        report = await check_dynamodb(layer, world)
        with pytest.raises(IdempotencyPersistenceMisconfiguredError) as raised:
            await layer.get("k")
    problem = only(report)
    assert problem.kind == "table-missing"
    assert problem.message == (
        f"table {table!r} does not exist in region eu-west-1 at {moto_server.endpoint_url}"
    )
    assert problem.fix.startswith("create it (docs/dynamodb.md, Table setup;")
    assert report.store == (
        f"DynamoDB table {table!r} in region eu-west-1 at {moto_server.endpoint_url}"
    )
    assert "the table does not exist" in str(raised.value)
    assert not raised.value.transient


@pytest.mark.parametrize("world", WORLDS)
async def test_a_table_with_another_key_schema_is_reported(
    moto_server: MotoServer, aws_session: Any, world: World
) -> None:
    async with fresh_store(moto_server, session=aws_session, key_attr="pk") as simple:
        async with layer_on(
            moto_server, simple.table_name, key_attr="pk", sort_key_attr="sk"
        ) as composite:
            problem = only(await check_dynamodb(composite, world))
            assert problem.kind == "key-schema"
            assert problem.message == (
                f"table {simple.table_name!r} has partition key 'pk', but the layer uses "
                "partition key 'pk' and sort key 'sk'"
            )
            assert problem.fix.startswith("build the layer with key_attr='pk' and no sort_key_attr")
            # At run time DynamoDB takes the sort key for an ordinary attribute: every key
            # lands on the one item of the partition key's static value. Only check() sees it.
            first, second = probe_records()[0], probe_records()[0]
            assert (await composite.claim(first, now=time.time())).claimed
            refused = await composite.claim(second, now=time.time())
            assert refused.existing is not None
            assert refused.existing.owner == first.owner
        async with layer_on(moto_server, simple.table_name) as other_name:
            problem = only(await check_dynamodb(other_name, world))
            assert problem.message == (
                f"table {simple.table_name!r} has partition key 'pk', but the layer uses "
                "partition key 'id'"
            )


async def test_a_composite_table_used_with_a_simple_key_is_reported(
    moto_server: MotoServer, aws_session: Any
) -> None:
    async with fresh_store(
        moto_server, session=aws_session, key_attr="pk", sort_key_attr="sk"
    ) as composite:
        assert (await composite.check()).ok
        async with layer_on(moto_server, composite.table_name, key_attr="pk") as simple:
            problem = only(await simple.check())
    assert problem.kind == "key-schema"
    assert problem.fix.startswith("build the layer with key_attr='pk', sort_key_attr='sk'")


@pytest.mark.parametrize("world", WORLDS)
async def test_a_table_without_ttl_is_reported(
    moto_server: MotoServer, aws_session: Any, world: World
) -> None:
    table = new_table_name()
    async with layer_on(moto_server, table, session=aws_session) as layer:
        client = await layer.client()
        await client.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        try:
            report = await check_dynamodb(layer, world)
            problem = only(report)
            assert problem.kind == "ttl"
            assert problem.message == (
                f"TTL is DISABLED on table {table!r}: expired records are never deleted and "
                "the table only grows (they still count as expired)"
            )
            assert problem.fix.startswith(
                f"`aws dynamodb update-time-to-live --table-name {table} "
                "--time-to-live-specification Enabled=true,AttributeName=expiration`"
            )
            # the store works meanwhile: the probe ran
            assert ("probe", "claim, get, renew, release, complete, delete: ok") in report.facts
            await client.update_time_to_live(
                TableName=table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"},
            )
            problem = only(await check_dynamodb(layer, world))
            assert problem.message == (
                f"TTL on table {table!r} is on attribute 'ttl', but the layer writes expiries "
                "to 'expiration': expired records are never deleted"
            )
            assert problem.fix.startswith("build the layer with expiry_attr='ttl', or move the TTL")
        finally:
            await client.delete_table(TableName=table)


@contextlib.contextmanager
def iam_enforced() -> Iterator[None]:
    """moto checks every request's credentials and IAM policy inside the block."""
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():
        yield


async def iam_user(moto_server: MotoServer, aws_session: Any, actions: list[str]) -> Any:
    """An aiobotocore session with the keys of a new IAM user allowed `actions`."""
    from aiobotocore.session import AioSession

    name = f"app-{uuid.uuid4().hex[:8]}"
    async with aws_session.create_client(
        "iam", endpoint_url=moto_server.endpoint_url, region_name="us-east-1"
    ) as iam:
        await iam.create_user(UserName=name)
        key = (await iam.create_access_key(UserName=name))["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        await iam.put_user_policy(
            UserName=name, PolicyName="idempotency", PolicyDocument=json.dumps(policy)
        )
    session = AioSession()
    session.set_credentials(key["AccessKeyId"], key["SecretAccessKey"])
    return session


async def test_refused_credentials_are_an_authentication_problem(
    moto_server: MotoServer, aws_session: Any
) -> None:
    async with (
        fresh_store(moto_server, session=aws_session) as store,
        layer_on(moto_server, store.table_name, session=aws_session) as layer,
    ):
        with iam_enforced():  # the suite's dummy keys belong to no IAM user
            report = await layer.check()
            with pytest.raises(IdempotencyPersistenceAccessDeniedError) as raised:
                await layer.get("k")
    problem = only(report)
    assert problem.kind == "authentication"
    assert problem.message == (
        "AWS refused the credentials during DescribeTable: InvalidClientTokenId: The "
        "security token included in the request is invalid."
    )
    assert problem.fix.startswith("check the credentials this process runs with")
    assert "AWS refused the credentials" in str(raised.value)
    assert isinstance(raised.value, IdempotencyPersistenceConfigError)


async def test_a_missing_iam_permission_is_named(moto_server: MotoServer, aws_session: Any) -> None:
    session = await iam_user(
        moto_server,
        aws_session,
        ["dynamodb:GetItem", "dynamodb:DescribeTable", "dynamodb:DescribeTimeToLive"],
    )
    async with (
        fresh_store(moto_server, session=aws_session) as store,
        layer_on(moto_server, store.table_name, session=session) as layer,
    ):
        with iam_enforced():
            report = await layer.check()
            with pytest.raises(IdempotencyPersistenceAccessDeniedError, match="IAM"):
                await layer.claim(probe_records()[0], now=time.time())
            assert await layer.get("k") is None  # what it may do still works
    problem = only(report)
    assert problem.kind == "permission"
    assert problem.message.startswith(
        f"the credentials may not run dynamodb:PutItem on table {store.table_name!r} during claim: "
    )
    assert problem.fix.startswith(
        "grant dynamodb:PutItem, dynamodb:GetItem, dynamodb:UpdateItem and dynamodb:DeleteItem"
    )


async def test_describe_permissions_are_not_needed_to_pass(
    moto_server: MotoServer, aws_session: Any
) -> None:
    actions = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"]
    session = await iam_user(moto_server, aws_session, actions)
    async with (
        fresh_store(moto_server, session=aws_session) as store,
        layer_on(moto_server, store.table_name, session=session) as layer,
    ):
        with iam_enforced():
            report = await layer.check()
    assert report.ok, str(report)
    assert ("table", "not checked (DescribeTable refused, and not needed)") in report.facts
    assert ("ttl", "not checked (DescribeTimeToLive refused)") in report.facts


async def test_a_completed_probe_record_is_a_record_like_any_other() -> None:
    claim, renewed, done = probe_records(now=1_000)
    assert claim.status is RecordStatus.INPROGRESS
    assert done.status is RecordStatus.COMPLETED
    assert claim.idempotency_key == renewed.idempotency_key == done.idempotency_key
    assert claim.expiry_timestamp == done.expiry_timestamp == 1_060
    assert renewed.in_progress_expiry_timestamp == 1_059_000
    assert claim.owner is not None
    assert len(claim.owner) == 32
