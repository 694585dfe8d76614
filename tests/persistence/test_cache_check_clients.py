"""`check()` of a cache layer given a client instead of a URL, on a real Redis: there is
no login of its own, so the server is read through the client (``INFO server``), which
an ACL may refuse or an unreachable server fail; a layer on a sync client is checked by
its sync twin; `raise_on_problem` raises what was found. Each test runs the async layer
and its sync twin."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Iterator
from typing import Literal

import pytest
import redis
import redis.asyncio as aioredis

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._check import StoreCheckReport
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency.exceptions import IdempotencyStoreCheckError
from tests.servers.redis import Server, ServerPool

World = Literal["async", "sync"]
WORLDS: list[World] = ["async", "sync"]
BOUND = 60.0  # no check here takes longer than this
INFO_REFUSED = ("server", "not checked (INFO refused, and not needed)")


@contextlib.contextmanager
def acl_user(node: Server, *rules: str) -> Iterator[str]:
    """An ACL user with password ``pw`` and `rules` on every key, deleted afterwards."""
    user = f"chk{uuid.uuid4().hex[:8]}"
    with node.admin() as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", *rules)
    try:
        yield user
    finally:
        with node.admin() as admin:
            admin.execute_command("ACL", "DELUSER", user)


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def check_on_client(
    world: World,
    port: int,
    *,
    user: str | None = None,
    raise_on_problem: bool = False,
) -> StoreCheckReport:
    """`check()` of a layer given a redis-py client of `world` for 127.0.0.1:`port`."""
    password = None if user is None else "pw"
    if world == "async":
        client = aioredis.Redis(
            host="127.0.0.1", port=port, username=user, password=password, socket_timeout=2
        )
        try:
            layer = CachePersistenceLayer(client=client)
            return await asyncio.wait_for(layer.check(raise_on_problem=raise_on_problem), BOUND)
        finally:
            await client.aclose()

    def in_a_thread() -> StoreCheckReport:
        with redis.Redis(
            "127.0.0.1", port, username=user, password=password, socket_timeout=2
        ) as client:
            layer = SyncCachePersistenceLayer(client=client)
            return layer.check(raise_on_problem=raise_on_problem)

    return await asyncio.wait_for(asyncio.to_thread(in_a_thread), BOUND)


@pytest.mark.parametrize("world", WORLDS)
async def test_a_client_whose_user_may_not_run_info_is_still_probed(
    cache_servers: ServerPool, world: World
) -> None:
    node = cache_servers.standalone("redis")
    with acl_user(node, "+@all", "-info") as user:
        report = await check_on_client(world, node.port, user=user)
    assert report.ok, str(report)
    assert report.facts[0] == INFO_REFUSED
    assert report.facts[-1] == ("probe", "claim, get, renew, release, complete, delete: ok")


@pytest.mark.parametrize("world", WORLDS)
async def test_a_client_of_a_server_that_is_down_fails_at_info(world: World) -> None:
    port = dead_port()
    report = await check_on_client(world, port)
    [problem] = report.problems
    assert problem.kind == "unreachable"
    assert problem.transient
    assert "during INFO" in problem.message
    assert report.facts == ()  # nothing was probed


@pytest.mark.parametrize("world", WORLDS)
async def test_raise_on_problem_raises_what_the_check_found(
    cache_servers: ServerPool, world: World
) -> None:
    node = cache_servers.standalone("redis")
    with (
        acl_user(node, "+@all", "-evalsha", "-eval") as user,
        pytest.raises(IdempotencyStoreCheckError) as raised,
    ):
        await check_on_client(world, node.port, user=user, raise_on_problem=True)
    report = raised.value.report
    assert report is not None
    assert [p.kind for p in report.problems] == ["permission"]
    assert "[permission]" in str(raised.value)
    assert "'evalsha'" in str(raised.value)


async def test_an_async_layer_on_a_sync_client_is_checked_by_its_sync_twin(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")
    with (
        acl_user(node, "+@all", "-evalsha", "-eval") as user,
        redis.Redis(node.host, node.port, username=user, password="pw") as client,
    ):
        layer = CachePersistenceLayer(client=client)
        report = await asyncio.wait_for(layer.check(), BOUND)
    assert report.store == "Redis/Valkey through a client given (atomic path)"
    assert ("server", "Redis 7.0.15 (standalone)") in report.facts
    [problem] = report.problems
    assert problem.kind == "permission"
    assert "'evalsha'" in problem.message


async def test_the_sync_twin_names_the_commands_refused_inside_scripts(
    cache_servers: ServerPool,
) -> None:
    node = cache_servers.standalone("redis")
    with acl_user(node, "+@all", "-strlen", "-time") as user:
        url = f"redis://{user}:pw@{node.host}:{node.port}?client=redis&timeout=5"

        def in_a_thread() -> StoreCheckReport:
            with SyncCachePersistenceLayer(url=url) as layer:
                return layer.check()

        report = await asyncio.wait_for(asyncio.to_thread(in_a_thread), BOUND)
    [problem] = report.problems
    assert problem.kind == "permission"
    assert problem.message == (
        f"{node.host}:{node.port} refuses user {user!r} the commands TIME, STRLEN inside "
        "scripts; the store's scripts need them (without STRLEN a record looks like another "
        "Redis type)"
    )
    assert not any(fact[0] == "probe" for fact in report.facts)  # it stopped there
