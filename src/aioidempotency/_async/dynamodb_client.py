"""The aiobotocore clients of an async DynamoDB layer: which one it was given, how one
is configured, opened and closed, and when async code cannot have one.

Hand-written: ``aioidempotency._sync.dynamodb_client`` has the same names for boto3
clients. The layer holds its clients with ``aioidempotency._async.clients``: a client
given in a `PassedClient`, those it opens in `OpenedClients` (one per event loop,
closed when its loop shuts down).
"""

from __future__ import annotations

from typing import Any

from aioidempotency._dynamodb_items import DynamoDBSettings, config_options, passed_in_child

__all__ = ["close_client", "config", "given", "in_child", "new_session", "open_client", "refusal"]


def given(settings: DynamoDBSettings) -> tuple[Any, Any]:
    """The aiobotocore client and the aioboto3/aiobotocore session the layer was given
    (each None when it was not)."""
    return settings.async_client, settings.async_session


def in_child(settings: DynamoDBSettings) -> str:
    """Why the client given is refused in a forked child."""
    return passed_in_child("client=")


def config(settings: DynamoDBSettings, session: Any = None) -> Any:
    """The `AioConfig` of the clients a layer opens: the bounded timeouts and retries
    under what `boto_config` sets explicitly (see `config_options`)."""
    from aiobotocore.config import AioConfig

    given, defaults = config_options(settings, session)
    user = settings.boto_config
    if user is None:
        return AioConfig(**defaults)
    if not isinstance(user, AioConfig):  # a botocore Config: keep its options
        user = AioConfig(**given)
    return user.merge(AioConfig(**defaults))


def refusal(settings: DynamoDBSettings) -> str | None:
    """Why async code cannot use a layer on `settings` (it was given only boto3 clients
    or sessions), or None."""
    if settings.async_client is not None or settings.async_session is not None:
        return None
    if settings.sync_client is None and settings.sync_session is None:
        return None
    what = "client" if settings.sync_client is not None else "session"
    return (
        f"the DynamoDB layer of table {settings.table_name!r} was given a boto3 {what}, "
        "which serves sync code only (@idempotent, @idempotent_function). For async "
        "code pass an aiobotocore client as client= or an aioboto3 session as "
        f"session= (next to the boto3 {what}), or give neither client nor session so "
        "that the layer opens a client of each kind itself"
    )


def new_session() -> Any:
    """The session of a layer given none: a new `AioSession`."""
    from aiobotocore.session import AioSession

    return AioSession()


async def open_client(settings: DynamoDBSettings, session: Any) -> Any:
    """A new client from `session` (aioboto3's or aiobotocore's) with `config`."""
    create = getattr(session, "client", None) or session.create_client
    context = create(
        "dynamodb",
        region_name=settings.region_name,
        endpoint_url=settings.endpoint_url,
        config=config(settings, session),
    )
    return await context.__aenter__()


async def close_client(client: Any) -> None:
    """Close a client `open_client` opened (what leaving its context does)."""
    await client.__aexit__(None, None, None)
