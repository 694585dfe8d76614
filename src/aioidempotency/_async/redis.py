"""Adapter from redis-py (or valkey-py) asyncio clients to the cache store.

`RedisPyCacheClient` wraps a ``redis.asyncio.Redis`` or ``RedisCluster`` (or valkey-py's
``valkey.asyncio`` twins) so that it offers the `CacheClient` methods, runs the store's
Lua scripts and waits for replicas on the connection that wrote (`wait_replicas`).
Its sync twin, ``aioidempotency._sync.redis``, is written by hand with the same
method names. With `auto_pipeline=True` (standalone clients), the commands of the
store's hot path issued in one turn of the event loop travel as one
``pipeline(transaction=False)`` (see ``aioidempotency._async.pipelining``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import weakref
from collections.abc import Sequence
from typing import Any

from aioidempotency._async.concurrency import outcomes
from aioidempotency._async.pipelining import DEFAULT_MAX_BATCH, Batcher
from aioidempotency._cache_errors import TRANSIENT, classify
from aioidempotency._lua import LuaScript
from aioidempotency._urls import CacheConnection
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = ["RedisPyCacheClient", "is_redis_client", "pool_capacity"]

#: A command for a batch: the pipeline's method, its arguments and keywords.
_Command = tuple[str, tuple[Any, ...], dict[str, Any]]


def is_redis_client(client: object) -> bool:
    """True for a redis-py or valkey-py asyncio client (standalone or cluster)."""
    module = type(client).__module__
    return (
        module.split(".")[0] in {"redis", "valkey"}
        and ".asyncio" in module
        and hasattr(client, "execute_command")
    )


def pool_capacity(client: Any) -> int | None:
    """How many commands `client` can have in flight before its pool refuses one: the
    pool's `max_connections` (per node for a cluster); None for a blocking pool, which
    makes a command wait for a connection instead."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        if type(pool).__name__ == "BlockingConnectionPool":
            return None
        capacity = getattr(pool, "max_connections", None)
    else:
        kwargs = getattr(getattr(client, "nodes_manager", None), "connection_kwargs", {})
        capacity = kwargs.get("max_connections") if isinstance(kwargs, dict) else None
    return capacity if isinstance(capacity, int) and 0 < capacity < 2**31 - 1 else None


class RedisPyCacheClient:
    """A redis-py (or valkey-py) asyncio client, standalone or cluster, with scripts.

    Scripts run with EVALSHA and fall back to EVAL once per server when the script is
    not cached yet. `owned=True` closes the client on `aclose()`. Calls in flight are
    bounded, per event loop, by what the client's pool can carry (its
    `max_connections`; per node for a cluster), so load waits for a connection instead
    of failing with "Too many connections". A `BlockingConnectionPool` already waits
    and gets no bound.

    `auto_pipeline=True` sends GET, SET (the plain claim ``SET NX GET`` too), DEL and
    EVALSHA issued in one turn of the event loop as one ``pipeline(transaction=False)``
    executed with ``raise_on_error=False`` (one connection, one write, one read), at
    most `max_batch` commands each; a batch takes one place of the in-flight bound. A
    command issued while none is queued or awaiting its reply goes alone, as without
    pipelining.
    Each caller gets its own reply or error; NOSCRIPT falls back to EVAL, as without
    pipelining. Not pipelined: a cluster client, `run_script_durably` (its own
    pipeline with ``WAIT``), `info`. `batchers` holds the `Batcher` of each event loop
    (its `batches` and `commands` count what it sent); `auto_pipeline` says whether
    commands are batched.
    """

    def __init__(
        self,
        client: Any,
        *,
        owned: bool = False,
        auto_pipeline: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.client = client
        self.owned = owned
        #: Whether the client is a cluster client (`RedisCluster`).
        self.cluster: bool = hasattr(client, "nodes_manager")
        root = type(client).__module__.split(".")[0]
        self._no_script: type[BaseException] = sys.modules[f"{root}.exceptions"].NoScriptError
        # A cluster client discovers its nodes on first use; concurrent first commands
        # race in that discovery (redis-py 8.1 drops a connection under a command in
        # flight, then retries it, so a claim can run twice and refuse itself).
        self._ready = not hasattr(client, "nodes_manager")
        self._ready_lock: asyncio.Lock | None = None
        self.max_in_flight = pool_capacity(client)
        self._limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self.auto_pipeline: bool = auto_pipeline and not self.cluster
        self.max_batch = max_batch
        self.batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Batcher[_Command]] = (
            weakref.WeakKeyDictionary()
        )
        self._connection_error: type[Exception] = sys.modules[f"{root}.exceptions"].ConnectionError

    @classmethod
    async def from_connection(
        cls, connection: CacheConnection, *, auto_pipeline: bool = False
    ) -> RedisPyCacheClient:
        """Open a client for `connection` (lazily: the first command connects); the
        adapter owns and closes it."""
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise IdempotencyPersistenceConfigError(
                "redis-py is not installed; install aioidempotency[redis]"
            ) from exc
        kind: Any = aioredis.RedisCluster if connection.cluster else aioredis.Redis
        timeout = connection.timeout
        client = kind.from_url(
            connection.redis_url(), socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(client, owned=True, auto_pipeline=auto_pipeline)

    async def _initialize(self) -> None:
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if not self._ready:
                await self.client.initialize()
                self._ready = True

    def _limit(self) -> asyncio.Semaphore | None:
        if self.max_in_flight is None:
            return None
        loop = asyncio.get_running_loop()
        limit = self._limits.get(loop)
        if limit is None:
            limit = self._limits.setdefault(loop, asyncio.Semaphore(self.max_in_flight))
        return limit

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self._ready:
            await self._initialize()
        limit = self._limit()
        if limit is None:
            return await getattr(self.client, method)(*args, **kwargs)
        async with limit:
            return await getattr(self.client, method)(*args, **kwargs)

    def _batcher(self) -> Batcher[_Command]:
        loop = asyncio.get_running_loop()
        batcher = self.batchers.get(loop)
        if batcher is None:
            batcher = Batcher(self._send_batch, closed=self._closed_error, max_batch=self.max_batch)
            self.batchers[loop] = batcher
        return batcher

    async def _pipelined(self, method: str, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """``client.method(*args, **options)``: in the next batch when another command is
        queued or awaiting its reply, else alone (and counted in flight)."""
        batcher = self._batcher()
        if batcher.idle:
            return await batcher.alone(self._call(method, *args, **options))
        return await batcher.submit((method, args, options))

    def _closed_error(self) -> Exception:
        return self._connection_error("the adapter was closed before this command was sent")

    async def _send_batch(self, commands: list[_Command]) -> list[Any]:
        """One ``pipeline(transaction=False)`` of `commands`; error replies in place."""
        limit = self._limit()
        async with limit if limit is not None else contextlib.nullcontext():
            pipe = self.client.pipeline(transaction=False)
            for method, args, options in commands:
                getattr(pipe, method)(*args, **options)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

    async def info(self) -> Any:
        """``INFO server`` of the server (of one node of a cluster): redis-py's parsed
        mapping (see `aioidempotency._check.parse_info`)."""
        if self.cluster:
            if not self._ready:
                await self._initialize()
            node = self.client.get_default_node()
            return await self.client.execute_command("INFO", "server", target_nodes=node)
        return await self.client.execute_command("INFO", "server")

    async def get(self, name: str) -> bytes | str | None:
        """GET `name`."""
        if self.auto_pipeline:
            batched: bytes | str | None = await self._pipelined("get", (name,), {})
            return batched
        value: bytes | str | None = await self._call("get", name)
        return value

    async def set(
        self,
        name: str,
        value: str,
        *,
        ex: int | None = None,
        exat: int | None = None,
        nx: bool = False,
    ) -> Any:
        """SET `name` with EX (seconds) or EXAT (epoch seconds) and NX."""
        if self.auto_pipeline:
            return await self._pipelined("set", (name, value), {"ex": ex, "exat": exat, "nx": nx})
        return await self._call("set", name, value, ex=ex, exat=exat, nx=nx)

    async def set_nx_get(self, name: str, value: str, *, ex: int) -> bytes | str | None:
        """``SET name value NX GET EX ex`` (Redis/Valkey >= 7.0): None when `name` was
        free and now holds `value`, else what it holds (left as it was)."""
        if self.auto_pipeline:
            options = {"ex": ex, "nx": True, "get": True}
            batched: bytes | str | None = await self._pipelined("set", (name, value), options)
            return batched
        old: bytes | str | None = await self._call("set", name, value, ex=ex, nx=True, get=True)
        return old

    async def set_nx_get_each(
        self, claims: Sequence[tuple[str, str, int]]
    ) -> list[bytes | str | Exception | None]:
        """`set_nx_get` of each ``(name, value, ex)``, one reply per claim and a
        command's error in its place. With pipelining, all go as one pipeline, at once;
        without (a cluster), each on its own, concurrently."""
        if not self.auto_pipeline:
            return await outcomes(self.set_nx_get(name, value, ex=ex) for name, value, ex in claims)
        commands: list[_Command] = [
            ("set", (name, value), {"ex": ex, "nx": True, "get": True})
            for name, value, ex in claims
        ]
        return await self._batcher().send_now(commands)

    async def delete(self, *names: str) -> int:
        """DEL `names`."""
        if self.auto_pipeline:
            removed: int = await self._pipelined("delete", names, {})
            return removed
        count: int = await self._call("delete", *names)
        return count

    async def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        """EVALSHA `script` on `key`'s node; EVAL when the server does not know it yet."""
        if self.auto_pipeline:
            try:
                return await self._pipelined("evalsha", (script.sha, 1, key, *args), {})
            except self._no_script:
                return await self._batcher().alone(self._call("eval", script.code, 1, key, *args))
        try:
            return await self._call("evalsha", script.sha, 1, key, *args)
        except self._no_script:
            return await self._call("eval", script.code, 1, key, *args)

    async def run_script_durably(
        self,
        script: LuaScript,
        key: str,
        args: Sequence[str | int],
        *,
        replicas: int,
        timeout_ms: int,
    ) -> tuple[Any, int]:
        """Run `script`, then ``WAIT replicas timeout_ms`` on the same connection (one
        pipeline, one round trip); returns the script's reply and the replicas that
        acknowledged it. ``WAIT`` counts the writes of its own connection only, so it
        cannot be sent on another one."""
        if not self._ready:
            await self._initialize()
        limit = self._limit()
        async with limit if limit is not None else contextlib.nullcontext():
            for command, first in (("EVALSHA", script.sha), ("EVAL", script.code)):
                commands = [(command, first, 1, key, *args), ("WAIT", replicas, timeout_ms)]
                try:
                    if hasattr(self.client, "nodes_manager"):
                        reply, acked = await self._on_cluster_node(key, commands)
                    else:
                        pipe = self.client.pipeline(transaction=False)
                        for parts in commands:
                            pipe.execute_command(*parts)
                        reply, acked = await pipe.execute()
                except self._no_script:
                    continue
                return reply, int(acked)
        raise AssertionError("unreachable: EVAL does not raise NoScriptError")

    async def _on_cluster_node(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send `commands` on one connection of the node holding `key` and read every
        reply (an error reply is raised after all replies are read, so the connection
        stays in step). Uses `ClusterNode.acquire_connection`/`release` of redis-py's
        asyncio cluster, which has no public per-node pipeline."""
        node = self.client.get_node_from_key(key)
        connection = node.acquire_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except Exception as exc:  # an error reply; keep reading the others
                    replies.append(exc)
        except BaseException as exc:
            await connection.disconnect()  # out of step with its replies: start afresh
            if isinstance(exc, (ConnectionError, OSError)) or classify(exc) == TRANSIENT:
                # The node may be gone (a failover): learn the topology again before
                # the layer retries, as the cluster client does for its own commands.
                with contextlib.suppress(Exception):
                    await self.client.nodes_manager.initialize()
            raise
        finally:
            node.release(connection)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def aclose(self) -> None:
        """Fail the commands still queued for a batch in this loop and wait for its
        batches in flight, then close the client if this adapter created it. As without
        pipelining, a command sent afterwards opens a connection again (redis-py
        reconnects a closed client)."""
        loop = asyncio.get_running_loop()
        batcher = self.batchers.pop(loop, None)
        if batcher is not None:
            await batcher.aclose()
        if self.owned:
            await self.client.aclose()
