"""Build a store from a URL: ``memory://``, ``redis://``, ``rediss://``, ``valkey://``,
``valkeys://`` and ``dynamodb://TABLE``.

Clients are created lazily, inside the event loop that first uses the store.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._async.store import PersistenceLayer
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

__all__ = ["CACHE_SCHEMES", "store_from_url"]

CACHE_SCHEMES = frozenset({"redis", "rediss", "valkey", "valkeys"})


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
