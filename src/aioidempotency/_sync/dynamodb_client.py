"""The boto3 client of a sync DynamoDB layer: one per process, shared by its threads.

Hand-written: its async counterpart, ``aioidempotency._async.dynamodb_client``, has the
same names and holds aiobotocore clients instead (one per event loop). `sync_twin`
gives the sync engine what serves an async `DynamoDBPersistenceLayer` in sync code.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

from aioidempotency._dynamodb_items import DynamoDBSettings, config_options, refused_in_child
from aioidempotency.exceptions import IdempotencyPersistenceConfigError

if TYPE_CHECKING:
    from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
    from aioidempotency._sync.store import SyncPersistenceLayer

__all__ = ["DynamoDBClients", "sync_twin"]

_HOLDERS: weakref.WeakSet[DynamoDBClients] = weakref.WeakSet()
_OPENING = threading.Lock()
"""Held while a client is created: boto3 sessions are not thread-safe, and one session
may be given to several layers."""


class DynamoDBClients:
    """The boto3 (or botocore) client of one layer.

    The client given (`settings.sync_client`) is used as it is and never closed.
    Otherwise one client is opened on first use, from `session` (a boto3 or botocore
    session; a new one when none was given) with `config()`, and shared by every
    thread of the process (botocore clients are thread-safe); a forked child opens
    its own. A layer given only an aiobotocore client or an aioboto3 session has no
    sync client: `get()` says what to pass.
    """

    def __init__(self, settings: DynamoDBSettings) -> None:
        self.settings = settings
        self.session: Any = settings.sync_session
        self._lock = threading.Lock()
        self._entry: tuple[int, Any] | None = None  # (pid, client), replaced whole
        _HOLDERS.add(self)

    def config(self, session: Any = None) -> Any:
        """The botocore `Config` of the client opened here: the bounded timeouts and
        retries under what `boto_config` sets explicitly (see `config_options`)."""
        from botocore.config import Config

        given, defaults = config_options(self.settings, session)
        user = self.settings.boto_config
        if user is None:
            return Config(**defaults)
        aio = sys.modules.get("aiobotocore.config")
        if aio is not None and isinstance(user, aio.AioConfig):
            user = Config(**given)  # its aiohttp options mean nothing to botocore
        return user.merge(Config(**defaults))

    def refusal(self) -> str | None:
        """Why sync code cannot use this layer (it was given only an aiobotocore
        client or an aioboto3 session), or None."""
        settings = self.settings
        if settings.sync_client is not None or self.session is not None:
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

    def _open(self) -> Any:
        session = self.session
        if session is None:
            try:
                import boto3.session  # type: ignore[import-untyped,unused-ignore]
            except ImportError:  # botocore alone serves as well
                import botocore.session

                session = self.session = botocore.session.get_session()
            else:
                session = self.session = boto3.session.Session()
        create = getattr(session, "client", None) or session.create_client
        with _OPENING:
            return create(
                "dynamodb",
                region_name=self.settings.region_name,
                endpoint_url=self.settings.endpoint_url,
                config=self.config(session),
            )

    def get(self) -> Any:
        """The client of this process (opened if needed)."""
        settings = self.settings
        if settings.sync_client is not None:
            if os.getpid() != settings.pid:
                raise refused_in_child(settings, "boto3_client= (or client=)")
            return settings.sync_client
        entry = self._entry
        if entry is not None and entry[0] == os.getpid():
            return entry[1]
        reason = self.refusal()
        if reason is not None:
            raise IdempotencyPersistenceConfigError(reason)
        with self._lock:
            entry = self._entry
            if entry is None or entry[0] != os.getpid():
                # a parent's client is left alone: its sockets are the parent's too
                entry = self._entry = (os.getpid(), self._open())
            return entry[1]

    def close(self) -> None:
        """Close the client opened here (a client given stays open)."""
        with self._lock:
            entry, self._entry = self._entry, None
        if entry is not None and entry[0] == os.getpid():
            entry[1].close()

    def _after_fork(self) -> None:
        # another thread may have held the lock when the process forked
        self._lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _OPENING
    _OPENING = threading.Lock()
    for holder in list(_HOLDERS):
        holder._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def sync_twin(store: DynamoDBPersistenceLayer) -> SyncPersistenceLayer:
    """What serves `store` in sync code.

    Its native twin, a `SyncDynamoDBPersistenceLayer` on the same settings (its own
    boto3 client, or the boto3 client or session `store` was given); a `BridgedStore`
    when `store` was given an aioboto3/aiobotocore session and no boto3 one (the layer
    opens its own client from that session on the bridge's loop), or is a subclass
    (its methods are async). An aiobotocore client with no boto3 client is refused
    with a `TypeError` that says what to pass: it belongs to the loop it was opened in.
    """
    from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
    from aioidempotency._sync.bridge import BridgedStore
    from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer

    settings = store.settings
    if settings.sync_client is None and settings.sync_session is None:
        if settings.async_client is not None:
            raise TypeError(DynamoDBClients(settings).refusal())
        if settings.async_session is not None:
            return BridgedStore(store)
    if type(store) is not DynamoDBPersistenceLayer:
        return BridgedStore(store)
    return SyncDynamoDBPersistenceLayer.from_settings(settings)
