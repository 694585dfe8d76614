"""What the cache store talks to: the `CacheClient` protocols, and `adapt`, which turns
a client the user passed in (redis-py, valkey-glide or one's own) into one.

The store writes records with their absolute expiry (``exat``, epoch seconds). A
client of one's own whose `set` only takes a TTL (``ex``) is wrapped in
`TtlCacheClient`, which sends the seconds left instead.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, runtime_checkable

from aioidempotency._async.glide import GlideCacheClient, is_glide_client
from aioidempotency._async.redis import RedisPyCacheClient, is_redis_client
from aioidempotency._lua import LuaScript
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = ["CacheClient", "ScriptingCacheClient", "TtlCacheClient", "adapt"]


@runtime_checkable
class CacheClient(Protocol):
    """The minimum a cache must offer to hold idempotency records.

    `redis.asyncio.Redis` and `redis.asyncio.RedisCluster` satisfy it as they are.
    `set` returns something truthy when it wrote the value and a falsy value (None)
    when `nx=True` refused it; `ex` is a TTL in seconds. A client whose `set` also
    takes `exat` (absolute expiry in epoch seconds, as redis-py's) is sent that
    instead of `ex`.
    """

    def get(self, name: str, /) -> Awaitable[bytes | str | None]: ...

    def set(
        self, name: str, value: str, /, *, ex: int | None = None, nx: bool = False
    ) -> Awaitable[Any]: ...

    def delete(self, *names: str) -> Awaitable[Any]: ...


@runtime_checkable
class ScriptingCacheClient(CacheClient, Protocol):
    """A `CacheClient` that can also run a one-key Lua script (enables the atomic path)."""

    def run_script(
        self, script: LuaScript, key: str, args: Sequence[str | int]
    ) -> Awaitable[Any]: ...


class TtlCacheClient:
    """A `CacheClient` whose `set` knows only TTLs (``ex``), given ``exat`` by the store:
    it sends the seconds left until ``exat`` (at least 1), counted when the command is
    sent. Everything else (`run_script`, `aclose`, ...) goes to the client as it is."""

    def __init__(self, inner: CacheClient) -> None:
        self.inner = inner

    def get(self, name: str) -> Awaitable[bytes | str | None]:
        """GET `name`."""
        return self.inner.get(name)

    def set(
        self,
        name: str,
        value: str,
        *,
        ex: int | None = None,
        exat: int | None = None,
        nx: bool = False,
    ) -> Awaitable[Any]:
        """SET `name` with `ex`, or the seconds left until `exat`, as its TTL."""
        if exat is not None:
            ex = max(1, exat - int(time.time()))
        return self.inner.set(name, value, ex=ex, nx=nx)

    def delete(self, *names: str) -> Awaitable[Any]:
        """DEL `names`."""
        return self.inner.delete(*names)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _takes_exat(client: object) -> bool:
    try:
        parameters = inspect.signature(client.set).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
    return "exat" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def adapt(client: object, *, owned: bool = False, auto_pipeline: bool = False) -> CacheClient:
    """The `CacheClient` the store talks to for `client`: a raw redis-py or glide client
    is wrapped in an adapter that closes it on `aclose()` when `owned` (and batches the
    commands of one loop turn with `auto_pipeline`, async only); a client of one's own,
    or an adapter already built, is used as it is (behind `TtlCacheClient` if it knows
    only TTLs)."""
    if isinstance(client, (RedisPyCacheClient, GlideCacheClient, TtlCacheClient)):
        return client
    if is_glide_client(client):
        return GlideCacheClient(client, owned=owned, auto_pipeline=auto_pipeline)  # async-only
        # sync-only: return SyncGlideCacheClient(client, owned=owned)
    if is_redis_client(client):
        return RedisPyCacheClient(client, owned=owned, auto_pipeline=auto_pipeline)  # async-only
        # sync-only: return SyncRedisPyCacheClient(client, owned=owned)
    if isinstance(client, CacheClient):
        return client if _takes_exat(client) else TtlCacheClient(client)
    raise IdempotencyPersistenceConfigError(
        f"{type(client).__name__} is not a cache client: it needs get, set and delete"
    )
