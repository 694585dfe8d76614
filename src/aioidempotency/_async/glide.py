"""Adapter from valkey-glide to the cache store (glide is an optional dependency).

`GlideCacheClient` wraps a `GlideClient` or `GlideClusterClient` so that it offers the
`CacheClient` methods and runs the store's Lua scripts. NX, EX and EXAT are mapped to
glide's own options (`ConditionalChange.ONLY_IF_DOES_NOT_EXIST`,
`ExpirySet(ExpiryType.SEC, n)`, `ExpirySet(ExpiryType.UNIX_SEC, t)`); no option is
ever dropped. Its sync twin, ``aioidempotency._sync.glide``, wraps ``glide_sync``
clients with the same method names.

A glide client is bound to the event loop that created it: used from another loop it
hangs silently. The adapter checks the running loop before every call and refuses a
foreign one with `IdempotencyPersistenceConfigError`.

With `auto_pipeline=True` (standalone clients), the commands of the store's hot path
issued in one turn of the event loop travel as one non-atomic glide `Batch` (see
``aioidempotency._async.pipelining``).
"""

from __future__ import annotations

import asyncio
import atexit
import sys
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from aioidempotency._async.concurrency import outcomes
from aioidempotency._async.pipelining import DEFAULT_MAX_BATCH, Batcher
from aioidempotency._cache_errors import DENIED, TRANSIENT, CacheAccessDeniedError, classify
from aioidempotency._lua import LuaScript
from aioidempotency._urls import CacheConnection
from aioidempotency.exceptions import (
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)

__all__ = ["GlideCacheClient", "is_glide_client"]

_T = TypeVar("_T")

_SCRIPTS: dict[str, Any] = {}
# glide's Script frees its server-side handle in __del__, which fails noisily once the
# interpreter is tearing glide down; drop ours while glide is still whole.
atexit.register(_SCRIPTS.clear)


def _glide() -> Any:
    glide = sys.modules.get("glide")
    if glide is not None:
        return glide
    try:
        import glide
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise IdempotencyPersistenceConfigError(
            "valkey-glide is not installed; install aioidempotency[valkey]"
        ) from exc
    return glide


def is_glide_client(client: object) -> bool:
    """True for a valkey-glide `GlideClient` or `GlideClusterClient` (without importing glide)."""
    return any(
        cls.__module__.split(".")[0] == "glide"
        and cls.__name__ in {"GlideClient", "GlideClusterClient"}
        for cls in type(client).__mro__
    )


def _client_loop(client: object) -> asyncio.AbstractEventLoop | None:
    loop = getattr(client, "_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop):
        return loop
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _mapped(exc: Exception) -> IdempotencyPersistenceLayerError:
    """`_map_error(exc)` with `exc` as its cause, for an error returned, not raised."""
    error = _map_error(exc)
    error.__cause__ = exc
    return error


def _map_error(exc: Exception) -> IdempotencyPersistenceLayerError:
    """glide's error as ours, judged like the layer judges any client's (the cause is
    chained by the caller): unreachable, timed out or failing over -> connection error,
    refused credentials or ACL -> `CacheAccessDeniedError`, others -> layer error."""
    kind = classify(exc)
    if kind == TRANSIENT:
        return IdempotencyPersistenceConnectionError(
            "valkey-glide could not reach the server or it was failing over", exc
        )
    if kind == DENIED:
        return CacheAccessDeniedError("valkey-glide was refused access by the server", exc)
    return IdempotencyPersistenceLayerError("valkey-glide command failed", exc)


def _expiry(glide: Any, ex: int | None, exat: int | None) -> Any:
    """glide's `ExpirySet` for EX seconds or EXAT epoch seconds (None for neither)."""
    if exat is not None:
        return glide.ExpirySet(glide.ExpiryType.UNIX_SEC, int(exat))
    if ex is not None:
        return glide.ExpirySet(glide.ExpiryType.SEC, int(ex))
    return None


def _closed_error() -> Exception:
    error: Exception = _glide().ClosingError("the adapter was closed before this command was sent")
    return error


def _consume_outcome(call: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a call nobody awaits any more (no unretrieved-error log)."""
    if not call.cancelled():
        call.exception()


def _is_no_script(exc: BaseException | None) -> bool:
    """A NOSCRIPT error reply (glide 2.6 words it "NoScriptError: No matching script")."""
    return "NOSCRIPT" in str(exc).upper()


class GlideCacheClient:
    """A valkey-glide client seen as a `CacheClient` that can also run Lua scripts.

    Pass `owned=True` when this adapter should close the glide client on `aclose()`.

    `auto_pipeline=True` sends GET, SET (the plain claim ``SET NX GET`` too), DEL and
    the scripts (EVALSHA) issued in one turn of the event loop as one non-atomic glide
    `Batch` (``raise_on_error=False``), at most `max_batch` commands each: one write
    and one read on the socket for them all. A command issued while none is queued or
    awaiting its reply goes alone, as without pipelining. Each caller gets its own reply or error;
    a script the server does not know (NOSCRIPT) is loaded and run again by
    ``invoke_script``, as without pipelining. Not pipelined: a cluster client (every
    command goes on its own), `run_script_durably` (its script and ``WAIT``), `info`. `batcher` is
    the `Batcher` (its `batches` and `commands` count what it sent), None when off.
    """

    def __init__(
        self,
        client: Any,
        *,
        owned: bool = False,
        auto_pipeline: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if not is_glide_client(client):
            raise IdempotencyPersistenceConfigError(
                f"expected a GlideClient or GlideClusterClient, got {type(client).__name__}"
            )
        self.client = client
        self.owned = owned
        #: Whether the client is a `GlideClusterClient`.
        self.cluster: bool = any(
            cls.__name__ == "GlideClusterClient" for cls in type(client).__mro__
        )
        self._loop = _client_loop(client)
        self._config: Any = None  # set by `connect`: lets `diagnose` open a fresh client
        self.batcher: Batcher[list[str]] | None = None
        if auto_pipeline and not self.cluster:
            self.batcher = Batcher(self._send_batch, closed=_closed_error, max_batch=max_batch)

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        cluster: bool = False,
        tls: bool = False,
        username: str | None = None,
        password: str | None = None,
        database: int = 0,
        request_timeout_ms: int = 2000,
        auto_pipeline: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> GlideCacheClient:
        """Create a glide client in the running loop; the adapter owns and closes it."""
        glide = _glide()
        credentials = None
        if password is not None:
            credentials = glide.ServerCredentials(password=password, username=username)
        # Connect lazily, within the request timeout: an eager `create` connects inside a
        # blocking native call, which stops the event loop while a server is unreachable.
        options: dict[str, Any] = {
            "addresses": [glide.NodeAddress(host, port)],
            "use_tls": tls,
            "credentials": credentials,
            "request_timeout": request_timeout_ms,
            "lazy_connect": True,
            "advanced_config": glide.AdvancedGlideClientConfiguration(
                connection_timeout=request_timeout_ms
            ),
        }
        try:
            if cluster:
                config = glide.GlideClusterClientConfiguration(**options)
                client = await glide.GlideClusterClient.create(config)
            else:
                if database:
                    options["database_id"] = database
                config = glide.GlideClientConfiguration(**options)
                client = await glide.GlideClient.create(config)
        except Exception as exc:
            raise _map_error(exc) from exc
        adapter = cls(client, owned=True, auto_pipeline=auto_pipeline, max_batch=max_batch)
        adapter._config = config
        return adapter

    @classmethod
    async def from_connection(
        cls, connection: CacheConnection, *, auto_pipeline: bool = False
    ) -> GlideCacheClient:
        """`connect` to `connection`'s server (`connection.options` are redis-py's)."""
        return await cls.connect(
            connection.host,
            connection.port,
            cluster=connection.cluster,
            tls=connection.tls,
            username=connection.username,
            password=connection.password,
            database=connection.db,
            request_timeout_ms=int(connection.timeout * 1000),
            auto_pipeline=auto_pipeline,
        )

    async def diagnose(self) -> IdempotencyPersistenceLayerError | None:
        """Why requests keep timing out, when a fresh connection can tell.

        glide reconnects in the background and reports a login the server refuses (a
        changed password, a removed ACL user) only as timed-out requests. A fresh
        client with the same configuration logs in at once and says so: that refusal
        is returned (`CacheAccessDeniedError`), else None. Only for clients built by
        `connect`.
        """
        if self._config is None:
            return None
        glide = _glide()
        kind = (
            glide.GlideClusterClient
            if isinstance(self._config, glide.GlideClusterClientConfiguration)
            else glide.GlideClient
        )
        try:
            probe = await kind.create(self._config)
            try:
                await probe.custom_command(["PING"])
            finally:
                await probe.close()
        except Exception as exc:
            error = _map_error(exc)
            return error if isinstance(error, CacheAccessDeniedError) else None
        return None

    def _check_loop(self) -> None:
        running = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = running
        elif running is not self._loop:
            raise IdempotencyPersistenceConfigError(
                "this valkey-glide client was created on another event loop; a glide client "
                "used from a foreign loop hangs, so the call is refused. Create the client "
                "inside the loop that uses it, or use CachePersistenceLayer.from_url(...), "
                "which opens one client per loop."
            )

    # Each method maps glide's errors itself (no wrapper coroutine: these are per call).
    async def info(self) -> bytes:
        """``INFO server`` of the server (of one node of a cluster), as text."""
        self._check_loop()
        command = ["INFO", "server"]
        try:
            if self.cluster:
                reply = await self.client.custom_command(command, route=_glide().RandomNode())
            else:
                reply = await self.client.custom_command(command)
        except Exception as exc:
            raise _map_error(exc) from exc
        return reply if isinstance(reply, bytes) else str(reply).encode()

    async def get(self, name: str) -> bytes | None:
        """GET `name`."""
        self._check_loop()
        if self._pipelining():
            value: bytes | None = await self._batched(["GET", name])
            return value
        try:
            value = await self._alone(self.client.get(name))
        except Exception as exc:
            raise _map_error(exc) from exc
        return value

    async def set(
        self,
        name: str,
        value: str,
        *,
        ex: int | None = None,
        exat: int | None = None,
        nx: bool = False,
    ) -> bool:
        """SET `name` with NX, EX (seconds) and EXAT (epoch seconds) mapped to glide's
        options; True when written."""
        self._check_loop()
        if self._pipelining():
            command = ["SET", name, value]
            if nx:
                command.append("NX")
            if exat is not None:
                command += ["EXAT", str(int(exat))]
            elif ex is not None:
                command += ["EX", str(int(ex))]
            return await self._batched(command) is not None
        glide = _glide()
        conditional = glide.ConditionalChange.ONLY_IF_DOES_NOT_EXIST if nx else None
        expiry = _expiry(glide, ex, exat)
        try:
            result = await self._alone(
                self.client.set(name, value, conditional_set=conditional, expiry=expiry)
            )
        except Exception as exc:
            raise _map_error(exc) from exc
        return result is not None

    async def set_nx_get(self, name: str, value: str, *, ex: int) -> bytes | None:
        """``SET name value NX GET EX ex`` (Redis/Valkey >= 7.0): None when `name` was
        free and now holds `value`, else what it holds (left as it was)."""
        self._check_loop()
        if self._pipelining():
            old: bytes | None = await self._batched(
                ["SET", name, value, "NX", "GET", "EX", str(int(ex))]
            )
            return old
        glide = _glide()
        try:
            old = await self._alone(
                self.client.set(
                    name,
                    value,
                    conditional_set=glide.ConditionalChange.ONLY_IF_DOES_NOT_EXIST,
                    expiry=glide.ExpirySet(glide.ExpiryType.SEC, ex),
                    return_old_value=True,
                )
            )
        except Exception as exc:
            raise _map_error(exc) from exc
        return old

    async def set_nx_get_each(
        self, claims: Sequence[tuple[str, str, int]]
    ) -> list[bytes | Exception | None]:
        """`set_nx_get` of each ``(name, value, ex)``, one reply per claim and a
        command's error (mapped) in its place. With pipelining, all go as one batch, at
        once; without (a cluster), each on its own, concurrently."""
        self._check_loop()
        if self.batcher is None:
            return await outcomes(self.set_nx_get(name, value, ex=ex) for name, value, ex in claims)
        commands = [
            ["SET", name, value, "NX", "GET", "EX", str(int(ex))] for name, value, ex in claims
        ]
        try:
            replies = await self.batcher.send_now(commands)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _map_error(exc) from exc
        return [_mapped(reply) if isinstance(reply, Exception) else reply for reply in replies]

    async def delete(self, *names: str) -> int:
        """DEL `names`; the number of keys removed."""
        self._check_loop()
        if self._pipelining():
            removed: int = await self._batched(["DEL", *names])
            return removed
        try:
            count: int = await self._alone(self.client.delete(list(names)))
        except Exception as exc:
            raise _map_error(exc) from exc
        return count

    async def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        """Run `script` on the node holding `key` (EVALSHA, loading it when needed)."""
        self._check_loop()
        if self._pipelining():
            words = [str(a) for a in args]
            try:
                return await self._batched(["EVALSHA", script.sha, "1", key, *words])
            except IdempotencyPersistenceLayerError as exc:
                if not _is_no_script(exc.__cause__):
                    raise
            # Not cached by the server (a restart, SCRIPT FLUSH): glide loads it.
        return await self._alone(self._invoke(script, key, args))

    async def _invoke(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        glide_script = _SCRIPTS.get(script.code)
        if glide_script is None:
            glide_script = _SCRIPTS.setdefault(script.code, _glide().Script(script.code))
        # glide 2.6 can free a script call's arguments when the awaiting task is
        # cancelled while the call is in flight, and then sends freed memory as the
        # value to write: the call runs in a task of its own, which a cancellation of
        # the caller does not touch, so its arguments live until it is sent.
        call = asyncio.ensure_future(
            self.client.invoke_script(glide_script, keys=[key], args=[str(a) for a in args])
        )
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(_consume_outcome)
            raise
        except Exception as exc:
            raise _map_error(exc) from exc

    async def run_script_durably(
        self,
        script: LuaScript,
        key: str,
        args: Sequence[str | int],
        *,
        replicas: int,
        timeout_ms: int,
    ) -> tuple[Any, int]:
        """Run `script`, then ``WAIT replicas timeout_ms`` on the node holding `key`;
        returns the script's reply and the replicas that acknowledged it. glide keeps one
        connection per node, so ``WAIT`` follows the script on the connection that wrote."""
        self._check_loop()
        reply = await self._invoke(script, key, args)  # not batched: see the class
        glide = _glide()
        command = ["WAIT", str(replicas), str(timeout_ms)]
        try:
            if isinstance(self.client, glide.GlideClusterClient):
                route = glide.SlotKeyRoute(glide.SlotType.PRIMARY, key)
                acked = await self.client.custom_command(command, route=route)
            else:
                acked = await self.client.custom_command(command)
        except Exception as exc:
            raise _map_error(exc) from exc
        return reply, int(acked)

    def _pipelining(self) -> bool:
        """True when the next command joins a batch: pipelining is on and another
        command is queued or awaiting its reply (else it goes alone, at once)."""
        return self.batcher is not None and not self.batcher.idle

    def _alone(self, call: Awaitable[_T]) -> Awaitable[_T]:
        """`call`, a command sent on its own: counted in flight when pipelining."""
        return call if self.batcher is None else self.batcher.alone(call)

    async def _batched(self, command: list[str]) -> Any:
        """`command`'s reply through the batcher; its error reply or the batch's
        failure mapped as a command sent alone would be (the cause chained)."""
        assert self.batcher is not None
        future = self.batcher.submit(command)
        try:
            return await future
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _map_error(exc) from exc

    async def _send_batch(self, commands: list[list[str]]) -> list[Any]:
        """One non-atomic glide `Batch` of `commands`; error replies in their places."""
        batch = _glide().Batch(is_atomic=False)
        for command in commands:
            batch.custom_command(command)
        # In a task of its own, as a script call (see `_invoke`): a cancellation of the
        # flush (the loop shutting down) leaves glide's arguments alive until sent.
        call = asyncio.ensure_future(self.client.exec(batch, raise_on_error=False))
        try:
            replies = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(_consume_outcome)
            raise
        return list(replies or ())  # None only for a transaction that WATCH aborted

    async def aclose(self) -> None:
        """Fail the commands still queued for a batch, wait for the batches in flight,
        then close the glide client if this adapter created it."""
        if self.batcher is not None:
            await self.batcher.aclose()
        if self.owned:
            try:
                await self.client.close()
            except Exception as exc:
                raise _map_error(exc) from exc
