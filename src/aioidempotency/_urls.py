"""Build a store from a URL: ``memory://``, ``redis://``, ``rediss://``, ``valkey://``,
``valkeys://`` and ``dynamodb://TABLE``; and the connection settings of a cache store.

Clients are created lazily, inside the event loop (or, for sync code, the process)
that first uses the store. A cache URL or Powertools' connection arguments become a
`CacheConnection`, from which each world's client adapter opens its own client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._async.store import PersistenceLayer
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = [
    "CACHE_SCHEMES",
    "REDIS_PY_OPTIONS",
    "CacheConnection",
    "cache_connection",
    "parse_cache_url",
    "redacted",
    "store_from_url",
]

_T = TypeVar("_T")

CACHE_SCHEMES = frozenset({"redis", "rediss", "valkey", "valkeys"})

#: Query options of a cache URL that are the store's own (the rest go to redis-py).
_STORE_OPTIONS = ("atomic", "max_concurrency", "wait_replicas", "wait_timeout", "auto_pipeline")
_CONNECTION_OPTIONS = ("cluster", "client", "timeout")
_CLIENTS = {"redis": "redis", "redis-py": "redis", "redispy": "redis", "glide": "glide"}
_TRUE = frozenset({"1", "y", "yes", "t", "true", "on"})
_FALSE = frozenset({"0", "n", "no", "f", "false", "off"})


def _flag(value: str) -> bool:
    text = value.strip().lower()
    if text not in _TRUE | _FALSE:
        raise ValueError("not true or false")
    return text in _TRUE


def _protocol(value: str) -> int:
    if value.strip() not in {"2", "3"}:
        raise ValueError("not 2 or 3")
    return int(value)


#: The redis-py options a cache URL may carry (``client=redis``), with the parser of
#: each: those redis-py's ``from_url`` reads from a query as text. valkey-glide takes
#: none of them.
REDIS_PY_OPTIONS: dict[str, Callable[[str], object]] = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _flag,
    "socket_read_size": int,
    "retry_on_timeout": _flag,
    "max_connections": int,
    "health_check_interval": int,
    "client_name": str,
    "protocol": _protocol,
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_password": str,
    "ssl_check_hostname": _flag,
    "ssl_min_version": int,
    "ssl_ciphers": str,
}
_KINDS: dict[object, str] = {
    float: "a number",
    int: "a whole number",
    _flag: "true or false",
    _protocol: "2 or 3",
}


def redacted(url: str) -> str:
    """`url` without its password (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _option_error(url: str, message: str) -> IdempotencyPersistenceConfigError:
    return IdempotencyPersistenceConfigError(f"{message} in {redacted(url)!r}")


def _parsed(url: str, name: str, value: str, parse: Callable[[str], _T]) -> _T:
    """`parse(value)`, or an error naming the option and what it takes."""
    try:
        return parse(value)
    except ValueError:
        kind = _KINDS.get(parse, "valid")
        raise _option_error(url, f"option {name}={value!r} is not {kind}") from None


def _redis_py_options(url: str, query: dict[str, list[str]], kind: str, tls: bool) -> None:
    """Refuse the options the client `kind` would not use or would choke on: unknown
    ones (redis-py raised TypeError at the first call), redis-py's with valkey-glide
    (which ignored them), TLS options on a URL without TLS, values of the wrong type."""
    ours = ", ".join((*_CONNECTION_OPTIONS, *_STORE_OPTIONS))
    for name, values in query.items():
        if name not in REDIS_PY_OPTIONS:
            theirs = "" if kind == "glide" else f" and redis-py's ({', '.join(REDIS_PY_OPTIONS)})"
            raise _option_error(
                url,
                f"unknown option {name!r}; a cache URL takes the store's options ({ours}){theirs}",
            )
        if kind == "glide":
            raise _option_error(
                url,
                f"option {name!r} is redis-py's, and valkey-glide (client=glide) would ignore "
                f"it; with client=glide a URL takes {ours}",
            )
        if name.startswith("ssl_") and not tls:
            raise _option_error(url, f"option {name!r} needs TLS: use rediss:// or valkeys://")
        for value in values:
            _parsed(url, name, value, REDIS_PY_OPTIONS[name])


def store_from_url(url: str) -> PersistenceLayer:
    """The store a URL names. ``memory://?max_items=N`` is the embedded default."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"max_items"})
        if unknown:
            raise _option_error(url, f"unknown option {unknown[0]!r}; memory:// takes max_items")
        max_items = _parsed(url, "max_items", query.get("max_items", ["100000"])[-1], int)
        if max_items < 1:
            raise _option_error(url, f"option max_items={max_items} must be at least 1")
        return InMemoryPersistenceLayer(max_items=max_items)
    if scheme in CACHE_SCHEMES:
        from aioidempotency._async.cache import CachePersistenceLayer

        return CachePersistenceLayer.from_url(url)
    if scheme == "dynamodb":
        from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer

        return DynamoDBPersistenceLayer.from_url(url)
    raise IdempotencyPersistenceConfigError(
        f"unknown store URL scheme {parts.scheme!r} in {redacted(url)!r}; use memory://, "
        "redis://, rediss://, valkey://, valkeys:// or dynamodb://TABLE"
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


def parse_cache_url(url: str) -> tuple[CacheConnection, dict[str, Any]]:
    """The connection a cache URL names, and the store options in its query.

    ``redis://``, ``rediss://``, ``valkey://`` and ``valkeys://`` (the ``s`` means TLS),
    with ``user:password@host:port/db``. Query options: ``cluster=true``,
    ``client=redis`` (default) or ``client=glide``, ``timeout=SECONDS`` (default 2),
    the store's ``atomic``, ``max_concurrency``, ``wait_replicas``, ``wait_timeout``,
    ``auto_pipeline``, and with redis-py the options in `REDIS_PY_OPTIONS`, passed on
    to it. Any other option, a redis-py option with ``client=glide`` (which would
    ignore it), or a value of the wrong type raises `IdempotencyPersistenceConfigError`
    naming the option.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in CACHE_SCHEMES:
        raise IdempotencyPersistenceConfigError(f"not a Redis/Valkey URL: {redacted(url)!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    flags = {
        name: query.pop(name)[-1]
        for name in (*_CONNECTION_OPTIONS, *_STORE_OPTIONS)
        if name in query
    }
    kind = _CLIENTS.get(flags.get("client", "redis").lower())
    if kind is None:
        raise IdempotencyPersistenceConfigError(
            f"unknown client {flags['client']!r} in {redacted(url)!r}; use client=redis or "
            "client=glide"
        )
    tls = scheme in {"rediss", "valkeys"}
    _redis_py_options(url, query, kind, tls)
    options: dict[str, Any] = {}
    timeout = _parsed(url, "timeout", flags.get("timeout", "2"), float)
    if not timeout > 0:
        raise _option_error(url, f"option timeout={timeout:g} must be a positive number of seconds")
    path = parts.path.strip("/")
    db = _parsed(url, "database (the path)", path, int) if path else 0
    try:
        port = parts.port or 6379
    except ValueError:
        raise _option_error(url, "the port is not a number from 1 to 65535") from None
    cluster = _parsed(url, "cluster", flags.get("cluster", "false"), _flag)
    if "atomic" in flags:
        options["atomic"] = _parsed(url, "atomic", flags["atomic"], _flag)
    if "auto_pipeline" in flags:
        options["auto_pipeline"] = _parsed(url, "auto_pipeline", flags["auto_pipeline"], _flag)
    if "max_concurrency" in flags:
        options["max_concurrency"] = _parsed(url, "max_concurrency", flags["max_concurrency"], int)
    if "wait_replicas" in flags:
        options["wait_replicas"] = _parsed(url, "wait_replicas", flags["wait_replicas"], int)
    if "wait_timeout" in flags:
        options["wait_timeout"] = _parsed(url, "wait_timeout", flags["wait_timeout"], float)
    connection = CacheConnection(
        host=parts.hostname or "localhost",
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=db,
        tls=tls,
        cluster=cluster,
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
