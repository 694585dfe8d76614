"""`CachePersistenceLayer`: idempotency records in Redis or Valkey, standalone or cluster.

Records use Powertools' Redis layout: the key is the idempotency key
itself and the value the record's JSON text, written to expire at the record's
`expiration` (``EXAT``). `RecordAttributes.from_json` is the one reader of records: a
value it refuses raises `IdempotencyInvalidStatusError` and is never overwritten. How
records are written is the business of the path (``cache_paths``: Lua scripts, or
get/set/delete); this module picks the path, holds the clients and retries what is
transient. The store has no clock: the engine passes `now` where a record is judged.
"""

from __future__ import annotations

import asyncio  # async-only
import contextlib
import dataclasses
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from aioidempotency._async.cache_clients import CacheClient, ScriptingCacheClient, adapt
from aioidempotency._async.cache_paths import AtomicPath, ProtocolPath, delete_key, read
from aioidempotency._async.clients import Opened, OpenedClients, PassedClient
from aioidempotency._async.concurrency import sleep
from aioidempotency._async.glide import GlideCacheClient
from aioidempotency._async.redis import RedisPyCacheClient
from aioidempotency._async.store import ClaimResult, PersistenceLayer, check_result_size
from aioidempotency._cache_errors import (
    DENIED,
    TRANSIENT,
    CacheAccessDeniedError,
    classify,
    store_error,
)
from aioidempotency._check import (
    CHECK_SCRIPT,
    StoreCheckReport,
    StoreProblem,
    cache_problem,
    cluster_problem,
    parse_info,
    probe_records,
    script_problems,
    server_mode,
    server_name,
    version_problem,
)
from aioidempotency._client_worlds import client_world
from aioidempotency._lua import LuaScript, fingerprint, raise_if_lost
from aioidempotency._records import DataRecord, RecordAttributes
from aioidempotency._urls import CacheConnection, cache_connection
from aioidempotency.exceptions import (
    IdempotencyError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceLayerError,
)

# begin async-only
if TYPE_CHECKING:
    from aioidempotency._sync.cache import SyncCachePersistenceLayer
    from aioidempotency._sync.store import SyncPersistenceLayer
# end async-only

__all__ = [
    "CacheAccessDeniedError",
    "CacheClient",
    "CachePersistenceLayer",
    "LuaScript",
    "RedisCachePersistenceLayer",  # async-only
    "RedisPyCacheClient",
    "ScriptingCacheClient",
    "fingerprint",
]

ClientFactory = Callable[[], Awaitable[Any]]
_T = TypeVar("_T")

_WORLD = "async"  # async-only
# sync-only: _WORLD = "sync"

_CLIENT_LIBRARIES = frozenset({"redis", "valkey", "glide", "glide_sync"})

#: Whether the layer's async clients pipeline when `auto_pipeline` is not given (see
#: docs/performance.md for the measurements behind it).
AUTO_PIPELINE_DEFAULT = True

#: Pause before the 2nd and 3rd attempt of an operation after a transient failure
#: (seconds, with jitter).
_RETRY_DELAYS = (0.05, 0.2)

_PASSED_IN_CHILD = (
    "a forked child shares its connections with the parent, so replies could cross and "
    "a completed call run again. Build the layer with CachePersistenceLayer.from_url(...), "
    "url=, host= or client_factory=..., which open a new client in each process."
)
# begin async-only
_SYNC_CLIENT = (
    "this CachePersistenceLayer holds a sync client ({name}), which would block the event "
    "loop: it serves @idempotent and @idempotent_function only. For async code pass a "
    "redis.asyncio or glide client, or build the layer from a URL (url=, host= or "
    "CachePersistenceLayer.from_url), which opens a client of the right kind for each."
)
# end async-only
_ASYNC_CLIENT = (
    "{name} is an asyncio client: it serves async code only. For @idempotent and "
    "@idempotent_function pass a sync client (redis.Redis, redis.RedisCluster, a "
    "glide_sync client), or build the layer from a URL (url=, host= or "
    "CachePersistenceLayer.from_url), which opens a client of the right kind for each."
)


def _wrong_client(message: str, client: object) -> IdempotencyPersistenceConfigError:
    return IdempotencyPersistenceConfigError(message.format(name=type(client).__name__))


async def _close(client: CacheClient) -> None:
    close = getattr(client, "aclose", None)
    if close is not None:
        await close()


def _check_script(client: CacheClient, key: str, expiry: int) -> Awaitable[Any]:
    return cast(ScriptingCacheClient, client).run_script(CHECK_SCRIPT, key, (expiry,))


def _checked_factory(factory: Any) -> ClientFactory | None:
    """`factory` if it can open clients; a coroutine object (``client_factory=make()``),
    a client or anything else that is not a function is refused, saying what to pass."""
    if factory is None:
        return None
    if inspect.iscoroutine(factory):
        code = getattr(factory, "cr_code", None)
        name = getattr(factory, "__qualname__", None) or getattr(code, "co_name", "make")
        factory.close()  # never awaited: closed, so Python does not warn about it
        raise IdempotencyPersistenceConfigError(
            f"client_factory= got a coroutine object, the result of calling {name}(); "
            f"pass the function itself: client_factory={name}"
        )
    if not callable(factory):
        raise IdempotencyPersistenceConfigError(
            f"client_factory= takes a function that opens a client, not a "
            f"{type(factory).__name__}; pass a client as client= instead"
        )
    # sync-only: if inspect.iscoroutinefunction(factory):
    # sync-only:     raise IdempotencyPersistenceConfigError(
    # sync-only:         f"{getattr(factory, '__qualname__', 'client_factory')} is an async "
    # sync-only:         "function: SyncCachePersistenceLayer needs one that returns a sync client "
    # sync-only:         "(redis.Redis, redis.RedisCluster, a glide_sync client); for async code "
    # sync-only:         "use CachePersistenceLayer, which serves sync code too"
    # sync-only:     )
    return cast(ClientFactory, factory)


class CachePersistenceLayer(PersistenceLayer):
    """Idempotency records in Redis or Valkey, for async and sync code alike.

    Where its client comes from (exactly one):

    - `url` (or `host`, `port`, `username`, `password`, `db_index`, `mode`, `ssl`: the
      arguments of Powertools' layer, with its defaults; `url` wins over `host`): the
      layer opens its own client lazily, one per event loop, and one per process for
      sync code; see `from_url` for the URL. A string as the first argument is a URL.
    - `client`: a redis-py/valkey-py client, a valkey-glide client, or any
      `CacheClient`. An asyncio client serves async code; a sync one (``redis.Redis``,
      ``glide_sync``) serves `@idempotent` natively and is refused by async code with
      an error that says what to pass. A client passed in stays open, and is refused
      in a forked child (it shares its connections with the parent).
    - `client_factory`: an async callable that opens a client, called once per event
      loop (and again in a forked child); `aclose()` closes what it returned (a
      `RedisPyCacheClient` or `GlideCacheClient` only if built with `owned=True`).

    A client that runs scripts takes the atomic path by default (`atomic=False` forces
    the protocol path; see docs/redis-valkey.md). At most `max_concurrency` calls
    (default 64) are in flight on each client the layer opened.

    Every operation is safe to repeat, so a transient failure (unreachable, timed out,
    redirected, failing over) is retried: at most `retry_attempts` attempts, and one
    only starts if it can end within `retry_budget_seconds` at the pace of the last
    attempt. Attribute names default to the reference's (`owner_attr` is ours); give them
    as the ``*_attr`` keywords or as one `RecordAttributes` (`attributes`), not both.

    `wait_replicas=N` makes claims and completions durable against a failover: each is
    followed by ``WAIT N`` (at most `wait_timeout` seconds, default 1) on its own
    connection, and a claim that fewer than N replicas acknowledged is released and
    refused with a transient `IdempotencyPersistenceConnectionError` (the function does
    not run); a completion short of N is reported the same way (the engine keeps
    storing it). Options left as None take the URL's value, else their default.

    `auto_pipeline` (default True; async code, standalone redis-py and glide clients)
    sends the commands that concurrent calls issue in one turn of the event loop as one
    non-atomic pipeline or batch; a command issued while no other is queued or
    awaiting its reply goes alone (docs/redis-valkey.md, measured in
    docs/performance.md). It applies to the clients the layer opens and to a raw
    client passed as `client` (an adapter passed in keeps its own setting);
    `auto_pipeline=False` sends every command on its own. The sync layer accepts and
    ignores it: its calls run in threads, with no loop turn to share.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        url: str = "",
        host: str = "",
        port: int = 6379,
        username: str = "",
        password: str = "",
        db_index: int = 0,
        mode: Literal["standalone", "cluster"] = "standalone",
        ssl: bool = True,
        client_factory: ClientFactory | None = None,
        atomic: bool | None = None,
        status_attr: str = "status",
        expiry_attr: str = "expiration",
        in_progress_expiry_attr: str = "in_progress_expiration",
        data_attr: str = "data",
        validation_key_attr: str = "validation",
        owner_attr: str = "owner_token",
        attributes: RecordAttributes | None = None,
        max_result_bytes: int | None = None,
        max_concurrency: int | None = None,
        retry_attempts: int = 3,
        retry_budget_seconds: float = 5.0,
        wait_replicas: int | None = None,
        wait_timeout: float | None = None,
        auto_pipeline: bool | None = None,
    ) -> None:
        if isinstance(client, str) and not url:  # Powertools' first argument is the URL
            client, url = None, client
        self.attributes = RecordAttributes.either(
            attributes,
            RecordAttributes(
                status_attr=status_attr,
                expiry_attr=expiry_attr,
                in_progress_expiry_attr=in_progress_expiry_attr,
                data_attr=data_attr,
                validation_key_attr=validation_key_attr,
                owner_attr=owner_attr,
            ),
        )
        # What a layer of the other world needs to open its own client: the arguments
        # less the client.
        self._settings: dict[str, Any] = {
            "url": url,
            "host": host,
            "port": port,
            "username": username,
            "password": password,
            "db_index": db_index,
            "mode": mode,
            "ssl": ssl,
            "atomic": atomic,
            "attributes": self.attributes,
            "max_result_bytes": max_result_bytes,
            "max_concurrency": max_concurrency,
            "retry_attempts": retry_attempts,
            "retry_budget_seconds": retry_budget_seconds,
            "wait_replicas": wait_replicas,
            "wait_timeout": wait_timeout,
            "auto_pipeline": auto_pipeline,
        }
        found = cache_connection(
            url=url,
            host=host,
            port=port,
            username=username,
            password=password,
            db_index=db_index,
            mode=mode,
            ssl=ssl,
        )
        self.connection: CacheConnection | None = None if found is None else found[0]
        from_url: dict[str, Any] = {} if found is None else found[1]
        if sum(x is not None for x in (client, client_factory, self.connection)) != 1:
            raise IdempotencyPersistenceConfigError(
                "pass exactly one of client, client_factory, url or host"
            )
        self.max_result_bytes = max_result_bytes
        self.max_concurrency: int = (
            from_url.get("max_concurrency", 64) if max_concurrency is None else max_concurrency
        )
        self.retry_attempts = max(1, retry_attempts)
        self.retry_budget_seconds = retry_budget_seconds
        self.wait_replicas: int = (
            from_url.get("wait_replicas", 0) if wait_replicas is None else wait_replicas
        )
        self.wait_timeout: float = (
            from_url.get("wait_timeout", 1.0) if wait_timeout is None else wait_timeout
        )
        #: Whether the async clients this layer adapts batch the commands of a loop turn.
        self.auto_pipeline: bool = bool(
            from_url.get("auto_pipeline", AUTO_PIPELINE_DEFAULT)
            if auto_pipeline is None
            else auto_pipeline
        )
        if self.max_concurrency < 1:  # 0 would hold every call forever
            raise IdempotencyPersistenceConfigError(
                f"max_concurrency must be at least 1: {self.max_concurrency!r}"
            )
        if self.wait_replicas < 0 or self.wait_timeout <= 0:
            raise IdempotencyPersistenceConfigError(
                "wait_replicas must be >= 0 and wait_timeout > 0 seconds"
            )
        self._factory = _checked_factory(client_factory)
        self._foreign: Any = None
        self._twin: SyncCachePersistenceLayer | None = None  # async-only
        self._clients: PassedClient[CacheClient] | OpenedClients[CacheClient] | None = None
        can_script = True
        if client is not None and client_world(client) not in (None, _WORLD):
            # begin async-only
            # A sync client: the sync twin serves it; this layer refuses async calls.
            from aioidempotency._sync.cache import SyncCachePersistenceLayer

            self._foreign = client
            self._twin = SyncCachePersistenceLayer(client, **self._settings)
            can_script = self._twin.atomic
            # end async-only
            # sync-only: raise _wrong_client(_ASYNC_CLIENT, client)
        elif client is not None:
            adapted = adapt(client, auto_pipeline=self.auto_pipeline)  # async-only
            # sync-only: adapted = adapt(client)
            can_script = isinstance(adapted, ScriptingCacheClient)
            self._clients = PassedClient(adapted, refusal=_PASSED_IN_CHILD)
        else:
            self._clients = OpenedClients(
                self._open_client, _close, max_concurrency=self.max_concurrency
            )
        if atomic and not can_script:
            raise IdempotencyPersistenceConfigError(
                f"{type(client).__name__} cannot run scripts; use atomic=False"
            )
        if atomic is None:
            atomic = from_url.get("atomic", can_script)
        self.atomic: bool = bool(atomic)
        if self.wait_replicas and not self.atomic:
            raise IdempotencyPersistenceConfigError(
                "wait_replicas needs the atomic path (a client that runs scripts)"
            )
        self._path: AtomicPath | ProtocolPath = (
            AtomicPath(
                self.attributes, wait_replicas=self.wait_replicas, wait_timeout=self.wait_timeout
            )
            if self.atomic
            else ProtocolPath(self.attributes)
        )

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, **options: Any) -> CachePersistenceLayer:
        """A layer whose client is opened lazily in each event loop (and, for sync
        code, each process) that uses it.

        ``redis://``, ``rediss://``, ``valkey://`` and ``valkeys://`` (the ``s`` means
        TLS), with ``user:password@host:port/db``. Query options: ``cluster=true``,
        ``client=redis`` (redis-py, the default) or ``client=glide``, ``atomic=false``
        for the protocol path, ``timeout=SECONDS`` (default 2), ``max_concurrency=N``
        (calls in flight per client, default 64), ``wait_replicas=N`` and
        ``wait_timeout=SECONDS`` (durability, see the class), ``auto_pipeline=true``
        (async clients, see the class); other options go to redis-py. Keyword
        `options` go to the constructor and win over the URL's.
        """
        return cls(url=url, **options)

    async def _open_client(self) -> CacheClient:
        """A new client for this loop (or process): from the factory or the connection."""
        opened: Any
        if self._factory is not None:
            opened = self._factory()
            if inspect.isawaitable(opened):  # async-only
                opened = await opened  # async-only
            if type(opened).__module__.split(".")[0] in _CLIENT_LIBRARIES and client_world(
                opened
            ) not in (None, _WORLD):
                raise IdempotencyPersistenceConfigError(
                    f"client_factory returned {type(opened).__name__}, a client of the "
                    "other world: this layer needs "
                    + ("an asyncio client" if _WORLD == "async" else "a sync client")
                )
        else:
            assert self.connection is not None
            extra: dict[str, Any] = {"auto_pipeline": self.auto_pipeline}  # async-only
            # sync-only: extra: dict[str, Any] = {}
            if self.connection.client == "glide":
                opened = await GlideCacheClient.from_connection(self.connection, **extra)
            else:
                opened = await RedisPyCacheClient.from_connection(self.connection, **extra)
        # The layer opened it, so the layer closes it (an adapter the factory built keeps
        # its own `owned`).
        client = adapt(opened, owned=True, auto_pipeline=self.auto_pipeline)  # async-only
        # sync-only: client = adapt(opened, owned=True)
        if self.atomic and not isinstance(client, ScriptingCacheClient):
            with contextlib.suppress(Exception):
                await _close(client)  # opened for us, and of no use
            raise IdempotencyPersistenceConfigError(
                f"{type(opened).__name__} cannot run scripts; use atomic=False"
            )
        return client

    # begin async-only
    def _async_refusal(self) -> str | None:
        """Why async code cannot use this layer (it holds a sync client), or None."""
        if self._foreign is None:
            return None
        return str(_wrong_client(_SYNC_CLIENT, self._foreign))

    def _sync_twin(self) -> SyncPersistenceLayer | None:
        """The store the sync engine uses for this layer: a `SyncCachePersistenceLayer`
        on the same server (its own sync client, from the same settings), or for a
        layer on a client factory of one's own, None (the bridge)."""
        if self._foreign is not None:
            return self._twin
        if self.connection is not None:
            from aioidempotency._sync.cache import SyncCachePersistenceLayer

            if self._twin is None:
                self._twin = SyncCachePersistenceLayer(**self._settings)
            return self._twin
        if self._factory is not None:
            return None
        assert isinstance(self._clients, PassedClient)
        raise TypeError(str(_wrong_client(_ASYNC_CLIENT, self._clients.client)))

    # end async-only
    # --- running an operation -------------------------------------------------------------
    async def _run(self, action: str, key: str, op: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """`op(client, *args)` on the client for this loop and process, retried after a
        transient failure, errors mapped. Every `op` is safe to repeat."""
        # begin async-only
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
        before = cancelling() if cancelling is not None else 0
        # end async-only
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
            # begin async-only
            if cancelling is not None and cancelling() > before:
                # Cancelled while the client failed: the caller asked to stop, not retry.
                raise asyncio.CancelledError(f"{action} of {key!r} was cancelled") from failure
            # end async-only
            now = time.monotonic()
            # Another attempt may take as long as the last one: start it only if it fits.
            if (
                classify(failure) != TRANSIENT
                or attempt >= self.retry_attempts
                or (now - started) + (now - last) > self.retry_budget_seconds
            ):
                error = store_error(action, key, failure, standalone=self._standalone())
                if error.transient:
                    error = await self._diagnosed(error)
                raise error from failure
            delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS)) - 1]
            await sleep(delay * (0.5 + random.random()))
            attempt += 1
            last = time.monotonic()
        # begin async-only
        if (
            cancelling is not None
            and cancelling() > before
            and not getattr(task, "_must_cancel", False)
        ):
            # The client swallowed a cancellation (Python 3.11's asyncio.wait_for, used
            # by redis-py, drops it when the command finishes at the same moment).
            raise asyncio.CancelledError(f"{action} of {key!r} was cancelled")
        # end async-only
        return result

    def _standalone(self) -> bool:
        """True when this layer talks to a standalone server (not a cluster's nodes)."""
        if self.connection is not None:
            return not self.connection.cluster
        client = None if self._clients is None else self._clients.current()
        return getattr(client, "cluster", None) is False

    async def _diagnosed(
        self, error: IdempotencyPersistenceLayerError
    ) -> IdempotencyPersistenceLayerError:
        """`error` (transient), or what the client finds behind it: a client that only
        sees timeouts may be refused a login it retries in the background."""
        client = None if self._clients is None else self._clients.current()
        diagnose = getattr(client, "diagnose", None)
        if diagnose is None:
            return error
        with contextlib.suppress(Exception):
            found = await asyncio.wait_for(diagnose(), self.retry_budget_seconds)  # async-only
            # sync-only: found = diagnose()
            if found is not None:
                return cast(IdempotencyPersistenceLayerError, found)
        return error

    async def _once(self, op: Callable[..., Awaitable[_T]], args: tuple[Any, ...]) -> _T:
        clients = self._clients
        # begin async-only
        if clients is None:  # a sync client: see `_async_refusal`
            raise _wrong_client(_SYNC_CLIENT, self._foreign)
        # end async-only
        # sync-only: assert clients is not None
        opened: Opened[CacheClient] | None = clients.ready()
        if opened is None:
            opened = await clients.open()
        async with opened.limit:
            return await op(opened.client, *args)

    async def aclose(self) -> None:
        """Close the clients opened by the layer (a client given to it stays open).

        The client of the running loop is closed here, those of other running loops in
        their own loop; those of closed loops are dropped. In a forked child, the
        parent's clients are left alone. An async layer also closes the client its
        sync twin opened.
        """
        if self._clients is not None:
            await self._clients.aclose()
        if self._twin is not None and self._foreign is None:  # async-only
            await asyncio.to_thread(self._twin.close)  # async-only

    # --- checking the setup ------------------------------------------------------------
    async def check(
        self, *, raise_on_problem: bool = False, probe: bool = True
    ) -> StoreCheckReport:
        """Check that this layer can work with its server, before a call needs it.

        Connects (a layer built from a URL first logs in to the seed node on a
        connection of its own), reads ``INFO server`` (the server's version, at least
        6.2, and whether it runs in cluster mode as the layer expects), then, with
        `probe`, runs the commands the store's scripts need and every operation of the
        store on a probe key (``aioidempotency-check#...``, deleted at the end, expiring
        within a minute in any case), which shows a password, an ACL or a server that
        refuses scripts. Returns a `StoreCheckReport` listing each problem with its
        fix; `raise_on_problem` raises them instead (`IdempotencyStoreCheckError`).
        """
        # begin async-only
        if self._foreign is not None:  # a sync client: the sync twin that serves it checks
            assert self._twin is not None
            twin = self._twin
            return await asyncio.to_thread(
                lambda: twin.check(raise_on_problem=raise_on_problem, probe=probe)
            )
        # end async-only
        problems: list[StoreProblem] = []
        facts: list[tuple[str, str]] = []
        await self._check_into(problems, facts, probe)
        report = StoreCheckReport(self._description(), tuple(problems), tuple(facts))
        if raise_on_problem:
            report.raise_for_problems()
        return report

    def _description(self) -> str:
        path = "atomic path" if self.atomic else "protocol path"
        connection = self.connection
        if connection is None:
            what = "client_factory" if self._factory is not None else "a client given"
            return f"Redis/Valkey through {what} ({path})"
        user = f"{connection.username}@" if connection.username else ""
        scheme = "rediss" if connection.tls else "redis"
        client = "valkey-glide" if connection.client == "glide" else "redis-py"
        mode = "cluster" if connection.cluster else "standalone"
        db = "" if connection.cluster else f"/{connection.db}"
        return (
            f"{scheme}://{user}{connection.host}:{connection.port}{db} ({client}, {mode}, {path})"
        )

    async def _check_into(
        self, problems: list[StoreProblem], facts: list[tuple[str, str]], probe: bool
    ) -> None:
        connection = self.connection
        cluster: bool | None = None if connection is None else connection.cluster
        where = "the server" if connection is None else f"{connection.host}:{connection.port}"
        user = "default" if connection is None else connection.username or "default"
        glide = connection is not None and connection.client == "glide"

        def judge(exc: BaseException, step: str = "") -> StoreProblem:
            return cache_problem(
                exc,
                where=where,
                user=user if connection is not None else None,
                atomic=self.atomic,
                glide=glide,
                cluster=cluster,
                wait=bool(self.wait_replicas),
                step=step,
            )

        info: Any = None
        if connection is not None:
            try:
                info = await self._seed_info(connection)
            except Exception as exc:
                problems.append(judge(exc, "the login"))
                return
        try:
            opened = self._clients.ready() if self._clients is not None else None
            if opened is None:
                assert self._clients is not None
                opened = await self._clients.open()
            client = opened.client
        except Exception as exc:
            problems.append(judge(exc, "opening a client"))
            return
        glide = glide or isinstance(client, GlideCacheClient)
        if cluster is None:
            cluster = getattr(client, "cluster", None)
        if info is None and getattr(client, "info", None) is not None:
            try:
                info = await client.info()  # type: ignore[attr-defined]
            except Exception as exc:
                if classify(exc) != DENIED:
                    problems.append(judge(exc, "INFO"))
                    return
                facts.append(("server", "not checked (INFO refused, and not needed)"))
        if info is not None:
            fields = parse_info(info)
            mode = server_mode(fields)
            server_cluster = mode == "cluster"
            facts.append(("server", f"{server_name(fields)} ({mode})"))
            if cluster is not None and server_cluster != cluster:
                problems.append(cluster_problem(where, server_cluster=server_cluster))
            found = version_problem(fields, where)
            if found is not None:
                problems.append(found)
        if problems or not probe:
            return
        claim, renewed, done = probe_records()
        if self.atomic:
            try:
                reply = await self._run(
                    "check",
                    claim.idempotency_key,
                    _check_script,
                    claim.idempotency_key,
                    claim.expiry_timestamp,
                )
            except Exception as exc:
                problems.append(judge(exc, "a script"))
                return
            problems += script_problems(
                reply, where=where, user=user, glide=glide, wait=bool(self.wait_replicas)
            )
            if problems:
                return
        failed = await self._probe(claim, renewed, done)
        if failed is not None:
            problems.append(judge(failed[1], failed[0]))
            return
        facts.append(("probe", "claim, get, renew, release, complete, delete: ok"))

    async def _seed_info(self, connection: CacheConnection) -> Any:
        """``INFO server`` through a standalone client of its own to the URL's node."""
        seed = dataclasses.replace(connection, cluster=False, db=0)
        client: RedisPyCacheClient | GlideCacheClient
        if connection.client == "glide":
            client = await GlideCacheClient.from_connection(seed)
        else:
            client = await RedisPyCacheClient.from_connection(seed)
        try:
            return await client.info()
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    # --- the contract -------------------------------------------------------------------
    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        key = record.idempotency_key
        text = self.attributes.to_json(record)
        expiry, owner = record.expiry_timestamp, record.owner or ""
        return await self._run("claim", key, self._path.claim, key, text, expiry, now, owner)

    # begin async-only
    async def claim_each(
        self, records: Sequence[DataRecord], *, now: float
    ) -> list[ClaimResult | Exception]:
        """The claims of `records` in one round trip where the client pipelines (the
        atomic path's ``SET NX GET`` of each, in one batch), retried as a whole after
        a transient failure (a claim resent by its owner is recognised as won)."""
        if len(records) < 2 or not isinstance(self._path, AtomicPath):
            return await super().claim_each(records, now=now)
        claims = [
            (
                record.idempotency_key,
                self.attributes.to_json(record),
                record.expiry_timestamp,
                record.owner or "",
            )
            for record in records
        ]
        return await self._run("claim", claims[0][0], self._path.claim_each, claims, now)

    # end async-only
    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        raw = await self._run("get", key, read, key)
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
        expiry = record.expiry_timestamp
        code = await self._run("complete", key, self._path.complete, key, owner, text, expiry)
        raise_if_lost(key, int(code))

    async def release(self, key: str, *, owner: str) -> None:
        await self._run("release", key, self._path.release, key, owner)

    async def renew(self, record: DataRecord) -> None:
        key, owner = record.idempotency_key, record.owner or ""
        text = self.attributes.to_json(record)
        expiry = record.expiry_timestamp
        code = await self._run("renew", key, self._path.renew, key, owner, text, expiry)
        raise_if_lost(key, int(code))

    async def delete(self, key: str) -> bool:
        return bool(await self._run("delete", key, delete_key, key))


RedisCachePersistenceLayer = CachePersistenceLayer  # async-only
"""Powertools' other name for `CachePersistenceLayer` (same class)."""  # async-only
