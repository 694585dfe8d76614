"""`CachePersistenceLayer`: idempotency records in Redis or Valkey, standalone or cluster.

Records use the reference's layout (semantics A3): the key is the idempotency key
itself and the value the record's JSON text, written with `EX` set to the seconds left
until `expiration`. `RecordAttributes.from_json` is the one reader of records: a value
it refuses raises `IdempotencyInvalidStatusError` and is never overwritten. Two paths,
chosen by what the client can do:

- **protocol path**, for any `CacheClient` (get/set/delete): the reference algorithm
  (semantics A5) with its orphan lock key `"{key}:lock"`; completion, release and
  renewal read the record first and write only over the caller's own claim, but a
  takeover landing between that read and the write is not seen (docs/redis-valkey.md
  says what this path guarantees).
- **atomic path**, for clients that run Lua scripts (redis-py asyncio, valkey-py
  asyncio, valkey-glide): claim-or-return-existing, orphan takeover, completion,
  release and renewal each conditional on the server, in one round trip (a takeover in
  two). The scripts never parse a record: a takeover replaces a value only if it still
  has the fingerprint of the one Python classified, and the owner checks look for the
  caller's owner token. Every script touches one key, so it is cluster-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

from aioidempotency._async.store import ClaimResult, PersistenceLayer, check_result_size
from aioidempotency._records import DataRecord, RecordAttributes, RecordStatus
from aioidempotency._urls import CACHE_SCHEMES
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)

__all__ = [
    "CacheAccessDeniedError",
    "CacheClient",
    "CachePersistenceLayer",
    "LuaScript",
    "RedisPyCacheClient",
    "ScriptingCacheClient",
    "fingerprint",
]


#: How long the reference's orphan lock lives at most (seconds).
ORPHAN_LOCK_SECONDS = 10


@runtime_checkable
class CacheClient(Protocol):
    """The minimum a cache must offer to hold idempotency records.

    `redis.asyncio.Redis` and `redis.asyncio.RedisCluster` satisfy it as they are.
    `set` returns something truthy when it wrote the value and a falsy value (None)
    when `nx=True` refused it; `ex` is a TTL in seconds.
    """

    def get(self, name: str, /) -> Awaitable[bytes | str | None]: ...

    def set(
        self, name: str, value: str, /, *, ex: int | None = None, nx: bool = False
    ) -> Awaitable[Any]: ...

    def delete(self, *names: str) -> Awaitable[Any]: ...


@dataclasses.dataclass(frozen=True)
class LuaScript:
    """A Lua script and its SHA1, for EVALSHA."""

    code: str
    sha: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.code.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", digest)


@runtime_checkable
class ScriptingCacheClient(CacheClient, Protocol):
    """A `CacheClient` that can also run a one-key Lua script (enables the atomic path)."""

    def run_script(
        self, script: LuaScript, key: str, args: Sequence[str | int]
    ) -> Awaitable[Any]: ...


# --- Lua scripts -------------------------------------------------------------------------
# The scripts never parse a record: `RecordAttributes.from_json` is the one classifier
# (semantics D: every reader must classify a record the same way). A script only moves
# bytes, compares them, and looks for an owner token, so it costs the same whatever the
# record's shape and (past a bounded prefix and suffix) whatever its size. They do not
# depend on attribute names: one set serves every layer.

#: Values up to this size are fingerprinted whole; larger ones through their first and
#: last `_FINGERPRINT_EDGE` bytes (see `fingerprint`).
_FINGERPRINT_WHOLE = 4096
_FINGERPRINT_EDGE = 2048
#: The most a script ever copies out of a value (GET): an owner token is only looked for
#: in values up to this size (an in-progress record is a few hundred bytes), and a
#: refused claim returns values up to this size itself; a larger one is read with a
#: plain GET (one more round trip, and no script copies megabytes while the server waits).
_MAX_SCRIPT_VALUE = 65536
#: The shortest owner token the owner checks accept (the engine's are 32 hex chars): a
#: short token could be found by chance in someone else's record.
_MIN_OWNER_CHARS = 16

# KEYS[1] is the only key; `n` its STRLEN, -1 when it holds another Redis type.
_PRELUDE = f"""
local key = KEYS[1]
local n = redis.pcall('STRLEN', key)
if type(n) ~= 'number' then n = -1 end
local function fingerprint()
  local sample
  if n <= {_FINGERPRINT_WHOLE} then
    sample = redis.call('GET', key)
  else
    sample = redis.call('GETRANGE', key, 0, {_FINGERPRINT_EDGE - 1})
      .. redis.call('GETRANGE', key, -{_FINGERPRINT_EDGE}, -1)
  end
  return string.format('%d', n) .. ':' .. redis.sha1hex(sample)
end
"""

# ARGV: record text, TTL, expected fingerprint or ''.
# {1}: claimed a free key. {3}: the value still had the expected fingerprint and was
# replaced (takeover). {4, type}: the key holds another Redis type. {0, value}:
# refused, with the value for the caller to classify. {5}: refused, the value is too
# large to copy here (the caller GETs it).
_CLAIM_CODE = (
    """
if redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return {1} end
"""
    + _PRELUDE
    + f"""
if n < 0 then return {{4, redis.call('TYPE', key)['ok']}} end
if ARGV[3] ~= '' and fingerprint() == ARGV[3] then
  redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
  return {{3}}
end
if n > {_MAX_SCRIPT_VALUE} then return {{5}} end
return {{0, redis.call('GET', key)}}
"""
)

# The value is ours when it is a string of at most _MAX_SCRIPT_VALUE bytes containing
# our owner token as a JSON string (ARGV[1], quotes included). Only our own in-progress
# records carry it; a completed record carries no token.
_OWNED = (
    _PRELUDE
    + f"""
local function missing()
  return n == 0 and redis.call('EXISTS', key) == 0
end
local function ours()
  return n > 0 and n <= {_MAX_SCRIPT_VALUE}
    and string.find(redis.call('GET', key), ARGV[1], 1, true) ~= nil
end
"""
)

# ARGV: quoted owner token, completed record text, TTL, fingerprint of that text.
# 1: stored, or already stored by this very completion (resent after a lost reply);
# 0: gone; 2: taken over.
_COMPLETE_CODE = (
    _OWNED
    + """
if missing() then return 0 end
if n == #ARGV[2] and fingerprint() == ARGV[4] then return 1 end
if not ours() then return 2 end
redis.call('SET', key, ARGV[2], 'EX', ARGV[3])
return 1
"""
)

# ARGV: quoted owner token. 1: deleted our claim, 0: nothing of ours to delete.
_RELEASE_CODE = (
    _OWNED
    + """
if not ours() then return 0 end
redis.call('DEL', key)
return 1
"""
)

# ARGV: quoted owner token, renewed in-progress record text. 1: renewed (TTL kept),
# 0: gone, 2: taken over.
_RENEW_CODE = (
    _OWNED
    + """
if missing() then return 0 end
if not ours() then return 2 end
redis.call('SET', key, ARGV[2], 'KEEPTTL')
return 1
"""
)

_CLAIM = LuaScript(_CLAIM_CODE)
_COMPLETE = LuaScript(_COMPLETE_CODE)
_RELEASE = LuaScript(_RELEASE_CODE)
_RENEW = LuaScript(_RENEW_CODE)

_CLAIM_REFUSED, _CLAIM_FREE, _CLAIM_TAKEOVER, _CLAIM_WRONG_TYPE, _CLAIM_TOO_LARGE = 0, 1, 3, 4, 5
_DONE, _GONE, _TAKEN_OVER = 1, 0, 2


def fingerprint(value: bytes | str) -> str:
    """``"<byte length>:<sha1 hex>"`` of a stored value, as the claim script computes it.

    The SHA1 covers the whole value up to 4 KiB, else its first and last 2 KiB, so the
    script's cost is bounded whatever the size. A takeover compares fingerprints: the
    value must not have changed since the caller classified it. Residual risk: a rewrite
    of a value over 4 KiB that keeps its length and both 2 KiB ends goes unseen.
    """
    data = value.encode() if isinstance(value, str) else value
    n = len(data)
    sample = (
        data if n <= _FINGERPRINT_WHOLE else data[:_FINGERPRINT_EDGE] + data[-_FINGERPRINT_EDGE:]
    )
    return f"{n}:{hashlib.sha1(sample, usedforsecurity=False).hexdigest()}"


def _ttl(expiry_timestamp: int, now: float) -> int:
    """Seconds left until `expiry_timestamp`, at least 1 (the EX of every write)."""
    return max(1, expiry_timestamp - int(now))


# --- errors --------------------------------------------------------------------------------
class CacheAccessDeniedError(IdempotencyPersistenceLayerError):
    """The server refused the credentials or a command (``WRONGPASS``, ``NOAUTH``,
    ``NOPERM``): a configuration problem, so not transient (a retry fails the same way).
    Fix the user's password or ACL (see docs/redis-valkey.md, Permissions)."""


#: Server replies that say "not now or not here": redirections the client did not follow,
#: a cluster or a node that is failing over, loading or read-only (a demoted primary).
_RETRY_REPLY = re.compile(r"\b(MOVED|ASK|TRYAGAIN|CLUSTERDOWN|LOADING|READONLY|MASTERDOWN)\b")
_DENIED_REPLY = re.compile(
    r"\b(WRONGPASS|NOAUTH|NOPERM)\b|PermissionDenied|no permissions|invalid username-password"
)
#: Client-side texts for the same: valkey-glide reports a failed (lazy) connection and a
#: redirection it gave up on as a plain RequestError ("Standalone connect failed - IoError:
#: ... timed out", "Moved: 38 host:port"); redis-py's cluster client gives up on a
#: migrating slot with ClusterError("TTL exhausted.").
_RETRY_TEXT = re.compile(
    r"connect failed|IoError|timed out|connection refused|broken pipe|TTL exhausted|\bmoved:",
    re.IGNORECASE,
)
#: redis-py's names for those replies (its MovedError's text omits the word MOVED).
_RETRY_ERRORS = frozenset(
    {
        "MovedError",
        "AskError",
        "TryAgainError",
        "ClusterDownError",
        "MasterDownError",
        "ClusterError",  # redis-py's "TTL exhausted" after redirections during a migration
    }
)
_TRANSIENT, _DENIED, _WRONG_TYPE, _OTHER = "transient", "denied", "wrongtype", "other"


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    types.append(asyncio.TimeoutError)
    for name in ("redis.exceptions", "valkey.exceptions", "glide"):
        module = sys.modules.get(name)
        if module is None:
            continue
        types += [module.ConnectionError, module.TimeoutError]
        if name == "glide":
            types.append(module.ClosingError)
    return tuple(types)


def _raised_inside(exc: BaseException, roots: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".")[0] in roots


def _classify(exc: BaseException) -> str:
    """What a client error means for the caller: `_TRANSIENT` (unreachable, timed out,
    redirected or failing over: worth a retry), `_DENIED` (credentials or ACL),
    `_WRONG_TYPE` (the key holds another Redis type) or `_OTHER`. An error our own
    adapters raised is judged by its cause."""
    if isinstance(exc, IdempotencyPersistenceLayerError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__
    text = str(exc)
    if _DENIED_REPLY.search(text) or type(exc).__name__ in {
        "AuthenticationError",
        "AuthorizationError",
        "NoPermissionError",
    }:
        return _DENIED
    if "WRONGTYPE" in text:
        return _WRONG_TYPE
    if (
        isinstance(exc, _connection_error_types())
        or _RETRY_REPLY.search(text)
        or _RETRY_TEXT.search(text)
        or type(exc).__name__ in _RETRY_ERRORS
    ):
        return _TRANSIENT
    if isinstance(exc, AttributeError) and _raised_inside(exc, ("redis", "valkey")):
        # redis-py's cluster client trips over its own topology during a failover.
        return _TRANSIENT
    return _OTHER


def _store_error(action: str, key: str, exc: Exception) -> IdempotencyPersistenceLayerError:
    """A client error as ours: unreachable, timed out or failing over -> connection error
    (transient); refused credentials or ACL -> `CacheAccessDeniedError`; others -> layer
    error. The client's exception is chained by the caller (``raise ... from exc``)."""
    kind = _classify(exc)
    if kind == _TRANSIENT:
        return IdempotencyPersistenceConnectionError(
            f"cache store unreachable or failing over during {action} of {key!r}", exc
        )
    if kind == _DENIED:
        return CacheAccessDeniedError(
            f"cache store refused access during {action} of {key!r} (check the user's "
            "password and ACL)",
            exc,
        )
    return IdempotencyPersistenceLayerError(f"cache store failed during {action} of {key!r}", exc)


def _wrong_type(key: str) -> IdempotencyInvalidStatusError:
    return IdempotencyInvalidStatusError(
        f"record {key!r} holds another Redis type (a hash, list, ...), not a record"
    )


# --- client adapters -------------------------------------------------------------------
def _module_root(client: object) -> tuple[str, bool]:
    module = type(client).__module__
    return module.split(".")[0], ".asyncio" in module


class RedisPyCacheClient:
    """A redis-py (or valkey-py) asyncio client, standalone or cluster, with scripts.

    Scripts run with EVALSHA and fall back to EVAL once per server when the script is
    not cached yet. `owned=True` closes the client on `aclose()`. Calls in flight are
    bounded, per event loop, by what the client's pool can carry (its
    `max_connections`; per node for a cluster), so load waits for a connection instead
    of failing with "Too many connections". A `BlockingConnectionPool` already waits
    and gets no bound.
    """

    def __init__(self, client: Any, *, owned: bool = False) -> None:
        self.client = client
        self.owned = owned
        root, _ = _module_root(client)
        self._no_script: type[BaseException] = sys.modules[f"{root}.exceptions"].NoScriptError
        # A cluster client discovers its nodes on first use; concurrent first commands
        # race in that discovery (redis-py 8.1 drops a connection under a command in
        # flight, then retries it, so a claim can run twice and refuse itself).
        self._ready = not hasattr(client, "nodes_manager")
        self._ready_lock: asyncio.Lock | None = None
        self.max_in_flight = _pool_capacity(client)
        self._limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

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

    async def get(self, name: str) -> bytes | str | None:
        """GET `name`."""
        value: bytes | str | None = await self._call("get", name)
        return value

    async def set(self, name: str, value: str, *, ex: int | None = None, nx: bool = False) -> Any:
        """SET `name` with EX and NX."""
        return await self._call("set", name, value, ex=ex, nx=nx)

    async def delete(self, *names: str) -> int:
        """DEL `names`."""
        count: int = await self._call("delete", *names)
        return count

    async def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        """EVALSHA `script` on `key`'s node; EVAL when the server does not know it yet."""
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
            if isinstance(exc, (ConnectionError, OSError)) or _classify(exc) == _TRANSIENT:
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
        """Close the client if this adapter created it."""
        if self.owned:
            await self.client.aclose()


def _pool_capacity(client: Any) -> int | None:
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


def _adapt(client: object, *, owned: bool = False) -> CacheClient:
    """The `CacheClient` the store talks to for `client`; a raw redis-py or glide client
    is wrapped in an adapter that closes it on `aclose()` when `owned`."""
    from aioidempotency._async.glide import GlideCacheClient, is_glide_client

    if isinstance(client, (RedisPyCacheClient, GlideCacheClient)):
        return client
    if is_glide_client(client):
        return GlideCacheClient(client, owned=owned)
    root, is_async = _module_root(client)
    if root in {"redis", "valkey"} and hasattr(client, "execute_command"):
        if not is_async:
            raise IdempotencyPersistenceConfigError(
                f"a synchronous {root} client would block the event loop; "
                f"pass a {root}.asyncio client instead"
            )
        return RedisPyCacheClient(client, owned=owned)
    if isinstance(client, CacheClient):
        return client
    raise IdempotencyPersistenceConfigError(
        f"{type(client).__name__} is not a cache client: it needs async get, set and delete"
    )


async def _aclose(client: object) -> None:
    close = getattr(client, "aclose", None)
    if close is not None:
        await close()


@dataclasses.dataclass
class _LoopClient:
    lock: asyncio.Lock
    limit: asyncio.Semaphore
    client: CacheClient | None = None


ClientFactory = Callable[[], Awaitable[Any]]
_T = TypeVar("_T")

# How many forks this process descends from (bumped in each child): a layer compares it
# with the value it saw when it took its clients, to tell it runs in a forked child.
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

#: Pause before the 2nd and 3rd attempt of an operation after a transient failure
#: (seconds, with jitter).
_RETRY_DELAYS = (0.05, 0.2)


class CachePersistenceLayer(PersistenceLayer):
    """Idempotency records in Redis or Valkey.

    `client` is a `CacheClient` (protocol path), or a client that runs scripts: a
    redis-py/valkey-py asyncio client (standalone or cluster), a valkey-glide
    `GlideClient`/`GlideClusterClient`, or any `ScriptingCacheClient` (atomic path by
    default; `atomic=False` forces the protocol path). Instead of a client, pass
    `client_factory`, an async callable that opens one; it is called lazily, once per
    event loop (and again in a forked child), and the clients it returns are closed by
    `aclose()` (a `RedisPyCacheClient` or `GlideCacheClient` it returns closes its
    client only if built with `owned=True`); at most `max_concurrency` calls per loop
    are in flight on them. `from_url` builds such a layer. A client passed in is
    refused in a forked child (it shares its connections with the parent).

    Every operation is safe to repeat, so a transient failure (unreachable, timed out,
    redirected, failing over) is retried: at most `retry_attempts` attempts, and one
    only starts if it can end within `retry_budget_seconds` at the pace of the last
    attempt. Attribute names default to the reference's;
    `owner_attr` is ours.

    `wait_replicas=N` makes claims and completions durable against a failover: each is
    followed by ``WAIT N`` (at most `wait_timeout` seconds) on its own connection, and
    a claim that fewer than N replicas acknowledged is released and refused with a
    transient `IdempotencyPersistenceConnectionError` (the function does not run); a
    completion short of N is reported the same way (the engine keeps storing it).
    """

    def __init__(
        self,
        client: Any = None,
        *,
        client_factory: ClientFactory | None = None,
        atomic: bool | None = None,
        status_attr: str = "status",
        expiry_attr: str = "expiration",
        in_progress_expiry_attr: str = "in_progress_expiration",
        data_attr: str = "data",
        validation_key_attr: str = "validation",
        owner_attr: str = "owner_token",
        max_result_bytes: int | None = None,
        max_concurrency: int = 64,
        retry_attempts: int = 3,
        retry_budget_seconds: float = 5.0,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (client is None) == (client_factory is None):
            raise IdempotencyPersistenceConfigError("pass exactly one of client, client_factory")
        if wait_replicas < 0 or wait_timeout <= 0:
            raise IdempotencyPersistenceConfigError(
                "wait_replicas must be >= 0 and wait_timeout > 0 seconds"
            )
        self._client = None if client is None else _adapt(client)
        self._factory = client_factory
        can_script = client_factory is not None or isinstance(self._client, ScriptingCacheClient)
        if atomic and not can_script:
            raise IdempotencyPersistenceConfigError(
                f"{type(client).__name__} cannot run scripts; use atomic=False"
            )
        self.atomic = can_script if atomic is None else atomic
        if wait_replicas and not self.atomic:
            raise IdempotencyPersistenceConfigError(
                "wait_replicas needs the atomic path (a client that runs scripts)"
            )
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self.attributes = RecordAttributes(
            status_attr=status_attr,
            expiry_attr=expiry_attr,
            in_progress_expiry_attr=in_progress_expiry_attr,
            data_attr=data_attr,
            validation_key_attr=validation_key_attr,
            owner_attr=owner_attr,
        )
        self.max_result_bytes = max_result_bytes
        self.max_concurrency = max_concurrency
        self.retry_attempts = max(1, retry_attempts)
        self.retry_budget_seconds = retry_budget_seconds
        self._clock = clock
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._loops_lock = threading.Lock()
        self._generation = _fork_generation
        self._pid = os.getpid()
        # A parent's clients, dropped in a forked child: kept referenced so that their
        # finalizers never close the parent's sockets from the child.
        self._forsaken: list[tuple[asyncio.AbstractEventLoop, _LoopClient]] = []

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, **options: Any) -> CachePersistenceLayer:
        """A layer whose client is opened lazily in each event loop that uses it.

        ``redis://``, ``rediss://``, ``valkey://`` and ``valkeys://`` (the ``s`` means
        TLS), with ``user:password@host:port/db``. Query options: ``cluster=true``,
        ``client=redis`` (redis-py, the default) or ``client=glide``, ``atomic=false``
        for the protocol path, ``timeout=SECONDS`` (default 2), ``max_concurrency=N``
        (calls in flight per loop, default 64), ``wait_replicas=N`` and
        ``wait_timeout=SECONDS`` (durability, see the class); other options go to
        redis-py. Keyword `options` go to the constructor (attribute names, ...).
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in CACHE_SCHEMES:
            raise IdempotencyPersistenceConfigError(f"not a Redis/Valkey URL: {url!r}")
        query = parse_qs(parts.query, keep_blank_values=True)
        flags = {
            name: query.pop(name)[-1]
            for name in (
                "cluster",
                "client",
                "atomic",
                "timeout",
                "max_concurrency",
                "wait_replicas",
                "wait_timeout",
            )
            if name in query
        }
        cluster = _truthy(flags.get("cluster", "false"))
        kind = flags.get("client", "redis").lower()
        timeout = float(flags.get("timeout", "2"))
        options.setdefault("atomic", _truthy(flags.get("atomic", "true")))
        try:
            if "max_concurrency" in flags:
                options.setdefault("max_concurrency", int(flags["max_concurrency"]))
            if "wait_replicas" in flags:
                options.setdefault("wait_replicas", int(flags["wait_replicas"]))
            if "wait_timeout" in flags:
                options.setdefault("wait_timeout", float(flags["wait_timeout"]))
        except ValueError as exc:
            raise IdempotencyPersistenceConfigError(f"bad number in {url!r}: {exc}") from exc
        tls = scheme in {"rediss", "valkeys"}
        if kind == "glide":
            factory = _glide_factory(parts, cluster=cluster, tls=tls, timeout=timeout)
        elif kind in {"redis", "redis-py", "redispy"}:
            rest = urlunsplit(
                (
                    "rediss" if tls else "redis",
                    parts.netloc,
                    parts.path,
                    urlencode(query, doseq=True),
                    "",
                )
            )
            factory = _redis_factory(rest, cluster=cluster, timeout=timeout)
        else:
            raise IdempotencyPersistenceConfigError(
                f"unknown client {kind!r} in {url!r}; use client=redis or client=glide"
            )
        return cls(client_factory=factory, **options)

    # --- running an operation -------------------------------------------------------------
    async def _run(self, action: str, key: str, op: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """`op(client, *args)` on the client for this loop and process, retried after a
        transient failure, errors mapped. Every `op` is safe to repeat."""
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
        before = cancelling() if cancelling is not None else 0
        if self._generation != _fork_generation:
            self._after_fork()
        attempt = 1
        started = last = time.monotonic()
        while True:
            try:
                result = await self._once(op, args)
                break
            except IdempotencyError as exc:
                cause = exc.__cause__
                if not isinstance(exc, IdempotencyPersistenceLayerError) or not isinstance(
                    cause, Exception
                ):
                    raise  # ours: a record that is not usable, a refused configuration
                failure: Exception = cause  # an adapter's mapped error: judge its cause
            except Exception as exc:
                failure = exc
            if cancelling is not None and cancelling() > before:
                # Cancelled while the client failed: the caller asked to stop, not retry.
                raise asyncio.CancelledError(f"{action} of {key!r} was cancelled") from failure
            now = time.monotonic()
            # Another attempt may take as long as the last one: start it only if it fits.
            if (
                _classify(failure) != _TRANSIENT
                or attempt >= self.retry_attempts
                or (now - started) + (now - last) > self.retry_budget_seconds
            ):
                error = _store_error(action, key, failure)
                if error.transient:
                    error = await self._diagnosed(error)
                raise error from failure
            delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS)) - 1]
            await asyncio.sleep(delay * (0.5 + random.random()))
            attempt += 1
            last = time.monotonic()
        if (
            cancelling is not None
            and cancelling() > before
            and not getattr(task, "_must_cancel", False)
        ):
            # The client swallowed a cancellation (Python 3.11's asyncio.wait_for, used
            # by redis-py, drops it when the command finishes at the same moment).
            raise asyncio.CancelledError(f"{action} of {key!r} was cancelled")
        return result

    async def _diagnosed(
        self, error: IdempotencyPersistenceLayerError
    ) -> IdempotencyPersistenceLayerError:
        """`error` (transient), or what the client finds behind it: a client that only
        sees timeouts may be refused a login it retries in the background."""
        client = self._client
        if client is None:
            state = self._loops.get(asyncio.get_running_loop())
            client = None if state is None else state.client
        diagnose = getattr(client, "diagnose", None)
        if diagnose is None:
            return error
        with contextlib.suppress(Exception):
            found = await asyncio.wait_for(diagnose(), self.retry_budget_seconds)
            if found is not None:
                return cast(IdempotencyPersistenceLayerError, found)
        return error

    async def _once(self, op: Callable[..., Awaitable[_T]], args: tuple[Any, ...]) -> _T:
        client = self._client
        if client is not None:
            return await op(client, *args)
        state = self._loops.get(asyncio.get_running_loop())
        if state is None or state.client is None:
            state = await self._loop_client()
        async with state.limit:
            return await op(state.client, *args)

    def _after_fork(self) -> None:
        """In a forked child: refuse a client passed in; drop the parent's own clients
        (unclosed: their sockets are the parent's) so that new ones are opened here."""
        if self._client is not None:
            raise IdempotencyPersistenceConfigError(
                f"this layer's client was created in process {self._pid}, before os.fork(); "
                "a forked child shares its connections with the parent, so replies could "
                "cross and a completed call run again. Build the layer with "
                "CachePersistenceLayer.from_url(...) or client_factory=..., which open a "
                "new client in each process and event loop."
            )
        self._forsaken.extend(self._loops.items())
        self._loops = weakref.WeakKeyDictionary()
        self._loops_lock = threading.Lock()  # the parent's may have been held at fork
        self._generation = _fork_generation
        self._pid = os.getpid()

    async def _loop_client(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            state = self._loops.get(loop)
            if state is None:
                limit = asyncio.Semaphore(self.max_concurrency)
                state = self._loops[loop] = _LoopClient(asyncio.Lock(), limit)
        if state.client is None:
            async with state.lock:
                if state.client is None:
                    assert self._factory is not None
                    # The layer opened it, so the layer closes it (an adapter the
                    # factory built keeps its own `owned`).
                    client = _adapt(await self._factory(), owned=True)
                    if self.atomic and not isinstance(client, ScriptingCacheClient):
                        with contextlib.suppress(Exception):
                            await _aclose(client)  # opened for us, and of no use
                        raise IdempotencyPersistenceConfigError(
                            f"{type(client).__name__} cannot run scripts; use atomic=False"
                        )
                    state.client = client
        return state

    async def aclose(self) -> None:
        """Close the clients opened by the factory (a client given to the layer stays open).

        The client of the running loop is closed here, those of other running loops in
        their own loop; those of closed loops are dropped. In a forked child, the
        parent's clients are left alone.
        """
        if self._generation != _fork_generation and self._client is None:
            self._after_fork()
        with self._loops_lock:
            states = list(self._loops.items())
            self._loops.clear()
        current = asyncio.get_running_loop()
        for loop, state in states:
            if state.client is None:
                continue
            if loop is current:
                with contextlib.suppress(Exception):
                    await _aclose(state.client)
            elif loop.is_running() and not loop.is_closed():
                future = asyncio.run_coroutine_threadsafe(_aclose(state.client), loop)
                with contextlib.suppress(Exception, concurrent.futures.TimeoutError):
                    await asyncio.wait_for(asyncio.wrap_future(future), timeout=5)

    # --- reading records ------------------------------------------------------------------
    def _is_our_claim(self, key: str, raw: bytes | str, owner: str) -> bool:
        """True when `raw` parses as an in-progress record holding `owner`'s claim."""
        try:
            record = self.attributes.from_json(key, raw)
        except IdempotencyInvalidStatusError:
            return False
        return record.status is RecordStatus.INPROGRESS and record.owner == owner

    # --- the contract -------------------------------------------------------------------
    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        key = record.idempotency_key
        text = self.attributes.to_json(record)
        ttl = _ttl(record.expiry_timestamp, now)
        if self.atomic:
            owner = record.owner or ""
            return await self._run("claim", key, self._atomic_claim, key, text, ttl, now, owner)
        return await self._run("claim", key, self._protocol_claim, key, text, ttl, now)

    async def _durably(
        self, client: CacheClient, script: LuaScript, key: str, args: Sequence[str | int]
    ) -> tuple[Any, int]:
        """Run `script` followed by ``WAIT``; the reply and the replicas that acked."""
        durable = getattr(client, "run_script_durably", None)
        if durable is None:
            raise IdempotencyPersistenceConfigError(
                f"{type(client).__name__} cannot wait for replicas; wait_replicas needs "
                "a redis-py or valkey-glide client"
            )
        reply, acked = await durable(
            script,
            key,
            args,
            replicas=self.wait_replicas,
            timeout_ms=max(1, int(self.wait_timeout * 1000)),
        )
        return reply, int(acked)

    async def _atomic_claim(
        self, client: CacheClient, key: str, text: str, ttl: int, now: float, owner: str
    ) -> ClaimResult:
        # 1 round trip for a free key or a live record; an expired or orphaned one is
        # classified here, then replaced only if it is still the same value (2 in all).
        expected = ""
        while True:
            args = (text, ttl, expected)
            if self.wait_replicas:
                reply, acked = await self._durably(client, _CLAIM, key, args)
            else:
                reply, acked = await _script(client, _CLAIM, key, args), 0
            code = int(reply[0])
            if code in (_CLAIM_FREE, _CLAIM_TAKEOVER):
                if acked < self.wait_replicas:
                    # Not on enough replicas: a failover could lose it, so give it up.
                    await _script(client, _RELEASE, key, (_owner_needle(owner),))
                    raise _NotReplicated(
                        f"the claim on {key!r} reached {acked} of {self.wait_replicas} "
                        f"replicas within {self.wait_timeout:g}s; it was released"
                    )
                return ClaimResult(claimed=True)
            if code == _CLAIM_WRONG_TYPE:
                kind = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
                raise IdempotencyInvalidStatusError(
                    f"record {key!r} holds a Redis {kind}, not a record"
                )
            raw = reply[1] if code == _CLAIM_REFUSED else await _read(client, key)
            if raw is None:
                return ClaimResult(claimed=False)  # gone since: the engine claims again
            existing = self.attributes.from_json(key, raw)
            if expected or not existing.is_claimable(now):
                return ClaimResult(claimed=False, existing=existing)
            expected = fingerprint(raw)

    async def _protocol_claim(
        self, client: CacheClient, key: str, text: str, ttl: int, now: float
    ) -> ClaimResult:
        if await client.set(key, text, ex=ttl, nx=True):
            return ClaimResult(claimed=True)
        raw = await _read(client, key)
        if raw is None:
            return ClaimResult(claimed=False)
        existing = self.attributes.from_json(key, raw)
        if not existing.is_claimable(now):
            return ClaimResult(claimed=False, existing=existing)
        lock_ttl = min(ORPHAN_LOCK_SECONDS, ttl)
        if not await client.set(f"{key}:lock", "True", ex=lock_ttl, nx=True):
            return ClaimResult(claimed=False, busy=True)  # another call is taking it over
        await client.set(key, text, ex=ttl)
        return ClaimResult(claimed=True)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        raw = await self._run("get", key, _read, key)
        if raw is None:
            return None
        record = self.attributes.from_json(key, raw)
        if record.is_expired(time.time() if now is None else now):
            return None
        return record

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        check_result_size(record, self.max_result_bytes)
        key = record.idempotency_key
        text = self.attributes.to_json(record)
        ttl = _ttl(record.expiry_timestamp, self._clock())
        if self.atomic:
            args = (_owner_needle(owner), text, ttl, fingerprint(text))
            if self.wait_replicas:
                code = await self._run("complete", key, self._durable_complete, key, args)
            else:
                code = int(await self._run("complete", key, _script, _COMPLETE, key, args))
        else:
            op = self._protocol_replace
            code = await self._run("complete", key, op, key, owner, text, ttl)
        _raise_if_lost(key, code)

    async def _durable_complete(
        self, client: CacheClient, key: str, args: Sequence[str | int]
    ) -> int:
        reply, acked = await self._durably(client, _COMPLETE, key, args)
        code = int(reply)
        if code == _DONE and acked < self.wait_replicas:
            raise _NotReplicated(
                f"the result of {key!r} reached {acked} of {self.wait_replicas} replicas "
                f"within {self.wait_timeout:g}s"
            )
        return code

    async def _protocol_replace(
        self, client: CacheClient, key: str, owner: str, text: str, ttl: int
    ) -> int:
        """Write `text` (a completion or a renewal) over `owner`'s in-progress claim:
        read, check, write. A takeover landing between the GET and the SET is
        overwritten (docs/redis-valkey.md says what this path guarantees)."""
        try:
            raw = await _read(client, key)
        except IdempotencyInvalidStatusError:
            return _TAKEN_OVER
        if raw is None:
            return _GONE
        if _as_bytes(raw) == text.encode():
            return _DONE  # this very write, resent after a lost reply
        if not self._is_our_claim(key, raw, owner):
            return _TAKEN_OVER
        await client.set(key, text, ex=ttl)
        return _DONE

    async def release(self, key: str, *, owner: str) -> None:
        if self.atomic:
            args = (_owner_needle(owner),)
            await self._run("release", key, _script, _RELEASE, key, args)
        else:
            await self._run("release", key, self._protocol_release, key, owner)

    async def _protocol_release(self, client: CacheClient, key: str, owner: str) -> None:
        try:
            raw = await _read(client, key)
        except IdempotencyInvalidStatusError:
            return
        if raw is not None and self._is_our_claim(key, raw, owner):
            # A takeover landing between this GET and DEL is deleted (docs/redis-valkey.md).
            await client.delete(key)

    async def renew(self, record: DataRecord) -> None:
        key, owner = record.idempotency_key, record.owner or ""
        text = self.attributes.to_json(record)
        if self.atomic:
            args = (_owner_needle(owner), text)
            code = int(await self._run("renew", key, _script, _RENEW, key, args))
        else:
            ttl = _ttl(record.expiry_timestamp, self._clock())
            op = self._protocol_replace
            code = await self._run("renew", key, op, key, owner, text, ttl)
        _raise_if_lost(key, code)

    async def delete(self, key: str) -> bool:
        return bool(await self._run("delete", key, _delete, key))


# The operations `_run` wraps: plain functions handing back the client's awaitable, so
# a store operation costs no coroutine frame of its own.
def _script(
    client: CacheClient, script: LuaScript, key: str, args: Sequence[str | int]
) -> Awaitable[Any]:
    # The atomic path only runs on clients checked once, when the layer adopted them.
    return cast(ScriptingCacheClient, client).run_script(script, key, args)


async def _read(client: CacheClient, key: str) -> bytes | str | None:
    """GET `key`; a key holding another Redis type raises `IdempotencyInvalidStatusError`."""
    try:
        return await client.get(key)
    except Exception as exc:
        if _classify(exc) == _WRONG_TYPE:
            raise _wrong_type(key) from exc
        raise


def _delete(client: CacheClient, key: str) -> Awaitable[Any]:
    return client.delete(key)


def _owner_needle(owner: str) -> str:
    """What the owner checks look for: the token as a JSON string, quotes included
    (inside a stored result, a quote is escaped, so the needle cannot match there)."""
    if len(owner) < _MIN_OWNER_CHARS:
        raise IdempotencyPersistenceConfigError(
            f"owner token {owner!r} is too short for an owner check (at least "
            f"{_MIN_OWNER_CHARS} characters; the engine uses 32 random hex digits)"
        )
    return json.dumps(owner)


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _raise_if_lost(key: str, code: int) -> None:
    if code == _GONE:
        raise IdempotencyClaimLostError(f"the claim on {key!r} is gone", key=key)
    if code == _TAKEN_OVER:
        raise IdempotencyClaimLostError(f"the claim on {key!r} was taken over", key=key)


class _NotReplicated(ConnectionError):
    """A write fewer replicas acknowledged than `wait_replicas` asks (transient)."""


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "y", "yes", "t", "true", "on"}


def _redis_factory(url: str, *, cluster: bool, timeout: float) -> ClientFactory:
    async def open_client() -> RedisPyCacheClient:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise IdempotencyPersistenceConfigError(
                "redis-py is not installed; install aioidempotency[redis]"
            ) from exc
        kind: Any = aioredis.RedisCluster if cluster else aioredis.Redis
        client = kind.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return RedisPyCacheClient(client, owned=True)

    return open_client


def _glide_factory(parts: Any, *, cluster: bool, tls: bool, timeout: float) -> ClientFactory:
    path = parts.path.strip("/")
    database = int(path) if path else 0

    async def open_client() -> Any:
        from aioidempotency._async.glide import GlideCacheClient

        return await GlideCacheClient.connect(
            parts.hostname or "localhost",
            parts.port or 6379,
            cluster=cluster,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            database=database,
            request_timeout_ms=int(timeout * 1000),
        )

    return open_client
