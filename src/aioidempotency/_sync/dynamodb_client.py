"""The boto3 clients of a sync DynamoDB layer: which one it was given, how one is
configured, opened and closed, and when sync code cannot have one.

Hand-written: ``aioidempotency._async.dynamodb_client`` has the same names for
aiobotocore clients. The layer holds its clients with ``aioidempotency._sync.clients``:
a client given in a `PassedClient`, the one it opens in `OpenedClients` (one per
process, shared by its threads: botocore clients are thread-safe).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from aioidempotency._dynamodb_items import DynamoDBSettings, config_options, passed_in_child

__all__ = [
    "close_client",
    "config",
    "given",
    "in_child",
    "new_session",
    "open_client",
    "pool_size",
    "refusal",
]

_OPENING = threading.Lock()
"""Held while a client is created: boto3 sessions are not thread-safe, and one session
may be given to several layers."""


def _after_fork_in_child() -> None:
    global _OPENING
    _OPENING = threading.Lock()  # another thread may have held it when the process forked


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def given(settings: DynamoDBSettings) -> tuple[Any, Any]:
    """The boto3 (or botocore) client and session the layer was given (each None when
    it was not)."""
    return settings.sync_client, settings.sync_session


def in_child(settings: DynamoDBSettings) -> str:
    """Why the client given is refused in a forked child."""
    return passed_in_child("boto3_client= (or client=)")


def config(settings: DynamoDBSettings, session: Any = None) -> Any:
    """The botocore `Config` of the client a layer opens: the bounded timeouts and
    retries under what `boto_config` sets explicitly (see `config_options`)."""
    from botocore.config import Config

    given, defaults = config_options(settings, session)
    user = settings.boto_config
    if user is None:
        return Config(**defaults)
    aio = sys.modules.get("aiobotocore.config")
    if aio is not None and isinstance(user, aio.AioConfig):
        user = Config(**given)  # its aiohttp options mean nothing to botocore
    return user.merge(Config(**defaults))


def pool_size(settings: DynamoDBSettings) -> int:
    """How many requests may be in flight on a client the layer opens: its connection
    pool's size (`max_pool_connections`). urllib3 opens a connection for a request
    beyond it and discards that connection after, with a warning each time, and a
    server then gets a connection per thread; the layer makes the other threads wait,
    as aiobotocore's pool makes the async layer's calls wait."""
    size: int = config(settings).max_pool_connections
    return size


def refusal(settings: DynamoDBSettings) -> str | None:
    """Why sync code cannot use a layer on `settings` (it was given only an aiobotocore
    client or an aioboto3 session), or None."""
    if settings.sync_client is not None or settings.sync_session is not None:
        return None
    if settings.async_client is not None:
        return (
            f"the DynamoDB layer of table {settings.table_name!r} was given an "
            "aiobotocore client (client=), which belongs to the event loop it was "
            "opened in and serves async code only. For sync code (@idempotent, "
            "@idempotent_function) pass a boto3 client as boto3_client= as well, or "
            "leave client= out so that the layer opens a client of each kind itself"
        )
    if settings.async_session is not None:
        return (
            f"the sync DynamoDB layer of table {settings.table_name!r} was given an "
            "aioboto3/aiobotocore session; pass a boto3 session as boto3_session= "
            "(or session=) instead"
        )
    return None


def new_session() -> Any:
    """The session of a layer given none: a boto3 `Session` (botocore's without boto3)."""
    try:
        import boto3.session  # type: ignore[import-untyped,unused-ignore]
    except ImportError:  # botocore alone serves as well
        import botocore.session

        return botocore.session.get_session()
    return boto3.session.Session()


def open_client(settings: DynamoDBSettings, session: Any) -> Any:
    """A new client from `session` (boto3's or botocore's) with `config`."""
    create = getattr(session, "client", None) or session.create_client
    with _OPENING:
        return create(
            "dynamodb",
            region_name=settings.region_name,
            endpoint_url=settings.endpoint_url,
            config=config(settings, session),
        )


def close_client(client: Any) -> None:
    """Close a client `open_client` opened."""
    client.close()
