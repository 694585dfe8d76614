"""A node that turned replica during a failover refuses WAIT: a transient error.

A claim's script can land on a primary that is demoted before the ``WAIT`` after it
runs; the server then answers "WAIT cannot be used with replica instances". That is a
failover in progress, worth a retry, like READONLY and MOVED. The errors below are the
real ones, from a real server that is a replica, through each client.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from aioidempotency._cache_errors import TRANSIENT, classify, store_error
from aioidempotency.exceptions import IdempotencyPersistenceConnectionError
from tests.servers.redis import Server, ServerPool


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    pool = ServerPool()
    try:
        yield pool.standalone("valkey")
    finally:
        pool.close()


@contextlib.contextmanager
def demoted(server: Server) -> Iterator[None]:
    """The server turns replica (of a primary that is not there: port 1), as a
    demoted primary does in a failover, then primary again."""
    admin = server.admin()
    admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        admin.close()


def wait_error_sync(server: Server) -> Exception:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        client.ping()
        with demoted(server):
            client.execute_command("WAIT", 1, 10)  # type: ignore[no-untyped-call]
    except Exception as exc:
        return exc
    finally:
        client.close()
    raise AssertionError("WAIT on a replica was accepted")


async def wait_error_async(server: Server) -> Exception:
    client = redis.asyncio.Redis(host="127.0.0.1", port=server.port)
    try:
        await client.ping()
        with demoted(server):
            await client.execute_command("WAIT", 1, 10)  # type: ignore[no-untyped-call]
    except Exception as exc:
        return exc
    finally:
        await client.aclose()
    raise AssertionError("WAIT on a replica was accepted")


async def wait_error_glide(server: Server) -> Exception:
    from glide import GlideClient, GlideClientConfiguration, NodeAddress

    config = GlideClientConfiguration([NodeAddress("127.0.0.1", server.port)])
    client = await GlideClient.create(config)  # glide connects to a primary only
    try:
        with demoted(server):
            await client.custom_command(["WAIT", "1", "10"])
    except Exception as exc:
        return exc
    finally:
        await client.close()
    raise AssertionError("WAIT on a replica was accepted")


def wait_error_glide_sync(server: Server) -> Exception:
    from glide_sync import GlideClient, GlideClientConfiguration, NodeAddress

    config = GlideClientConfiguration([NodeAddress("127.0.0.1", server.port)])
    client = GlideClient.create(config)
    try:
        with demoted(server):
            client.custom_command(["WAIT", "1", "10"])
    except Exception as exc:
        return exc
    finally:
        client.close()
    raise AssertionError("WAIT on a replica was accepted")


@pytest.mark.parametrize("client", ["redis-py", "redis-py asyncio", "glide", "glide_sync"])
def test_wait_refused_by_a_demoted_primary_is_transient(server: Server, client: str) -> None:
    if client == "redis-py":
        error = wait_error_sync(server)
    elif client == "redis-py asyncio":
        error = asyncio.run(wait_error_async(server))
    elif client == "glide":
        error = asyncio.run(wait_error_glide(server))
    else:
        error = wait_error_glide_sync(server)
    assert "replica" in str(error)
    assert classify(error) == TRANSIENT
    mapped = store_error("claim", "k", error)
    assert isinstance(mapped, IdempotencyPersistenceConnectionError)
    assert mapped.transient


@pytest.mark.parametrize("module", ["glide", "glide_sync"])
def test_a_glide_connection_in_recovery_is_transient(module: str) -> None:
    """glide's cluster client fails requests on a node connection it is re-establishing
    (after a failover, or a password rotation) with a plain RequestError; a retry may
    succeed, and a layer diagnoses its cause (a refused login) only for transient errors."""
    glide = importlib.import_module(module)  # both are test dependencies
    error = glide.RequestError("Connection in recovery- ClientError")
    assert classify(error) == TRANSIENT
    mapped = store_error("claim", "fn#k", error)
    assert isinstance(mapped, IdempotencyPersistenceConnectionError)
    assert mapped.transient
