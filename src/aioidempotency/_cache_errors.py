"""What a Redis/Valkey client's error means, shared by the cache store of both worlds.

`classify` sorts a client's exception (redis-py, valkey-py, valkey-glide async or
sync) into transient, access denied, misconfigured, wrong type or other; `store_error`
turns it into this package's error, which the caller raises ``from`` the client's
exception.
"""

from __future__ import annotations

import asyncio
import re
import sys

from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
    IdempotencyPersistenceMisconfiguredError,
)

__all__ = [
    "DENIED",
    "MISCONFIGURED",
    "OTHER",
    "SYNTAX",
    "TRANSIENT",
    "WRONG_TYPE",
    "CacheAccessDeniedError",
    "NotReplicated",
    "classify",
    "store_error",
    "wrong_type",
]


class CacheAccessDeniedError(IdempotencyPersistenceAccessDeniedError):
    """The server refused the credentials or a command (``WRONGPASS``, ``NOAUTH``,
    ``NOPERM``): a configuration problem, so not transient (a retry fails the same way).
    Fix the user's password or ACL (see docs/redis-valkey.md, Permissions); ``await
    store.check()`` names the commands refused."""


class NotReplicated(ConnectionError):
    """A write fewer replicas acknowledged than `wait_replicas` asks (transient)."""


#: Server replies that say "not now or not here": redirections the client did not follow,
#: a cluster or a node that is failing over, loading or read-only (a demoted primary).
_RETRY_REPLY = re.compile(
    r"\b(MOVED|ASK|TRYAGAIN|CLUSTERDOWN|LOADING|READONLY|MASTERDOWN)\b"
    # a primary demoted in a failover between a script and the WAIT after it
    r"|WAIT cannot be used with replica instances"
)
_DENIED_REPLY = re.compile(
    r"\b(WRONGPASS|NOAUTH|NOPERM)\b|PermissionDenied|no permissions|invalid username-password"
    # a command refused inside a script: Redis 7 ("The user executing the script can't run
    # this command or subcommand"), Valkey ("ACL failure in script")
    r"|can't run this command|ACL failure"
)
_DENIED_ERRORS = frozenset(
    {
        "AuthenticationError",
        "AuthenticationWrongNumberOfArgsError",
        "AuthorizationError",
        "NoPermissionError",
    }
)
#: Replies that say the layer's cluster mode is not the server's: redis-py's cluster
#: client on a standalone server, a cluster command sent to a standalone server.
_CLUSTER_OFF_REPLY = re.compile(
    r"cluster mode is not enabled|cluster support disabled", re.IGNORECASE
)
#: Client-side texts for the same: valkey-glide reports a failed (lazy) connection, a
#: node connection it is re-establishing (its cluster client after a failover or a
#: password rotation: "Connection in recovery") and a redirection it gave up on as a
#: plain RequestError ("Standalone connect failed - IoError: ... timed out", "Moved: 38
#: host:port"); redis-py's cluster client gives up on a migrating slot with
#: ClusterError("TTL exhausted.").
_RETRY_TEXT = re.compile(
    r"connect failed|IoError|timed out|connection refused|broken pipe|TTL exhausted|"
    r"\bmoved:|connection in recovery",
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
TRANSIENT, DENIED, WRONG_TYPE, OTHER = "transient", "denied", "wrongtype", "other"
MISCONFIGURED, SYNTAX = "misconfigured", "syntax"


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    types.append(asyncio.TimeoutError)
    for name in ("redis.exceptions", "valkey.exceptions", "glide", "glide_sync"):
        module = sys.modules.get(name)
        if module is None:
            continue
        types += [module.ConnectionError, module.TimeoutError]
        if name.startswith("glide"):
            types.append(module.ClosingError)
    return tuple(types)


def _raised_inside(exc: BaseException, roots: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".")[0] in roots


def classify(exc: BaseException) -> str:
    """What a client error means for the caller: `TRANSIENT` (unreachable, timed out,
    redirected or failing over: worth a retry), `DENIED` (credentials or ACL),
    `MISCONFIGURED` (a cluster client on a standalone server), `WRONG_TYPE` (the key
    holds another Redis type), `SYNTAX` (the server does not know a command's form: an
    older version) or `OTHER`. An error our own adapters raised is judged by its cause."""
    if isinstance(exc, IdempotencyPersistenceLayerError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__
    text = str(exc)
    if _DENIED_REPLY.search(text) or any(
        cls.__name__ in _DENIED_ERRORS for cls in type(exc).__mro__
    ):
        return DENIED
    if _CLUSTER_OFF_REPLY.search(text):
        return MISCONFIGURED
    if "WRONGTYPE" in text:
        return WRONG_TYPE
    if "syntax error" in text:
        return SYNTAX
    if (
        isinstance(exc, _connection_error_types())
        or _RETRY_REPLY.search(text)
        or _RETRY_TEXT.search(text)
        or type(exc).__name__ in _RETRY_ERRORS
    ):
        return TRANSIENT
    if isinstance(exc, AttributeError) and _raised_inside(exc, ("redis", "valkey")):
        # redis-py's cluster client trips over its own topology during a failover.
        return TRANSIENT
    return OTHER


_MOVED = re.compile(r"\bMOVED\b|\bmoved:", re.IGNORECASE)


def store_error(
    action: str, key: str, exc: Exception, *, standalone: bool = False
) -> IdempotencyPersistenceLayerError:
    """A client error as ours: unreachable, timed out or failing over -> connection error
    (transient); refused credentials or ACL -> `CacheAccessDeniedError`; a cluster mode
    that is not the server's -> `IdempotencyPersistenceMisconfiguredError` (a redirection
    reaching a `standalone` client too: the server is a cluster node); others -> layer
    error. The client's exception is chained by the caller (``raise ... from exc``)."""
    kind = classify(exc)
    cause = exc.__cause__ if isinstance(exc, IdempotencyPersistenceLayerError) else exc
    if kind == MISCONFIGURED or (
        standalone and (type(cause).__name__ == "MovedError" or _MOVED.search(str(cause)))
    ):
        return IdempotencyPersistenceMisconfiguredError(
            f"cache store refused {action} of {key!r}: the layer's cluster mode is not the "
            "server's (cluster=true in the URL, or mode=, must match the server; "
            "`python -m aioidempotency check --store URL` tells which)",
            exc,
        )
    if kind == TRANSIENT:
        return IdempotencyPersistenceConnectionError(
            f"cache store unreachable or failing over during {action} of {key!r}", exc
        )
    if kind == DENIED:
        return CacheAccessDeniedError(
            f"cache store refused access during {action} of {key!r} (check the user's "
            "password and ACL)",
            exc,
        )
    return IdempotencyPersistenceLayerError(f"cache store failed during {action} of {key!r}", exc)


def wrong_type(key: str) -> IdempotencyInvalidStatusError:
    """The error for a key that holds another Redis type than a string."""
    return IdempotencyInvalidStatusError(
        f"record {key!r} holds another Redis type (a hash, list, ...), not a record"
    )
