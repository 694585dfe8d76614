"""Guards for the dependency internals aioidempotency relies on (docs/internals.md).

Each test checks one private attribute or undocumented behaviour of redis-py,
valkey-glide, aiobotocore/botocore/aioboto3, aiohttp or asyncio that our code uses,
so that a new release which changes it fails here rather than in production. The
upper bounds in pyproject.toml's optional dependencies keep users on releases these
tests have passed on; raise a bound only after this file passes on the new release.

Where the behaviour cannot be observed cheaply, the test pins the SHA-256 of the
upstream function's source (`_DIGESTS`). When a digest no longer matches: read the
new source, re-check what the comment next to the digest says we rely on, fix our
code if needed, then add the new digest to the set (keep the old ones while the old
releases are still allowed by pyproject.toml).

Only the dependencies are imported here, never our own modules: our code is named
by its public behaviour.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from typing import Any, cast
from unittest import mock

import aioboto3
import aiobotocore.session
import botocore.config
import glide
import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.connection
import redis.exceptions
from aiobotocore.config import AioConfig
from aiohttp import streams
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_request import BaseRequest

# Upstream functions whose source we pin, by "module:qualname", with the releases each
# digest was taken from. The comment says what to re-check when the source changes.
_DIGESTS: dict[str, set[str]] = {
    # Our per-node pipeline for `wait_replicas` on a redis-py RedisCluster takes a
    # connection with `acquire_connection()` and gives it back with `release()`.
    # Re-check: acquire still returns a connection of this node only (new or free),
    # raises MaxConnectionsError at `max_connections` (our per-loop semaphore is sized
    # from `nodes_manager.connection_kwargs["max_connections"]` so it never does), and
    # release still returns it to the node's free list (or disconnects it first).
    "redis.asyncio.cluster:ClusterNode.acquire_connection": {
        # redis 8.1.0
        "41b75bff8bdf6d2a28b954376e10bff35b9d3feb8d830bbe0655be54c9c4ca38",
    },
    "redis.asyncio.cluster:ClusterNode.release": {
        # redis 8.1.0
        "f2e333d163433924b7c90f5b03af487d1dfa6369fa42d0a727b68b2614d0760c",
    },
    # A connection from `acquire_connection()` may not be connected yet: we rely on
    # `send_packed_command` connecting it first. Re-check that it still does.
    "redis.asyncio.connection:AbstractConnection.send_packed_command": {
        # redis 8.1.0
        "baaeabd916209157db40455f034a0bac6fb3e2db902271313e0702bcbc678321",
    },
    # The sync redis-py adapter sends its scripts on a connection it borrows from a
    # standalone client's pool, as `Redis._execute_command` does, without that method's
    # per-command retry and metrics. Re-check: `get_connection` still hands out a
    # connected connection owned by the caller until `release`, and `release` still
    # takes back one the caller disconnected; and whether `_execute_command` now does
    # something a command needs besides retry and metrics (then the adapter must do it).
    "redis.connection:ConnectionPool.get_connection": {
        # redis 8.1.0
        "1616e950b3403e0d500bdeab712e7063ef3b41995bdeb6a79c6c0bed3ad29e42",
    },
    "redis.connection:ConnectionPool.release": {
        # redis 8.1.0
        "3c283de9f43e6a507b9f3326b909d94940e3833fda538100e0ced5618e1f34cf",
    },
    "redis.client:Redis._execute_command": {
        # redis 8.1.0
        "b57968fedf39db9448298c280b978953a312521b083629d6c6afeedb4a8bbe4e",
    },
    # `CachePersistenceLayer` with a glide client runs each script call in a task of its
    # own (shielded), because here the key and argument buffers live only in the frame
    # of the awaiting coroutine while the native core may still read them: cancelling
    # the caller would free them under the core. Re-check whether the buffers are now
    # kept alive until the call completes (then the extra task can go) or whether the
    # call path moved (then the workaround must follow it).
    "glide.glide_client:BaseClient._execute_script": {
        # valkey-glide 2.6.0
        "cf430d0c48a736296937ca5a899fec03b72755ce07fa925e22a3b14f7a7e40fc",
    },
    "glide.async_commands.standalone_commands:StandaloneCommands.invoke_script": {
        # valkey-glide 2.6.0
        "71b41a86cf9e41df028f6c1678f69521477bf6ce25d048132c170140a1dc7718",
    },
    "glide.async_commands.cluster_commands:ClusterCommands.invoke_script": {
        # valkey-glide 2.6.0
        "c3ae012dd1f3cf9079d81e776f816077b0baabece4650f9dff54c3a31913b7ec",
    },
    # The glide adapter keeps its `Script` objects in a module-level cache that it
    # clears at interpreter exit, because `Script.__del__` calls into the native
    # library to drop the script, which fails noisily once glide is torn down.
    # Re-check whether `__del__` still needs glide alive (or is gone).
    "glide_shared.script:Script.__del__": {
        # valkey-glide 2.6.0
        "ff07f0e551109253bfb916adfec462df3e1f7636f72a7a6303f2838957fc73cf",
    },
    # `DynamoDBPersistenceLayer.client_config()` merges its defaults under the
    # caller's `boto_config` with `AioConfig.merge`, relying on: only options the
    # caller passed explicitly (`_user_provided_options`) are carried, and the
    # argument's options win. Note this release's merge keeps `connector_args` but
    # not `http_session_cls`. Re-check both.
    "aiobotocore.config:AioConfig.merge": {
        # aiobotocore 2.25.1
        "a9d0bfc2bf3fc423b72feccd241482e7f17a88576f50608cf2a6ca423f8cd1c7",
    },
    # The aiohttp middleware reads the body itself (bounded) and stores it in
    # `BaseRequest._read_bytes`, so that the handler's `read()` (and `text()`,
    # `json()`, a urlencoded `post()`, which call it) find it. Re-check that `read()`
    # still returns `_read_bytes` when it is set, without touching the stream.
    "aiohttp.web_request:BaseRequest.read": {
        # aiohttp 3.14.5
        "5b94964416f69903a62e4be86d053cdb51d3914caf344835d010a6263add2f9d",
    },
    # The middleware also hands the handler a fresh stream holding the body it read, in
    # `BaseRequest._payload`, for multipart parsing. Re-check that `multipart()` (which
    # a multipart `post()` calls) still reads `self._payload`.
    "aiohttp.web_request:BaseRequest.multipart": {
        # aiohttp 3.14.5
        "c513ebef382e1d049b988f5a60249369d9d16b323a5bc481d08507bf14e7d9a8",
    },
}


def _source_digest(target: str) -> str:
    module_name, _, qualname = target.partition(":")
    obj: Any = __import__(module_name, fromlist=["_"])
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part)
    obj = inspect.unwrap(obj)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


def _check_digest(target: str) -> None:
    digest = _source_digest(target)
    assert digest in _DIGESTS[target], (
        f"the source of {target} changed (sha256 {digest}); re-check what the comment "
        f"on it in {__name__}._DIGESTS says we rely on, then add the digest there"
    )


# --- asyncio --------------------------------------------------------------------------------


async def test_asyncio_task_must_cancel() -> None:
    """`CachePersistenceLayer` raises CancelledError itself when a client swallowed a
    cancellation (the task's `cancelling()` went up during a store call, yet the call
    returned). It must not when the cancellation is still pending, to be delivered at
    the task's next await: that is what `Task._must_cancel` tells. We rely on it being
    True from a `cancel()` of the running task until its next suspension delivers
    CancelledError, and False otherwise. A stdlib internal: Python has no bound in
    pyproject.toml, so this runs on every Python the suite runs on."""
    seen: dict[str, object] = {}

    async def body() -> None:
        task = cast(Any, asyncio.current_task())
        seen["idle"] = task._must_cancel
        task.cancel()
        seen["pending"] = task._must_cancel
        seen["cancelling"] = task.cancelling()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            seen["delivered"] = task._must_cancel
            raise

    task = asyncio.get_running_loop().create_task(body())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == {"idle": False, "pending": True, "cancelling": 1, "delivered": False}


# --- redis-py -------------------------------------------------------------------------------


async def test_redis_cluster_is_told_apart_by_nodes_manager() -> None:
    """A redis-py client is treated as a cluster client when it has `nodes_manager`:
    its nodes are discovered once with `initialize()` before the first command (first
    commands racing in discovery can drop a connection under a command in flight and
    retry it), and after a failure on a node connection we call
    `nodes_manager.initialize()` to learn the topology again."""
    cluster = redis.asyncio.RedisCluster(host="localhost", port=7000)
    standalone = redis.asyncio.Redis()
    try:
        assert isinstance(cluster.nodes_manager, redis.asyncio.cluster.NodesManager)
        assert inspect.iscoroutinefunction(cluster.nodes_manager.initialize)
        assert inspect.iscoroutinefunction(cluster.initialize)
        assert not hasattr(standalone, "nodes_manager")
    finally:
        await cluster.aclose()
        await standalone.aclose()


async def test_redis_cluster_node_acquire_connection() -> None:
    """`CachePersistenceLayer(wait_replicas=N)` on a RedisCluster sends the script and
    ``WAIT`` on one connection of the key's node (redis-py's asyncio cluster has no
    public per-node pipeline): `get_node_from_key`, `ClusterNode.acquire_connection`,
    the connection's `pack_commands`, `send_packed_command`, `read_response` and
    `disconnect`, then `ClusterNode.release`."""
    assert callable(redis.asyncio.RedisCluster.get_node_from_key)
    node = redis.asyncio.cluster.ClusterNode("localhost", 7000, max_connections=1)
    connection = node.acquire_connection()
    assert isinstance(connection, redis.asyncio.connection.AbstractConnection)
    assert not connection.is_connected  # connected by send_packed_command (digest below)
    packed = connection.pack_commands([("EVALSHA", "sha", 1, "key", "a"), ("WAIT", 1, 100)])
    assert b"".join(packed).startswith(b"*5\r\n$7\r\nEVALSHA\r\n")
    for name in ("send_packed_command", "read_response", "disconnect"):
        assert inspect.iscoroutinefunction(getattr(connection, name)), name
    with pytest.raises(redis.exceptions.MaxConnectionsError):
        node.acquire_connection()  # our semaphore is sized so that this never happens
    node.release(connection)
    assert node.acquire_connection() is connection
    for target in (
        "redis.asyncio.cluster:ClusterNode.acquire_connection",
        "redis.asyncio.cluster:ClusterNode.release",
        "redis.asyncio.connection:AbstractConnection.send_packed_command",
    ):
        _check_digest(target)


async def test_redis_pool_capacity() -> None:
    """Calls in flight per loop are bounded by what the client's pool can carry: the
    pool's `max_connections`, or for a cluster `nodes_manager.connection_kwargs`'s
    ``max_connections`` (per node); no bound for a pool whose class is named
    ``BlockingConnectionPool`` (it waits for a connection instead of failing)."""
    cluster = redis.asyncio.RedisCluster(host="localhost", port=7000, max_connections=7)
    standalone = redis.asyncio.Redis(max_connections=5)
    blocking = redis.asyncio.Redis(
        connection_pool=redis.asyncio.BlockingConnectionPool(max_connections=3)
    )
    try:
        assert cluster.nodes_manager.connection_kwargs["max_connections"] == 7
        assert not hasattr(cluster, "connection_pool")
        assert standalone.connection_pool.max_connections == 5
        assert type(standalone.connection_pool).__name__ != "BlockingConnectionPool"
        assert type(blocking.connection_pool).__name__ == "BlockingConnectionPool"
    finally:
        await cluster.aclose()
        await standalone.aclose()
        await blocking.aclose()


def test_redis_sync_pool_connections() -> None:
    """The sync redis-py adapter sends its scripts on a pooled connection directly: a
    standalone client's ``connection`` is None (set only with
    ``single_connection_client``), its pool lends connections (`get_connection`, with a
    ``command_name`` that is optional from redis-py 5.3) and takes them back
    (`release`); a connection sends a command (`send_command`), reads one reply
    (`read_response`, raising `NoScriptError` for an unknown script), and `disconnect`s.
    `should_reconnect` is optional (redis-py 7 and later). A single-connection client's
    ``connection`` is checked on a real server in
    tests/sync/persistence/test_redis_pool_path.py."""
    client = redis.Redis()
    try:
        assert client.connection is None
        pool = client.connection_pool
        parameters = inspect.signature(pool.get_connection).parameters
        assert set(parameters) <= {"command_name", "keys", "options"}
        for name in ("get_connection", "release"):
            assert callable(getattr(pool, name))
        for name in ("send_command", "read_response", "disconnect"):
            assert callable(getattr(redis.connection.Connection, name))
    finally:
        client.close()
    for target in (
        "redis.connection:ConnectionPool.get_connection",
        "redis.connection:ConnectionPool.release",
        "redis.client:Redis._execute_command",
    ):
        _check_digest(target)


def test_redis_client_modules() -> None:
    """A client is recognised as redis-py's by the first part of its class's module
    (``redis``), and as asyncio by ``.asyncio`` in it (a synchronous client is refused).
    `RedisPyCacheClient` finds `NoScriptError` in ``<root>.exceptions``."""
    for cls in (redis.asyncio.Redis, redis.asyncio.RedisCluster):
        assert cls.__module__.split(".")[0] == "redis"
        assert ".asyncio" in cls.__module__
    for sync_cls in (redis.Redis, redis.RedisCluster):
        assert sync_cls.__module__.split(".")[0] == "redis"
        assert ".asyncio" not in sync_cls.__module__
    assert issubclass(redis.exceptions.NoScriptError, redis.exceptions.ResponseError)


def test_redis_exception_names() -> None:
    """The cache store classifies a redis-py error by its class name (redirected or
    failing over -> transient; refused credentials -> access denied) and counts
    ``redis.exceptions``' `ConnectionError` and `TimeoutError` as transient. A renamed
    class would silently turn a retryable failure into a hard one."""
    transient = {
        "MovedError",
        "AskError",
        "TryAgainError",
        "ClusterDownError",
        "MasterDownError",
        "ClusterError",
    }
    denied = {"AuthenticationError", "AuthorizationError", "NoPermissionError"}
    for name in sorted(transient | denied | {"ConnectionError", "TimeoutError"}):
        cls = getattr(redis.exceptions, name, None)
        assert isinstance(cls, type), name
        assert issubclass(cls, Exception), name
    # MovedError's text is "<slot> <host>:<port>", without the word MOVED: the class
    # name is what tells it apart.
    assert "MOVED" not in str(redis.exceptions.MovedError("3999 127.0.0.1:6381"))


def test_redis_cluster_ttl_exhausted_text() -> None:
    """redis-py's cluster client gives up on a slot that keeps redirecting with
    ``ClusterError("TTL exhausted.")``; the cache store retries on that text."""
    source = inspect.getsource(redis.asyncio.cluster.RedisCluster._execute_command)
    assert 'ClusterError("TTL exhausted.")' in source


# --- valkey-glide ---------------------------------------------------------------------------


async def test_glide_client_loop() -> None:
    """A glide client used from another event loop hangs, so the glide adapter refuses
    a foreign loop; it learns the client's loop from the private `_loop`, set by
    `create()` to the running loop (falling back to the first loop that uses the
    adapter when `_loop` is missing or not a loop)."""
    config = glide.GlideClientConfiguration(
        addresses=[glide.NodeAddress("127.0.0.1", 1)],
        lazy_connect=True,  # no server needed: nothing connects before a command
        request_timeout=200,
    )
    client = await glide.GlideClient.create(config)
    try:
        loop = client._loop
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert loop is asyncio.get_running_loop()
    finally:
        await client.close()


def test_glide_execute_script_keeps_arguments_in_the_awaiting_frame() -> None:
    """See the comment on `glide.glide_client:BaseClient._execute_script` in
    `_DIGESTS`: the reason script calls run in a task of their own."""
    for target in (
        "glide.glide_client:BaseClient._execute_script",
        "glide.async_commands.standalone_commands:StandaloneCommands.invoke_script",
        "glide.async_commands.cluster_commands:ClusterCommands.invoke_script",
    ):
        _check_digest(target)


def test_glide_script_del_needs_glide() -> None:
    """See the comment on `glide_shared.script:Script.__del__` in `_DIGESTS`."""
    assert "glide_shared.script.Script" in {
        f"{c.__module__}.{c.__name__}" for c in glide.Script.__mro__
    }
    _check_digest("glide_shared.script:Script.__del__")


def test_glide_client_classes() -> None:
    """A glide client is recognised without importing glide: a class in its MRO named
    ``GlideClient`` or ``GlideClusterClient`` whose module's first part is ``glide``."""
    for cls in (glide.GlideClient, glide.GlideClusterClient):
        assert cls.__module__.split(".")[0] == "glide"
        assert cls.__name__ in {"GlideClient", "GlideClusterClient"}


def test_glide_error_types() -> None:
    """The cache store counts glide's `ConnectionError`, `TimeoutError` and
    `ClosingError` (looked up on the ``glide`` module) as transient."""
    for name in ("ConnectionError", "TimeoutError", "ClosingError"):
        cls = getattr(glide, name, None)
        assert isinstance(cls, type), name
        assert issubclass(cls, Exception), name


# --- botocore / aiobotocore / aioboto3 ------------------------------------------------------


def test_botocore_config_user_provided_options() -> None:
    """`DynamoDBPersistenceLayer.client_config()` reads `boto_config`'s
    `_user_provided_options` to tell the options the caller set (which win) from
    botocore's defaults (which ours replace), then merges with `AioConfig.merge`."""
    plain = botocore.config.Config(connect_timeout=5, retries={"mode": "standard"})
    assert plain._user_provided_options == {
        "connect_timeout": 5,
        "retries": {"mode": "standard"},
    }
    assert botocore.config.Config()._user_provided_options == {}
    mine = AioConfig(read_timeout=7)
    assert mine._user_provided_options == {"read_timeout": 7}
    merged = mine.merge(AioConfig(connect_timeout=2, read_timeout=3))
    assert isinstance(merged, AioConfig)
    assert merged._user_provided_options == {"read_timeout": 3, "connect_timeout": 2}
    _check_digest("aiobotocore.config:AioConfig.merge")


def test_aioboto3_session_wraps_an_aiobotocore_session() -> None:
    """Whether the AWS configuration sets ``max_attempts`` or ``retry_mode`` is read
    from the session's scoped config; an aioboto3 `Session` keeps the aiobotocore
    session that has `get_scoped_config()` in its private `_session`."""
    session = aioboto3.Session(region_name="us-east-1")
    inner = session._session
    assert isinstance(inner, aiobotocore.session.AioSession)
    assert callable(inner.get_scoped_config)
    assert callable(session.client)
    assert callable(inner.create_client)


# --- aiohttp --------------------------------------------------------------------------------


async def test_aiohttp_request_read_bytes() -> None:
    """See the comment on `aiohttp.web_request:BaseRequest.read` in `_DIGESTS`. A
    multipart `post()` reads the stream itself, not `_read_bytes`: it does not find a
    body the middleware has read (see docs/internals.md)."""
    assert "_read_bytes" in BaseRequest.__annotations__
    payload = streams.StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(b"a=1")
    payload.feed_eof()
    request = make_mocked_request(
        "POST",
        "/",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "3"},
        payload=payload,
    )
    chunks = bytearray()
    while chunk := await request.content.readany():  # as the middleware reads it
        chunks.extend(chunk)
    request._read_bytes = bytes(chunks)
    assert await request.read() == b"a=1"
    assert await request.text() == "a=1"
    assert dict(await request.post()) == {"a": "1"}
    _check_digest("aiohttp.web_request:BaseRequest.read")
    _check_digest("aiohttp.web_request:BaseRequest.multipart")
