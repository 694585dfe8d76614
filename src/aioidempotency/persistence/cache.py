"""`CachePersistenceLayer`: idempotency records in Redis or Valkey, standalone or cluster.

Records use the reference's layout (semantics A3): the key is the idempotency key
itself and the value the record's JSON text, written with `EX` set to the seconds left
until `expiration`. Two paths, chosen by what the client can do:

- **protocol path**, for any `CacheClient` (get/set/delete): the reference algorithm
  (semantics A5) with its orphan lock key `"{key}:lock"`; the record read after a
  refused claim is handed to the engine instead of being read again. It cannot check
  the owner token atomically, so `owner_checked` is False.
- **atomic path**, for clients that run Lua scripts (redis-py asyncio, valkey-py
  asyncio, valkey-glide): claim-or-return-existing, orphan takeover, completion,
  release and renewal each in one round trip, conditional on the owner token. Every
  script touches one key only, so it is cluster-safe, and reads at most 2 KiB of a
  record to decide (the result itself is never decoded on the server).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)
from aioidempotency.persistence.base import ClaimResult, PersistenceLayer, check_result_size
from aioidempotency.persistence.urls import CACHE_SCHEMES
from aioidempotency.records import DataRecord, RecordAttributes, RecordStatus

__all__ = [
    "CacheClient",
    "CachePersistenceLayer",
    "LuaScript",
    "RedisPyCacheClient",
    "ScriptingCacheClient",
]

logger = logging.getLogger(__name__)

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
# Each layer runs scripts built for its attribute names (one set of scripts per distinct
# set of names, shared by the layers using it): the patterns that find the attributes
# are constants of the script text, so only per-call values travel as arguments.
#
# `inspect` reads the status, expiry, in-progress expiry and owner of a record without
# decoding it: values up to 2 KiB are read whole, larger ones through their first and
# last KiB (the small attributes sit before or after `data` in every known writer).
# A key pattern only matches a structural key: a quote not preceded by a backslash
# cannot lie inside a JSON string, so text inside `data` never matches.
_INSPECT = """
local W = 1024
local function pick(windows, pattern)
  for i = 1, #windows do
    local v = string.match(windows[i], pattern)
    if v then return v end
  end
  return nil
end
local function inspect(key)
  local n = redis.call('STRLEN', key)
  local r = {}
  local windows
  if n <= 2 * W then
    local value = redis.call('GET', key)
    if not value then return nil end
    r.value = value
    windows = {value}
  else
    windows = {redis.call('GETRANGE', key, 0, W - 1), redis.call('GETRANGE', key, -W, -1)}
  end
  r.status = pick(windows, STATUS)
  if not r.status and not r.value then
    windows = {redis.call('GET', key)}
    r.status = pick(windows, STATUS)
  end
  r.expiry = tonumber(pick(windows, EXPIRY))
  r.in_progress = tonumber(pick(windows, IN_PROGRESS))
  r.owner = pick(windows, OWNER)
  r.valid = (r.status == 'INPROGRESS' or r.status == 'COMPLETED') and r.expiry ~= nil
  return r
end
"""

# ARGV: record JSON, TTL, now (s), now (ms).
# Returns {1} claimed a free key, {3} took over an expired/orphaned record,
# {2} took over an unparsable record, {0, value} refused with the live record.
_CLAIM_BODY = """
local r = inspect(KEYS[1])
local code = 1
if r then
  if not r.valid then
    code = 2
  elseif tonumber(ARGV[3]) > r.expiry
      or (r.status == 'INPROGRESS' and r.in_progress and r.in_progress < tonumber(ARGV[4])) then
    code = 3
  else
    return {0, r.value or redis.call('GET', KEYS[1])}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {code}
"""

# ARGV: owner, record JSON, TTL. Returns 1 done, 0 gone, 2 taken over.
_COMPLETE_BODY = """
local r = inspect(KEYS[1])
if not r or r.status ~= 'INPROGRESS' then return 0 end
if r.owner ~= ARGV[1] then return 2 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# ARGV: owner. Returns 1 deleted, 0 not ours.
_RELEASE_BODY = """
local r = inspect(KEYS[1])
if r and r.owner == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# ARGV: owner, new in-progress expiry (ms). Returns 1 renewed, 0 gone, 2 taken over.
# The TTL is kept.
_RENEW_BODY = """
local r = inspect(KEYS[1])
if not r or r.status ~= 'INPROGRESS' then return 0 end
if r.owner ~= ARGV[1] then return 2 end
local value = r.value or redis.call('GET', KEYS[1])
local updated, n = string.gsub(value, IN_PROGRESS_AT, '%1' .. ARGV[2], 1)
if n == 0 then
  updated = string.gsub(value, '}%s*$', ', ' .. IN_PROGRESS_KEY .. ': ' .. ARGV[2] .. '}', 1)
end
redis.call('SET', KEYS[1], updated, 'KEEPTTL')
return 1
"""


@dataclasses.dataclass(frozen=True)
class _Scripts:
    """The atomic path's scripts for one set of attribute names."""

    claim: LuaScript
    complete: LuaScript
    release: LuaScript
    renew: LuaScript


def _key_pattern(name: str) -> str:
    """The Lua pattern matching `name` as a JSON object key (quotes included)."""
    return "".join(c if c.isalnum() else "%" + c for c in json.dumps(name))


def _lua_string(text: str) -> str:
    """`text` as a single-quoted Lua string literal; quotes, backslashes and bytes that
    are not printable ASCII are written as decimal escapes."""
    chars = (chr(b) if 32 <= b < 127 and b not in b"'\\" else f"\\{b:03d}" for b in text.encode())
    return "'" + "".join(chars) + "'"


@functools.lru_cache(maxsize=64)
def _scripts(status: str, expiry: str, in_progress: str, owner: str) -> _Scripts:
    """The scripts for records whose attributes have these names."""

    def attribute(name: str, value_pattern: str) -> str:
        return _lua_string(rf"[{{,]%s*{_key_pattern(name)}%s*:%s*{value_pattern}")

    number = r"(%-?%d+)%s*[,}]"
    constants = [
        ("STATUS", attribute(status, r'"(%u+)"')),
        ("EXPIRY", attribute(expiry, number)),
        ("IN_PROGRESS", attribute(in_progress, number)),
        ("OWNER", attribute(owner, r'"([^"\]*)"')),
        ("IN_PROGRESS_AT", _lua_string(rf"([{{,]%s*{_key_pattern(in_progress)}%s*:%s*)%-?%d+")),
        ("IN_PROGRESS_KEY", _lua_string(json.dumps(in_progress).replace("%", "%%"))),
    ]
    header = "".join(f"local {name} = {value}\n" for name, value in constants)
    prelude = header + _INSPECT
    return _Scripts(
        claim=LuaScript(prelude + _CLAIM_BODY),
        complete=LuaScript(prelude + _COMPLETE_BODY),
        release=LuaScript(prelude + _RELEASE_BODY),
        renew=LuaScript(prelude + _RENEW_BODY),
    )


# The scripts for the default attribute names.
_DEFAULT_SCRIPTS = _scripts("status", "expiration", "in_progress_expiration", "owner_token")
_CLAIM = _DEFAULT_SCRIPTS.claim
_COMPLETE = _DEFAULT_SCRIPTS.complete
_RELEASE = _DEFAULT_SCRIPTS.release
_RENEW = _DEFAULT_SCRIPTS.renew

_CLAIM_FREE, _CLAIM_REFUSED, _CLAIM_UNPARSABLE, _CLAIM_TAKEOVER = 1, 0, 2, 3
_DONE, _GONE, _TAKEN_OVER = 1, 0, 2


def _ttl(expiry_timestamp: int, now: float) -> int:
    """Seconds left until `expiry_timestamp`, at least 1 (the EX of every write)."""
    return max(1, expiry_timestamp - int(now))


# --- errors --------------------------------------------------------------------------------
def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    types.append(asyncio.TimeoutError)
    for name in ("redis.exceptions", "valkey.exceptions"):
        module = sys.modules.get(name)
        if module is not None:
            types += [module.ConnectionError, module.TimeoutError]
    return tuple(types)


def _store_error(action: str, key: str, exc: Exception) -> IdempotencyPersistenceLayerError:
    """A client error as ours: unreachable -> connection error, others -> layer error."""
    if isinstance(exc, _connection_error_types()):
        return IdempotencyPersistenceConnectionError(
            f"cache store unreachable during {action} of {key!r}", exc
        )
    return IdempotencyPersistenceLayerError(f"cache store failed during {action} of {key!r}", exc)


# --- client adapters -------------------------------------------------------------------
def _module_root(client: object) -> tuple[str, bool]:
    module = type(client).__module__
    return module.split(".")[0], ".asyncio" in module


class RedisPyCacheClient:
    """A redis-py (or valkey-py) asyncio client, standalone or cluster, with scripts.

    Scripts run with EVALSHA and fall back to EVAL once per server when the script is
    not cached yet. `owned=True` closes the client on `aclose()`.
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

    async def _initialize(self) -> None:
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if not self._ready:
                await self.client.initialize()
                self._ready = True

    async def get(self, name: str) -> bytes | str | None:
        """GET `name`."""
        if not self._ready:
            await self._initialize()
        value: bytes | str | None = await self.client.get(name)
        return value

    async def set(self, name: str, value: str, *, ex: int | None = None, nx: bool = False) -> Any:
        """SET `name` with EX and NX."""
        if not self._ready:
            await self._initialize()
        return await self.client.set(name, value, ex=ex, nx=nx)

    async def delete(self, *names: str) -> int:
        """DEL `names`."""
        if not self._ready:
            await self._initialize()
        count: int = await self.client.delete(*names)
        return count

    async def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        """EVALSHA `script` on `key`'s node; EVAL when the server does not know it yet."""
        if not self._ready:
            await self._initialize()
        try:
            return await self.client.evalsha(script.sha, 1, key, *args)
        except self._no_script:
            return await self.client.eval(script.code, 1, key, *args)

    async def aclose(self) -> None:
        """Close the client if this adapter created it."""
        if self.owned:
            await self.client.aclose()


def _adapt(client: object, *, owned: bool = False) -> CacheClient:
    """The `CacheClient` the store talks to for `client`; a raw redis-py or glide client
    is wrapped in an adapter that closes it on `aclose()` when `owned`."""
    from aioidempotency.persistence.glide import GlideCacheClient, is_glide_client

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


class CachePersistenceLayer(PersistenceLayer):
    """Idempotency records in Redis or Valkey.

    `client` is a `CacheClient` (protocol path), or a client that runs scripts: a
    redis-py/valkey-py asyncio client (standalone or cluster), a valkey-glide
    `GlideClient`/`GlideClusterClient`, or any `ScriptingCacheClient` (atomic path by
    default; `atomic=False` forces the protocol path). Instead of a client, pass
    `client_factory`, an async callable that opens one; it is called lazily, once per
    event loop, and the clients it returns are closed by `aclose()` (a
    `RedisPyCacheClient` or `GlideCacheClient` it returns closes its client only if
    built with `owned=True`); at most `max_concurrency` calls per loop are in flight on
    them. `from_url` builds such a layer. Attribute names default to the reference's;
    `owner_attr` is ours.
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (client is None) == (client_factory is None):
            raise IdempotencyPersistenceConfigError("pass exactly one of client, client_factory")
        self._client = None if client is None else _adapt(client)
        self._factory = client_factory
        can_script = client_factory is not None or isinstance(self._client, ScriptingCacheClient)
        if atomic and not can_script:
            raise IdempotencyPersistenceConfigError(
                f"{type(client).__name__} cannot run scripts; use atomic=False"
            )
        self.atomic = can_script if atomic is None else atomic
        self.owner_checked = self.atomic
        self.attributes = RecordAttributes(
            status_attr=status_attr,
            expiry_attr=expiry_attr,
            in_progress_expiry_attr=in_progress_expiry_attr,
            data_attr=data_attr,
            validation_key_attr=validation_key_attr,
            owner_attr=owner_attr,
        )
        self._scripts = _scripts(status_attr, expiry_attr, in_progress_expiry_attr, owner_attr)
        self.max_result_bytes = max_result_bytes
        self.max_concurrency = max_concurrency
        self._clock = clock
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._loops_lock = threading.Lock()

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, **options: Any) -> CachePersistenceLayer:
        """A layer whose client is opened lazily in each event loop that uses it.

        ``redis://``, ``rediss://``, ``valkey://`` and ``valkeys://`` (the ``s`` means
        TLS), with ``user:password@host:port/db``. Query options: ``cluster=true``,
        ``client=redis`` (redis-py, the default) or ``client=glide``, ``atomic=false``
        for the protocol path, ``timeout=SECONDS`` (default 2), ``max_concurrency=N``
        (calls in flight per loop, default 64); other options go to redis-py. Keyword
        `options` go to the constructor (attribute names, ...).
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in CACHE_SCHEMES:
            raise IdempotencyPersistenceConfigError(f"not a Redis/Valkey URL: {url!r}")
        query = parse_qs(parts.query, keep_blank_values=True)
        flags = {
            name: query.pop(name)[-1]
            for name in ("cluster", "client", "atomic", "timeout", "max_concurrency")
            if name in query
        }
        cluster = _truthy(flags.get("cluster", "false"))
        kind = flags.get("client", "redis").lower()
        timeout = float(flags.get("timeout", "2"))
        options.setdefault("atomic", _truthy(flags.get("atomic", "true")))
        if "max_concurrency" in flags:
            options.setdefault("max_concurrency", int(flags["max_concurrency"]))
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

    async def _run(self, action: str, key: str, op: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """`op(client, *args)` on the client for this loop, errors mapped; at most
        `max_concurrency` calls in flight on clients the layer opened (so a pool is never
        exhausted). Flat on purpose: this wraps every store operation."""
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
        before = cancelling() if cancelling is not None else 0
        try:
            client = self._client
            if client is not None:
                result = await op(client, *args)
            else:
                state = self._loops.get(asyncio.get_running_loop())
                if state is None or state.client is None:
                    state = await self._loop_client()
                await state.limit.acquire()
                try:
                    result = await op(state.client, *args)
                finally:
                    state.limit.release()
        except IdempotencyError:
            raise
        except Exception as exc:
            raise _store_error(action, key, exc) from exc
        if (
            cancelling is not None
            and cancelling() > before
            and not getattr(task, "_must_cancel", False)
        ):
            # The client swallowed a cancellation (Python 3.11's asyncio.wait_for, used
            # by redis-py, drops it when the command finishes at the same moment).
            raise asyncio.CancelledError(f"{action} of {key!r} was cancelled")
        return result

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
        their own loop; those of closed loops are dropped.
        """
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

    def _parse(self, key: str, raw: bytes | str) -> DataRecord | None:
        try:
            return self.attributes.from_json(key, raw)
        except IdempotencyInvalidStatusError as exc:
            logger.warning("cache record %r is unparsable (%s); treating it as an orphan", key, exc)
            return None

    # --- the contract -------------------------------------------------------------------
    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        key = record.idempotency_key
        text = self.attributes.to_json(record)
        ttl = _ttl(record.expiry_timestamp, now)
        op = self._atomic_claim if self.atomic else self._protocol_claim
        return await self._run("claim", key, op, key, text, ttl, now)

    async def _atomic_claim(
        self, client: CacheClient, key: str, text: str, ttl: int, now: float
    ) -> ClaimResult:
        args = (text, ttl, int(now), int(now * 1000))
        return self._claim_reply(key, await _script(client, self._scripts.claim, key, args))

    def _claim_reply(self, key: str, reply: Sequence[Any]) -> ClaimResult:
        code = int(reply[0])
        if code == _CLAIM_UNPARSABLE:
            logger.warning("cache record %r was unparsable; taken over as an orphan", key)
        if code != _CLAIM_REFUSED:
            return ClaimResult(claimed=True)
        return ClaimResult(claimed=False, existing=self._parse(key, reply[1]))

    async def _protocol_claim(
        self, client: CacheClient, key: str, text: str, ttl: int, now: float
    ) -> ClaimResult:
        if await client.set(key, text, ex=ttl, nx=True):
            return ClaimResult(claimed=True)
        raw = await client.get(key)
        if raw is None:
            return ClaimResult(claimed=False)
        existing = self._parse(key, raw)
        if existing is not None and not existing.is_claimable(now):
            return ClaimResult(claimed=False, existing=existing)
        lock_ttl = min(ORPHAN_LOCK_SECONDS, ttl)
        if not await client.set(f"{key}:lock", "True", ex=lock_ttl, nx=True):
            return ClaimResult(claimed=False)
        await client.set(key, text, ex=ttl)
        return ClaimResult(claimed=True)

    async def get(self, key: str) -> DataRecord | None:
        raw = await self._run("get", key, _get, key)
        if raw is None:
            return None
        record = self._parse(key, raw)
        if record is None or record.is_expired(self._clock()):
            return None
        return record

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        check_result_size(record, self.max_result_bytes)
        key = record.idempotency_key
        text = self.attributes.to_json(record)
        ttl = _ttl(record.expiry_timestamp, self._clock())
        if not self.atomic:
            await self._run("complete", key, _set, key, text, ttl)
            return
        args = (owner, text, ttl)
        code = await self._run("complete", key, _script, self._scripts.complete, key, args)
        _raise_if_lost(key, int(code))

    async def release(self, key: str, *, owner: str) -> None:
        if self.atomic:
            script = self._scripts.release
            await self._run("release", key, _script, script, key, (owner,))
        else:
            await self._run("release", key, _delete, key)

    async def renew(self, record: DataRecord) -> None:
        key, owner = record.idempotency_key, record.owner or ""
        in_progress_expiry_ms = record.in_progress_expiry_timestamp or 0
        if self.atomic:
            script, args = self._scripts.renew, (owner, in_progress_expiry_ms)
            code = int(await self._run("renew", key, _script, script, key, args))
        else:
            op = self._protocol_renew
            code = await self._run("renew", key, op, key, owner, in_progress_expiry_ms)
        _raise_if_lost(key, code)

    async def _protocol_renew(
        self, client: CacheClient, key: str, owner: str, in_progress_expiry_ms: int
    ) -> int:
        raw = await client.get(key)
        current = None if raw is None else self._parse(key, raw)
        if current is None or current.status is not RecordStatus.INPROGRESS:
            return _GONE
        if current.owner != owner:
            return _TAKEN_OVER
        renewed = dataclasses.replace(current, in_progress_expiry_timestamp=in_progress_expiry_ms)
        ttl = _ttl(current.expiry_timestamp, self._clock())
        await client.set(key, self.attributes.to_json(renewed), ex=ttl)
        return _DONE

    async def delete(self, key: str) -> bool:
        return bool(await self._run("delete", key, _delete, key))


# The operations `_run` wraps: plain functions handing back the client's awaitable, so
# a store operation costs no coroutine frame of its own.
def _script(
    client: CacheClient, script: LuaScript, key: str, args: Sequence[str | int]
) -> Awaitable[Any]:
    # The atomic path only runs on clients checked once, when the layer adopted them.
    return cast(ScriptingCacheClient, client).run_script(script, key, args)


def _get(client: CacheClient, key: str) -> Awaitable[bytes | str | None]:
    return client.get(key)


def _set(client: CacheClient, key: str, text: str, ttl: int) -> Awaitable[Any]:
    return client.set(key, text, ex=ttl)


def _delete(client: CacheClient, key: str) -> Awaitable[Any]:
    return client.delete(key)


def _raise_if_lost(key: str, code: int) -> None:
    if code == _GONE:
        raise IdempotencyClaimLostError(f"the claim on {key!r} is gone", key=key)
    if code == _TAKEN_OVER:
        raise IdempotencyClaimLostError(f"the claim on {key!r} was taken over", key=key)


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
        from aioidempotency.persistence.glide import GlideCacheClient

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
