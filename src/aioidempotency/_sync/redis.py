"""Adapter from redis-py (or valkey-py) sync clients to the sync cache store.

The twin of ``aioidempotency._async.redis``, written by hand: `SyncRedisPyCacheClient`
wraps a ``redis.Redis`` or ``redis.RedisCluster`` (or valkey-py's) with the same
methods as `RedisPyCacheClient`: the `SyncCacheClient` methods, the store's Lua
scripts, and ``WAIT`` on the connection that wrote (`wait_replicas`). redis-py's sync
clients are thread-safe (a pool of connections), so one serves every thread.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Any

from aioidempotency._async.redis import pool_capacity
from aioidempotency._cache_errors import TRANSIENT, classify
from aioidempotency._lua import LuaScript
from aioidempotency._sync.concurrency import Slots
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
        root = type(client).__module__.split(".")[0]
        self._no_script: type[BaseException] = sys.modules[f"{root}.exceptions"].NoScriptError
        self.max_in_flight = pool_capacity(client)
        self._limit: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if self.max_in_flight is None else Slots(self.max_in_flight)
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

    def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        """EVALSHA `script` on `key`'s node; EVAL when the server does not know it yet."""
        try:
            return self._call("evalsha", script.sha, 1, key, *args)
        except self._no_script:
            return self._call("eval", script.code, 1, key, *args)

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
