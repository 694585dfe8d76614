"""Adapter from valkey-glide's sync client (``glide_sync``, the ``valkey-glide-sync``
package) to the sync cache store.

The twin of ``aioidempotency._async.glide``, written by hand: `SyncGlideCacheClient`
wraps a ``glide_sync`` `GlideClient` or `GlideClusterClient` with the same methods as
`GlideCacheClient`. NX, EX and EXAT are mapped to glide's own options; no option is
ever dropped. A glide_sync client is bound to no event loop and is thread-safe, so one
serves every thread of a process.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Sequence
from typing import Any

from aioidempotency._async.glide import _expiry
from aioidempotency._cache_errors import DENIED, TRANSIENT, CacheAccessDeniedError, classify
from aioidempotency._lua import LuaScript
from aioidempotency._urls import CacheConnection
from aioidempotency.exceptions import (
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
)

__all__ = ["SyncGlideCacheClient", "is_glide_client"]

_SCRIPTS: dict[str, Any] = {}
# glide's Script frees its server-side handle in __del__, which fails noisily once the
# interpreter is tearing glide down; drop ours while glide is still whole.
atexit.register(_SCRIPTS.clear)


def _glide() -> Any:
    glide = sys.modules.get("glide_sync")
    if glide is not None:
        return glide
    try:
        import glide_sync
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise IdempotencyPersistenceConfigError(
            "valkey-glide-sync is not installed; install aioidempotency[valkey]"
        ) from exc
    return glide_sync


def is_glide_client(client: object) -> bool:
    """True for a glide_sync `GlideClient` or `GlideClusterClient` (without importing it)."""
    return any(
        cls.__module__.split(".")[0] == "glide_sync"
        and cls.__name__ in {"GlideClient", "GlideClusterClient"}
        for cls in type(client).__mro__
    )


def _map_error(exc: Exception) -> IdempotencyPersistenceLayerError:
    """glide's error as ours, judged like the layer judges any client's (the cause is
    chained by the caller)."""
    kind = classify(exc)
    if kind == TRANSIENT:
        return IdempotencyPersistenceConnectionError(
            "valkey-glide could not reach the server or it was failing over", exc
        )
    if kind == DENIED:
        return CacheAccessDeniedError("valkey-glide was refused access by the server", exc)
    return IdempotencyPersistenceLayerError("valkey-glide command failed", exc)


class SyncGlideCacheClient:
    """A glide_sync client seen as a `SyncCacheClient` that can also run Lua scripts.

    Pass `owned=True` when this adapter should close the glide client on `close()`.
    """

    def __init__(self, client: Any, *, owned: bool = False) -> None:
        if not is_glide_client(client):
            raise IdempotencyPersistenceConfigError(
                f"expected a glide_sync GlideClient or GlideClusterClient, got "
                f"{type(client).__name__}"
            )
        self.client = client
        self.owned = owned
        #: Whether the client is a `GlideClusterClient`.
        self.cluster: bool = any(
            cls.__name__ == "GlideClusterClient" for cls in type(client).__mro__
        )
        self._config: Any = None  # set by `connect`: lets `diagnose` open a fresh client

    @classmethod
    def connect(
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
    ) -> SyncGlideCacheClient:
        """Create a glide_sync client; the adapter owns and closes it. It connects
        lazily, on the first request, within the request timeout."""
        glide = _glide()
        credentials = None
        if password is not None:
            credentials = glide.ServerCredentials(password=password, username=username)
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
                client = glide.GlideClusterClient.create(config)
            else:
                if database:
                    options["database_id"] = database
                config = glide.GlideClientConfiguration(**options)
                client = glide.GlideClient.create(config)
        except Exception as exc:
            raise _map_error(exc) from exc
        adapter = cls(client, owned=True)
        adapter._config = config
        return adapter

    @classmethod
    def from_connection(cls, connection: CacheConnection) -> SyncGlideCacheClient:
        """`connect` to `connection`'s server (`connection.options` are redis-py's)."""
        return cls.connect(
            connection.host,
            connection.port,
            cluster=connection.cluster,
            tls=connection.tls,
            username=connection.username,
            password=connection.password,
            database=connection.db,
            request_timeout_ms=int(connection.timeout * 1000),
        )

    def diagnose(self) -> IdempotencyPersistenceLayerError | None:
        """Why requests keep timing out, when a fresh connection can tell: a login the
        server refuses (`CacheAccessDeniedError`), else None. Only for clients built by
        `connect` (see `GlideCacheClient.diagnose`)."""
        if self._config is None:
            return None
        glide = _glide()
        kind = (
            glide.GlideClusterClient
            if isinstance(self._config, glide.GlideClusterClientConfiguration)
            else glide.GlideClient
        )
        try:
            probe = kind.create(self._config)
            try:
                probe.custom_command(["PING"])
            finally:
                probe.close()
        except Exception as exc:
            error = _map_error(exc)
            return error if isinstance(error, CacheAccessDeniedError) else None
        return None

    def info(self) -> bytes:
        """``INFO server`` of the server (of one node of a cluster), as text."""
        command = ["INFO", "server"]
        try:
            if self.cluster:
                reply = self.client.custom_command(command, route=_glide().RandomNode())
            else:
                reply = self.client.custom_command(command)
        except Exception as exc:
            raise _map_error(exc) from exc
        return reply if isinstance(reply, bytes) else str(reply).encode()

    def get(self, name: str) -> bytes | None:
        """GET `name`."""
        try:
            value: bytes | None = self.client.get(name)
        except Exception as exc:
            raise _map_error(exc) from exc
        return value

    def set(
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
        glide = _glide()
        conditional = glide.ConditionalChange.ONLY_IF_DOES_NOT_EXIST if nx else None
        try:
            result = self.client.set(
                name, value, conditional_set=conditional, expiry=_expiry(glide, ex, exat)
            )
        except Exception as exc:
            raise _map_error(exc) from exc
        return result is not None

    def set_nx_get(self, name: str, value: str, *, ex: int) -> bytes | None:
        """``SET name value NX GET EX ex`` (Redis/Valkey >= 7.0): None when `name` was
        free and now holds `value`, else what it holds (left as it was)."""
        glide = _glide()
        try:
            old: bytes | None = self.client.set(
                name,
                value,
                conditional_set=glide.ConditionalChange.ONLY_IF_DOES_NOT_EXIST,
                expiry=glide.ExpirySet(glide.ExpiryType.SEC, ex),
                return_old_value=True,
            )
        except Exception as exc:
            raise _map_error(exc) from exc
        return old

    def delete(self, *names: str) -> int:
        """DEL `names`; the number of keys removed."""
        try:
            count: int = self.client.delete(list(names))
        except Exception as exc:
            raise _map_error(exc) from exc
        return count

    def run_script(self, script: LuaScript, key: str, args: Sequence[str | int]) -> Any:
        """Run `script` on the node holding `key` (EVALSHA, loading it when needed)."""
        glide_script = _SCRIPTS.get(script.code)
        if glide_script is None:
            glide_script = _SCRIPTS.setdefault(script.code, _glide().Script(script.code))
        try:
            return self.client.invoke_script(glide_script, keys=[key], args=[str(a) for a in args])
        except Exception as exc:
            raise _map_error(exc) from exc

    def run_script_durably(
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
        reply = self.run_script(script, key, args)
        glide = _glide()
        command = ["WAIT", str(replicas), str(timeout_ms)]
        try:
            if isinstance(self.client, glide.GlideClusterClient):
                route = glide.SlotKeyRoute(glide.SlotType.PRIMARY, key)
                acked = self.client.custom_command(command, route=route)
            else:
                acked = self.client.custom_command(command)
        except Exception as exc:
            raise _map_error(exc) from exc
        return reply, int(acked)

    def close(self) -> None:
        """Close the glide client if this adapter created it."""
        if self.owned:
            try:
                self.client.close()
            except Exception as exc:
                raise _map_error(exc) from exc
