"""Adapter from redis-py (or valkey-py) sync clients to the sync cache store.

The twin of ``aioidempotency._async.redis``, written by hand: `SyncRedisPyCacheClient`
wraps a ``redis.Redis`` or ``redis.RedisCluster`` (or valkey-py's) with the same
methods as `RedisPyCacheClient`: the `SyncCacheClient` methods, the store's Lua
scripts, and ``WAIT`` on the connection that wrote (`wait_replicas`). redis-py's sync
clients are thread-safe (a pool of connections), so one serves every thread.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Sequence
from typing import Any

from aioidempotency._async.redis import pool_capacity
from aioidempotency._cache_errors import TRANSIENT, classify
from aioidempotency._lua import LuaScript
from aioidempotency._sync.concurrency import Slots
from aioidempotency._sync.redis_pool import PoolConnections, idle_bound
from aioidempotency._urls import CacheConnection
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = ["SyncRedisPyCacheClient", "is_redis_client"]


def is_redis_client(client: object) -> bool:
    """True for a redis-py or valkey-py sync client (standalone or cluster)."""
    module = type(client).__module__
    return (
        module.split(".")[0] in {"redis", "valkey"}
        and ".asyncio" not in module
        and hasattr(client, "execute_command")
    )


def _plain_pool(client: Any) -> Any:
    """The connection pool of a standalone client that takes commands on any pooled
    connection, or None (a cluster client, a single-connection client, a client
    without a pool): those run scripts through their own ``execute_command``."""
    pool = getattr(client, "connection_pool", None)  # a RedisCluster has none
    if getattr(client, "connection", None) is not None or not hasattr(pool, "get_connection"):
        return None
    return pool


def _takes_no_name(pool: Any) -> bool:
    """Whether `pool.get_connection` can be called without a command name."""
    if pool is None:
        return True
    parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
    return parameter is None or parameter.default is not inspect.Parameter.empty


class SyncRedisPyCacheClient:
    """A redis-py (or valkey-py) sync client, standalone or cluster, with scripts.

    Scripts run with EVALSHA and fall back to EVAL once per server when the script is
    not cached yet. `owned=True` closes the client on `close()`. Calls in flight are
    bounded by what the client's pool can carry (its `max_connections`; per node for a
    cluster), so threads wait for a connection instead of failing with "Too many
    connections"; a `BlockingConnectionPool` already waits and gets no bound.
    """

    def __init__(self, client: Any, *, owned: bool = False) -> None:
        self.client = client
        self.owned = owned
        #: Whether the client is a cluster client (`RedisCluster`).
        self.cluster: bool = hasattr(client, "nodes_manager")
        root = type(client).__module__.split(".")[0]
        errors = sys.modules[f"{root}.exceptions"]
        self._no_script: type[BaseException] = errors.NoScriptError
        self._response_error: type[BaseException] = errors.ResponseError
        self.max_in_flight = pool_capacity(client)
        self._limit: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if self.max_in_flight is None else Slots(self.max_in_flight)
        )
        pool = _plain_pool(client)
        # redis-py < 5.3 wants the command name (unused since); later versions warn on it.
        pool_args: tuple[str, ...] = () if _takes_no_name(pool) else ("EVALSHA",)
        self._connections: PoolConnections | None = (
            None
            if pool is None
            else PoolConnections(pool, keep=idle_bound(pool), pool_args=pool_args)
        )

    @classmethod
    def from_connection(cls, connection: CacheConnection) -> SyncRedisPyCacheClient:
        """Open a client for `connection`; the adapter owns and closes it. A cluster
        client learns the topology here (redis-py connects it at once)."""
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise IdempotencyPersistenceConfigError(
                "redis-py is not installed; install aioidempotency[redis]"
            ) from exc
        kind: Any = redis.RedisCluster if connection.cluster else redis.Redis
        timeout = connection.timeout
        client = kind.from_url(
            connection.redis_url(), socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(client, owned=True)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._limit:
            return getattr(self.client, method)(*args, **kwargs)

    def info(self) -> Any:
        """``INFO server`` of the server (of one node of a cluster): redis-py's parsed
        mapping (see `aioidempotency._check.parse_info`)."""
        if self.cluster:
            node = self.client.get_default_node()
            return self.client.execute_command("INFO", "server", target_nodes=node)
        return self.client.execute_command("INFO", "server")

    def get(self, name: str) -> bytes | str | None:
        """GET `name`."""
        value: bytes | str | None = self._call("get", name)
        return value

    def set(
        self,
        name: str,
        value: str,
        *,
        ex: int | None = None,
        exat: int | None = None,
        nx: bool = False,
    ) -> Any:
        """SET `name` with EX (seconds) or EXAT (epoch seconds) and NX."""
        return self._call("set", name, value, ex=ex, exat=exat, nx=nx)

    def delete(self, *names: str) -> int:
        """DEL `names`."""
        count: int = self._call("delete", *names)
        return count

    def set_nx_get(self, name: str, value: str, *, ex: int) -> bytes | str | None:
        """``SET name value NX GET EX ex`` (Redis/Valkey >= 7.0): None when `name` was
        free and now holds `value`, else what it holds (left as it was)."""
        if self._connections is not None:
            old: bytes | str | None = self._on_pool(
                self._connections, ("SET", name, value, "NX", "GET", "EX", ex)
            )
        else:
            old = self._call("set", name, value, ex=ex, nx=True, get=True)
        return old

    def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        """EVALSHA `script` on `key`'s node; EVAL when the server does not know it yet."""
        if self._connections is not None:
            return self._on_pool(
                self._connections,
                ("EVALSHA", script.sha, 1, key, *args),
                ("EVAL", script.code, 1, key, *args),
            )
        try:
            return self._call("evalsha", script.sha, 1, key, *args)
        except self._no_script:
            return self._call("eval", script.code, 1, key, *args)

    def _on_pool(
        self,
        connections: PoolConnections,
        command: tuple[Any, ...],
        unknown_script: tuple[Any, ...] = (),
    ) -> Any:
        """`command` on a connection of a standalone client's pool, sent and read
        directly (`unknown_script` instead when the server does not know the script of
        an EVALSHA). This skips ``execute_command``'s per-command retry and metrics,
        and mostly the pool's checkout (`PoolConnections` keeps connections between
        commands): both cost more client CPU than the send and read themselves
        (docs/redis-valkey.md); the store retries transient failures itself, and its
        commands are safe to resend. A connection that failed is disconnected before it
        goes back, as the client does."""
        with self._limit:
            connection = connections.take()
            try:
                try:
                    connection.send_command(*command)
                    reply = connection.read_response()
                except self._no_script:
                    if not unknown_script:
                        raise
                    connection.send_command(*unknown_script)
                    reply = connection.read_response()
            except self._response_error:
                connections.give_back(connection)  # the server answered: it is in step
                raise
            except BaseException:
                connections.discard(connection)  # a reply may be on its way: never reuse it
                raise
            connections.give_back(connection)
            return reply

    def run_script_durably(
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
        cannot be sent on another one: on a cluster, both go to the node holding `key`
        through that node's own client."""
        with self._limit:
            for command, first in (("EVALSHA", script.sha), ("EVAL", script.code)):
                commands = [(command, first, 1, key, *args), ("WAIT", replicas, timeout_ms)]
                try:
                    if hasattr(self.client, "nodes_manager"):
                        reply, acked = self._on_cluster_node(key, commands)
                    else:
                        reply, acked = self._pipeline(self.client, commands)
                except self._no_script:
                    continue
                return reply, int(acked)
        raise AssertionError("unreachable: EVAL does not raise NoScriptError")

    @staticmethod
    def _pipeline(client: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for parts in commands:
            pipe.execute_command(*parts)
        replies: list[Any] = pipe.execute()
        return replies

    def _on_cluster_node(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send `commands` in one pipeline of the node holding `key` (its
        `redis_connection`, a plain client of that node)."""
        node = self.client.get_node_from_key(key)
        try:
            return self._pipeline(node.redis_connection, commands)
        except Exception as exc:
            if isinstance(exc, (ConnectionError, OSError)) or classify(exc) == TRANSIENT:
                # The node may be gone (a failover): learn the topology again before
                # the layer retries, as the cluster client does for its own commands.
                with contextlib.suppress(Exception):
                    self.client.nodes_manager.initialize()
            raise

    def close(self) -> None:
        """Close the client if this adapter created it."""
        if self.owned:
            self.client.close()
