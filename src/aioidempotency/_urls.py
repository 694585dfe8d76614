"""Build a store from a URL: ``memory://``, ``redis://``, ``rediss://``, ``valkey://``,
``valkeys://`` and ``dynamodb://TABLE``; and the connection settings of a cache store.

Clients are created lazily, inside the event loop (or, for sync code, the process)
that first uses the store. A cache URL or Powertools' connection arguments become a
`CacheConnection`, from which each world's client adapter opens its own client.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._async.store import PersistenceLayer
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = [
    "CACHE_SCHEMES",
    "CacheConnection",
    "cache_connection",
    "parse_cache_url",
    "store_from_url",
]

CACHE_SCHEMES = frozenset({"redis", "rediss", "valkey", "valkeys"})

#: Query options of a cache URL that are the store's own (the rest go to redis-py).
_STORE_OPTIONS = ("atomic", "max_concurrency", "wait_replicas", "wait_timeout")
_CONNECTION_OPTIONS = ("cluster", "client", "timeout")
_CLIENTS = {"redis": "redis", "redis-py": "redis", "redispy": "redis", "glide": "glide"}


def store_from_url(url: str) -> PersistenceLayer:
    """The store a URL names. ``memory://?max_items=N`` is the embedded default."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        query = parse_qs(parts.query)
        max_items = int(query.get("max_items", ["100000"])[0])
        return InMemoryPersistenceLayer(max_items=max_items)
    if scheme in CACHE_SCHEMES:
        from aioidempotency._async.cache import CachePersistenceLayer

        return CachePersistenceLayer.from_url(url)
    if scheme == "dynamodb":
        from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer

        return DynamoDBPersistenceLayer.from_url(url)
    raise IdempotencyPersistenceConfigError(
        f"unknown store URL scheme {parts.scheme!r} in {url!r}; use memory://, redis://, "
        "rediss://, valkey://, valkeys:// or dynamodb://TABLE"
    )


@dataclasses.dataclass(frozen=True)
class CacheConnection:
    """Where and how a cache store connects; each world opens its own client from it.

    `client` is ``"redis"`` (redis-py) or ``"glide"`` (valkey-glide); `timeout` is the
    connect and request timeout in seconds; `options` are further redis-py URL options
    (``health_check_interval=30``, ...), in the order given.
    """

    host: str = "localhost"
    port: int = 6379
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False
    cluster: bool = False
    client: str = "redis"
    timeout: float = 2.0
    options: tuple[tuple[str, str], ...] = ()

    def redis_url(self) -> str:
        """The URL redis-py's ``from_url`` takes for this connection."""
        auth = ""
        if self.username or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = "" if self.cluster and not self.db else f"/{self.db}"
        query = f"?{urlencode(self.options)}" if self.options else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}{path}{query}"


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "y", "yes", "t", "true", "on"}


def parse_cache_url(url: str) -> tuple[CacheConnection, dict[str, Any]]:
    """The connection a cache URL names, and the store options in its query.

    ``redis://``, ``rediss://``, ``valkey://`` and ``valkeys://`` (the ``s`` means TLS),
    with ``user:password@host:port/db``. Query options: ``cluster=true``,
    ``client=redis`` (default) or ``client=glide``, ``timeout=SECONDS`` (default 2),
    and the store's ``atomic``, ``max_concurrency``, ``wait_replicas``,
    ``wait_timeout``; the others go to redis-py.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in CACHE_SCHEMES:
        raise IdempotencyPersistenceConfigError(f"not a Redis/Valkey URL: {url!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    flags = {
        name: query.pop(name)[-1]
        for name in (*_CONNECTION_OPTIONS, *_STORE_OPTIONS)
        if name in query
    }
    kind = _CLIENTS.get(flags.get("client", "redis").lower())
    if kind is None:
        raise IdempotencyPersistenceConfigError(
            f"unknown client {flags['client']!r} in {url!r}; use client=redis or client=glide"
        )
    options: dict[str, Any] = {}
    try:
        timeout = float(flags.get("timeout", "2"))
        path = parts.path.strip("/")
        db = int(path) if path else 0
        port = parts.port or 6379
        if "atomic" in flags:
            options["atomic"] = _truthy(flags["atomic"])
        if "max_concurrency" in flags:
            options["max_concurrency"] = int(flags["max_concurrency"])
        if "wait_replicas" in flags:
            options["wait_replicas"] = int(flags["wait_replicas"])
        if "wait_timeout" in flags:
            options["wait_timeout"] = float(flags["wait_timeout"])
    except ValueError as exc:
        raise IdempotencyPersistenceConfigError(f"bad number in {url!r}: {exc}") from exc
    connection = CacheConnection(
        host=parts.hostname or "localhost",
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=db,
        tls=scheme in {"rediss", "valkeys"},
        cluster=_truthy(flags.get("cluster", "false")),
        client=kind,
        timeout=timeout,
        options=tuple((name, value) for name, values in query.items() for value in values),
    )
    return connection, options


def cache_connection(
    *,
    url: str,
    host: str,
    port: int,
    username: str,
    password: str,
    db_index: int,
    mode: Literal["standalone", "cluster"],
    ssl: bool,
) -> tuple[CacheConnection, dict[str, Any]] | None:
    """The connection Powertools' arguments name (`url` wins over `host`), and the store
    options in the URL; None when neither is given. ``mode="cluster"`` also makes a URL
    connect in cluster mode; `ssl` (default True, as in Powertools) only applies to
    `host`, a URL says it with its scheme."""
    if mode not in ("standalone", "cluster"):
        raise IdempotencyPersistenceConfigError(
            f"mode must be 'standalone' or 'cluster', not {mode!r}"
        )
    if url:
        connection, options = parse_cache_url(url)
        if mode == "cluster" and not connection.cluster:
            connection = dataclasses.replace(connection, cluster=True)
        return connection, options
    if not host:
        return None
    connection = CacheConnection(
        host=host,
        port=int(port),
        username=username or None,
        password=password or None,
        db=0 if mode == "cluster" else int(db_index),
        tls=bool(ssl),
        cluster=mode == "cluster",
    )
    return connection, {}
