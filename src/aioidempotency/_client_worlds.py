"""Which world a cache client belongs to: asyncio or blocking (sync).

One `CachePersistenceLayer` serves `@idempotent_async` and `@idempotent`; a client it
is given serves only one of them. `client_world` tells which, without importing any
client library.
"""

from __future__ import annotations

import inspect
from typing import Literal

__all__ = ["World", "client_world"]

World = Literal["async", "sync"]

_GLIDE_CLASSES = frozenset({"GlideClient", "GlideClusterClient"})


def client_world(client: object) -> World | None:
    """``"async"`` or ``"sync"`` for a client whose kind is known, None otherwise.

    Known: redis-py and valkey-py clients (``redis.asyncio`` vs ``redis``), valkey-glide
    (``glide`` vs ``glide_sync``), this package's adapters, and a client of one's own
    whose ``get`` is an ``async def`` (async) or a plain method (sync).
    """
    for cls in type(client).__mro__:
        module = cls.__module__
        root = module.split(".")[0]
        if root in {"redis", "valkey"} and hasattr(client, "execute_command"):
            return "async" if ".asyncio" in module else "sync"
        if cls.__name__ in _GLIDE_CLASSES and root in {"glide", "glide_sync"}:
            return "async" if root == "glide" else "sync"
        if module.startswith(("aioidempotency._async.", "aioidempotency._sync.")):
            return "async" if module.startswith("aioidempotency._async.") else "sync"
    get = getattr(client, "get", None)
    if get is None or not callable(get):
        return None
    return "async" if inspect.iscoroutinefunction(get) else "sync"
