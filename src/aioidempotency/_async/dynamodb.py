"""`DynamoDBPersistenceLayer`: records in a DynamoDB table, through aiobotocore.

The item layout and the claim condition are those of Powertools for AWS Lambda, so
both libraries can share one table. On top of it, every claim stores an owner token
(`owner_token`) and completion, release and renewal are conditional on it.

Requests per call: first execution 2 (claim, complete), replay 1 (the refused claim
returns the stored item), failure 2 (claim, release).

Every write is safe to repeat for its owner (botocore resends a request whose reply
was lost): a resent claim is refused and returns the caller's own item; the completed
item keeps the owner token, so a resent completion is recognised as done; release and
renewal are conditional on the owner and on the INPROGRESS status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

try:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
        NoRegionError,
        ReadTimeoutError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
except ImportError:  # pragma: no cover - depends on the installed extras
    # The module imports without the extra (so `from aioidempotency import *` works);
    # building a store says what to install.
    _MISSING_EXTRA: str | None = (
        "the DynamoDB store needs aioboto3: pip install 'aioidempotency[dynamodb]'"
    )

    class _NotInstalled(Exception):
        """Stands in for botocore's exceptions, which nothing can raise here."""

    BotoCoreError = ClientError = HTTPClientError = _NotInstalled
    NoRegionError = ReadTimeoutError = BotoConnectionError = _NotInstalled
else:
    _MISSING_EXTRA = None

from aioidempotency._async.store import ClaimResult, PersistenceLayer
from aioidempotency._records import DataRecord, RecordAttributes, RecordStatus
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
    IdempotencyResultTooLargeError,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_READ_TIMEOUT",
    "MAX_ITEM_BYTES",
    "DynamoDBPersistenceLayer",
    "create_idempotency_table",
]

MAX_ITEM_BYTES = 400 * 1024
"""DynamoDB's item size limit (attribute names plus values), in bytes."""

DEFAULT_CONNECT_TIMEOUT = 2.0
"""Seconds to open a connection, for clients this layer opens (botocore's is 60)."""
DEFAULT_READ_TIMEOUT = 3.0
"""Seconds to wait for a reply, for clients this layer opens (botocore's is 60)."""
DEFAULT_MAX_ATTEMPTS = 2
"""Attempts per request, the first included ("standard" retry mode), for clients this
layer opens when neither `boto_config` nor the AWS configuration (``AWS_MAX_ATTEMPTS``,
``max_attempts`` in the profile) sets one."""

_CLAIM_CONDITION = (
    "attribute_not_exists(#id) OR ("
    # only an item `RecordAttributes.from_mapping` accepts may be taken over: one it
    # refuses is never overwritten (the claim returns it and the reader raises). The
    # type checks come first: moto fails on comparing a string with a number, where
    # DynamoDB evaluates it as false.
    "(#status = :inprogress OR #status = :completed) "
    "AND attribute_type(#expiry, :number) "
    "AND (attribute_not_exists(#in_progress_expiry) "
    "OR attribute_type(#in_progress_expiry, :number)) "
    "AND (attribute_not_exists(#data) OR attribute_type(#data, :string)) "
    # the reference's condition: expired, or in progress past its in-progress expiry
    "AND (#expiry < :now OR (#status = :inprogress AND attribute_exists(#in_progress_expiry) "
    "AND #in_progress_expiry < :now_in_millis)))"
)
_OWNED_CONDITION = "#owner = :owner AND #status = :inprogress"
_CONDITION_FAILED = "ConditionalCheckFailedException"
_URL_OPTIONS = frozenset(
    {
        "key_attr",
        "static_pk_value",
        "sort_key_attr",
        "expiry_attr",
        "in_progress_expiry_attr",
        "status_attr",
        "data_attr",
        "validation_key_attr",
        "owner_attr",
        "endpoint_url",
    }
)
_URL_NUMBERS = {"connect_timeout": float, "read_timeout": float, "max_attempts": int}
_TRANSIENT_CODES = frozenset({"InternalServerError", "ServiceUnavailable"})

AttributeValue = dict[str, Any]
Item = dict[str, AttributeValue]


class _ConditionFailed(Exception):
    """A conditional write was refused; `old` is the stored item when it exists."""

    def __init__(self, old: Mapping[str, AttributeValue] | None) -> None:
        super().__init__(_CONDITION_FAILED)
        self.old = old


@dataclasses.dataclass(eq=False)
class _LoopClient:
    """The client this layer opened in one event loop, and the generator that owns it.

    The generator is an async generator on purpose: the loop registers it, so
    `asyncio.run` (through `loop.shutdown_asyncgens`) closes the client when the loop
    ends, even if nobody calls `aclose()`. `pid` tells a forked child that the entry
    (and its connections) belong to its parent.
    """

    loop: asyncio.AbstractEventLoop
    lifetime: Any  # AsyncGenerator[client, None]
    opening: asyncio.Task[Any]
    pid: int = dataclasses.field(default_factory=os.getpid)

    def usable(self) -> bool:
        if self.pid != os.getpid():
            return False
        if not self.opening.done():
            return True
        if self.opening.cancelled() or self.opening.exception() is not None:
            return False
        return self.lifetime.ag_frame is not None  # False once the generator finished


def _attr(value: str | int) -> AttributeValue:
    if isinstance(value, bool):
        raise TypeError(f"unexpected boolean attribute value {value!r}")
    return {"N": str(value)} if isinstance(value, int) else {"S": value}


def _plain(value: Mapping[str, Any]) -> Any:
    """A low-level DynamoDB value as Python: S as str, N as int (Decimal if fractional).

    Any other type (NULL, BOOL, B, maps, sets, lists) stays the low-level mapping, so
    `RecordAttributes.from_mapping` refuses it where it needs a string or a number, as
    the claim condition does.
    """
    if "S" in value:
        return value["S"]
    if "N" in value:
        text = str(value["N"])
        try:
            return int(text)
        except ValueError:
            return Decimal(text)
    return dict(value)


def _configured(session: Any, name: str, env_name: str) -> Any:
    """A variable set in the AWS configuration `session` sees (environment first, then
    the profile), or None when unset (botocore's own default does not count)."""
    if os.environ.get(env_name):
        return os.environ[env_name]
    botocore_session = getattr(session, "_session", session)  # aioboto3 wraps botocore's
    try:
        scoped = botocore_session.get_scoped_config() if botocore_session is not None else {}
    except Exception:  # an unreadable profile: botocore reports it when the client opens
        return None
    return scoped.get(name) if isinstance(scoped, Mapping) else None


def _number_size(text: str) -> int:
    digits = text.lstrip("-").replace(".", "").strip("0") or "0"
    return (len(digits) + 1) // 2 + 1


def _item_size(item: Mapping[str, AttributeValue]) -> int:
    """The size DynamoDB counts for an item of S and N attributes, in bytes."""
    size = 0
    for name, value in item.items():
        size += len(name.encode())
        if "S" in value:
            size += len(str(value["S"]).encode())
        elif "N" in value:
            size += _number_size(str(value["N"]))
        else:
            size += len(repr(value).encode())
    return size


def _lost(key: str, old: Mapping[str, AttributeValue] | None) -> IdempotencyClaimLostError:
    what = "is gone" if old is None else "was taken over or completed"
    return IdempotencyClaimLostError(f"the claim on {key!r} {what}", key=key)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _raise_mapped(exc: Exception, action: str, table: str) -> NoReturn:
    """Raise the typed error for a failed request, with the botocore error chained."""
    where = f"DynamoDB {action} on table {table!r}"
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code == "ResourceNotFoundException":
            reason = "the table does not exist (create it first, see create_table())"
        elif code in {"AccessDeniedException", "UnrecognizedClientException"}:
            reason = "access denied (check the credentials and the IAM policy)"
        elif code in {
            "ProvisionedThroughputExceededException",
            "ThrottlingException",
            "RequestLimitExceeded",
        }:
            reason = "throttled (the retries were exhausted)"
        elif code in _TRANSIENT_CODES:
            raise IdempotencyPersistenceConnectionError(
                f"{where}: the service is unavailable (the retries were exhausted) [{code}]",
                exc,
            ) from exc
        else:
            reason = "failed"
        raise IdempotencyPersistenceLayerError(f"{where}: {reason} [{code}]", exc) from exc
    if isinstance(exc, NoRegionError):
        raise IdempotencyPersistenceConfigError(
            f"{where}: no AWS region; set AWS_DEFAULT_REGION or pass region_name", exc
        ) from exc
    if isinstance(exc, (ReadTimeoutError, asyncio.TimeoutError)):
        raise IdempotencyPersistenceConnectionError(
            f"{where}: the endpoint did not answer in time (read_timeout)", exc
        ) from exc
    if isinstance(exc, (BotoConnectionError, HTTPClientError, OSError)):
        raise IdempotencyPersistenceConnectionError(
            f"{where}: the endpoint could not be reached", exc
        ) from exc
    raise IdempotencyPersistenceLayerError(f"{where}: failed", exc) from exc


class DynamoDBPersistenceLayer(PersistenceLayer):
    """Keeps records in a DynamoDB table, one item per idempotency key.

    The table's partition key is `key_attr` (a string). With `sort_key_attr` the table
    has a composite key: the partition key holds `static_pk_value` (default
    ``idempotency#{AWS_LAMBDA_FUNCTION_NAME}``) and the sort key holds the idempotency
    key, so many functions can share a table. Attribute names default to the
    reference's; `owner_attr` names the owner token that in-progress items carry.

    Without `client`, an aiobotocore client is opened lazily (from `session`,
    `region_name`, `endpoint_url` and `boto_config`; the region otherwise comes from
    the environment) in the running event loop and reused; a call from another loop
    or a forked child gets its own client. `aclose()` closes them. Such clients fail
    fast: `connect_timeout` and `read_timeout` (seconds) and `max_attempts` (per
    request, "standard" retries) default to the ``DEFAULT_*`` constants; what
    `boto_config` sets explicitly wins. A `client` given here is used as it is (its
    own timeouts and retries), never closed, and refused in a forked child.
    """


    def __init__(
        self,
        table_name: str,
        *,
        key_attr: str = "id",
        static_pk_value: str | None = None,
        sort_key_attr: str | None = None,
        expiry_attr: str = "expiration",
        in_progress_expiry_attr: str = "in_progress_expiration",
        status_attr: str = "status",
        data_attr: str = "data",
        validation_key_attr: str = "validation",
        owner_attr: str = "owner_token",
        client: Any = None,
        session: Any = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        boto_config: Any = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_attempts: int | None = None,
    ) -> None:
        if _MISSING_EXTRA is not None:  # pragma: no cover - depends on the installed extras
            raise ImportError(_MISSING_EXTRA)
        if not table_name:
            raise IdempotencyPersistenceConfigError("table_name must not be empty")
        if sort_key_attr == key_attr:
            raise IdempotencyPersistenceConfigError(
                f"key_attr and sort_key_attr cannot be the same attribute: {key_attr!r}"
            )
        names = [
            key_attr,
            *([sort_key_attr] if sort_key_attr else []),
            expiry_attr,
            in_progress_expiry_attr,
            status_attr,
            data_attr,
            validation_key_attr,
            owner_attr,
        ]
        if len(set(names)) != len(names) or not all(names):
            raise IdempotencyPersistenceConfigError(
                f"attribute names must be distinct and not empty: {names}"
            )
        if not (connect_timeout > 0 and read_timeout > 0):
            raise IdempotencyPersistenceConfigError(
                "connect_timeout and read_timeout must be positive: "
                f"{connect_timeout!r}, {read_timeout!r}"
            )
        if max_attempts is not None and (isinstance(max_attempts, bool) or max_attempts < 1):
            raise IdempotencyPersistenceConfigError(
                f"max_attempts must be at least 1: {max_attempts!r}"
            )
        self.table_name = table_name
        self.key_attr = key_attr
        self.sort_key_attr = sort_key_attr
        self.static_pk_value = (
            static_pk_value
            if static_pk_value is not None
            else f"idempotency#{os.environ.get('AWS_LAMBDA_FUNCTION_NAME', '')}"
        )
        self.attributes = RecordAttributes(
            status_attr=status_attr,
            expiry_attr=expiry_attr,
            in_progress_expiry_attr=in_progress_expiry_attr,
            data_attr=data_attr,
            validation_key_attr=validation_key_attr,
            owner_attr=owner_attr,
        )
        self.region_name = region_name
        self.endpoint_url = endpoint_url
        self.boto_config = boto_config
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.max_attempts = max_attempts
        self._user_client = client
        self._user_client_pid = os.getpid()
        self._session = session
        self._clients: dict[asyncio.AbstractEventLoop, _LoopClient] = {}
        self._clients_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> DynamoDBPersistenceLayer:
        """Build a layer from ``dynamodb://TABLE?region=..&endpoint_url=..``.

        Other query parameters set the constructor's options by name: the attribute
        names (``key_attr``, ``sort_key_attr``, ``static_pk_value``, ...) and
        ``connect_timeout``, ``read_timeout`` (seconds) and ``max_attempts``.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != "dynamodb":
            raise IdempotencyPersistenceConfigError(f"not a dynamodb:// URL: {url!r}")
        table = unquote(parts.netloc or parts.path.lstrip("/"))
        if not table:
            raise IdempotencyPersistenceConfigError(f"no table name in {url!r}")
        options: dict[str, Any] = {}
        region: str | None = None
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in {"region", "region_name"}:
                region = value
            elif name in _URL_OPTIONS:
                options[name] = value
            elif name in _URL_NUMBERS:
                try:
                    options[name] = _URL_NUMBERS[name](value)
                except ValueError:
                    raise IdempotencyPersistenceConfigError(
                        f"option {name!r} in {url!r} is not a number: {value!r}"
                    ) from None
            else:
                raise IdempotencyPersistenceConfigError(
                    f"unknown option {name!r} in {url!r}; known: "
                    f"{sorted(_URL_OPTIONS | _URL_NUMBERS.keys() | {'region'})}"
                )
        return cls(table, region_name=region, **options)

    # -- the client ------------------------------------------------------------------

    def _client_context(self) -> Any:
        session = self._session
        if session is None:
            from aiobotocore.session import AioSession

            session = self._session = AioSession()
        create = getattr(session, "client", None) or session.create_client
        return create(
            "dynamodb",
            region_name=self.region_name,
            endpoint_url=self.endpoint_url,
            config=self.client_config(session),
        )

    def client_config(self, session: Any = None) -> Any:
        """The `AioConfig` of the clients this layer opens: the bounded timeouts and
        retries under what `boto_config` sets explicitly (its values win). The attempts
        and retry mode of the AWS configuration (``AWS_MAX_ATTEMPTS``,
        ``AWS_RETRY_MODE``, the profile) of `session` win over the defaults too."""
        from aiobotocore.config import AioConfig

        given: dict[str, Any] = dict(getattr(self.boto_config, "_user_provided_options", {}))
        defaults: dict[str, Any] = {}
        if "connect_timeout" not in given:
            defaults["connect_timeout"] = self.connect_timeout
        if "read_timeout" not in given:
            defaults["read_timeout"] = self.read_timeout
        retries = dict(given.get("retries") or {})
        if not retries.keys() & {"max_attempts", "total_max_attempts"}:
            if self.max_attempts is not None:
                retries["total_max_attempts"] = self.max_attempts
            elif _configured(session, "max_attempts", "AWS_MAX_ATTEMPTS") is None:
                retries["total_max_attempts"] = DEFAULT_MAX_ATTEMPTS
        if "mode" not in retries and _configured(session, "retry_mode", "AWS_RETRY_MODE") is None:
            retries["mode"] = "standard"
        defaults["retries"] = retries
        user = self.boto_config
        if user is None:
            return AioConfig(**defaults)
        if not isinstance(user, AioConfig):  # a botocore Config: keep its options
            user = AioConfig(**given)
        return user.merge(AioConfig(**defaults))

    async def _client_lifetime(self) -> AsyncIterator[Any]:
        async with self._client_context() as client:
            yield client

    @staticmethod
    async def _first(lifetime: Any) -> Any:
        return await lifetime.__anext__()

    async def client(self) -> Any:
        """The aiobotocore DynamoDB client for the running loop (opened if needed)."""
        if self._user_client is not None:
            if os.getpid() != self._user_client_pid:
                raise IdempotencyPersistenceConfigError(
                    f"the DynamoDB client passed as client= was created in process "
                    f"{self._user_client_pid}; this forked child ({os.getpid()}) would share "
                    "its connections with the parent. Pass table_name= with session=, "
                    "region_name=, endpoint_url= or boto_config= instead of client=, so "
                    "that each process opens its own client, or build the layer after "
                    "the fork"
                )
            return self._user_client
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            entry = self._clients.get(loop)
            if entry is None or not entry.usable():
                for old, stale in list(self._clients.items()):
                    if old.is_closed() or stale.pid != os.getpid():
                        del self._clients[old]
                lifetime = self._client_lifetime()
                entry = _LoopClient(loop, lifetime, loop.create_task(self._first(lifetime)))
                self._clients[loop] = entry
        return await asyncio.shield(entry.opening)

    @staticmethod
    async def _close_entry(entry: _LoopClient) -> None:
        if not entry.opening.done():
            entry.opening.cancel()
        await asyncio.gather(entry.opening, return_exceptions=True)
        await entry.lifetime.aclose()

    async def aclose(self) -> None:
        """Close the clients this layer opened (a client given to it stays open).

        A client opened in another, still running loop is closed in that loop; one
        whose loop has ended was closed when the loop shut down.
        """
        with self._clients_lock:
            entries = list(self._clients.values())
            self._clients.clear()
        loop = asyncio.get_running_loop()
        for entry in entries:
            if entry.pid != os.getpid():
                continue  # inherited from the parent process: its connections are not ours
            if entry.loop is loop:
                await self._close_entry(entry)
            elif entry.loop.is_running():
                future = asyncio.run_coroutine_threadsafe(self._close_entry(entry), entry.loop)
                await asyncio.wait_for(asyncio.wrap_future(future), timeout=10)

    # -- requests --------------------------------------------------------------------

    async def _call(self, operation: str, action: str, **params: Any) -> dict[str, Any]:
        """One request; `_ConditionFailed` on a refused condition, typed errors otherwise."""
        try:
            client = await self.client()
            method = getattr(client, operation)
            response: dict[str, Any] = await method(TableName=self.table_name, **params)
        except ClientError as exc:
            if _error_code(exc) == _CONDITION_FAILED:
                raise _ConditionFailed(exc.response.get("Item")) from exc
            _raise_mapped(exc, action, self.table_name)
        except IdempotencyError:
            raise
        except (BotoCoreError, OSError, asyncio.TimeoutError) as exc:
            _raise_mapped(exc, action, self.table_name)
        return response

    def _key(self, idempotency_key: str) -> Item:
        if self.sort_key_attr is None:
            return {self.key_attr: {"S": idempotency_key}}
        return {
            self.key_attr: {"S": self.static_pk_value},
            self.sort_key_attr: {"S": idempotency_key},
        }

    def _item(self, record: DataRecord) -> Item:
        item = self._key(record.idempotency_key)
        for name, value in self.attributes.to_mapping(record).items():
            if value is not None:
                item[name] = _attr(value)
        return item

    def _record(self, key: str, item: Mapping[str, AttributeValue]) -> DataRecord:
        return self.attributes.from_mapping(
            key, {name: _plain(value) for name, value in item.items()}
        )

    def _owner_values(self, owner: str) -> dict[str, AttributeValue]:
        return {":owner": {"S": owner}, ":inprogress": {"S": RecordStatus.INPROGRESS.value}}

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        """One conditional PutItem; a refused claim returns the stored item (ALL_OLD)."""
        attrs = self.attributes
        try:
            await self._call(
                "put_item",
                "claim",
                Item=self._item(record),
                ConditionExpression=_CLAIM_CONDITION,
                ExpressionAttributeNames={
                    "#id": self.key_attr,
                    "#expiry": attrs.expiry_attr,
                    "#in_progress_expiry": attrs.in_progress_expiry_attr,
                    "#status": attrs.status_attr,
                    "#data": attrs.data_attr,
                },
                ExpressionAttributeValues={
                    ":now": {"N": str(int(now))},
                    ":now_in_millis": {"N": str(int(now * 1000))},
                    ":inprogress": {"S": RecordStatus.INPROGRESS.value},
                    ":completed": {"S": RecordStatus.COMPLETED.value},
                    ":number": {"S": "N"},
                    ":string": {"S": "S"},
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except _ConditionFailed as refused:
            if refused.old is None:
                return ClaimResult(claimed=False)
            return ClaimResult(
                claimed=False, existing=self._record(record.idempotency_key, refused.old)
            )
        return ClaimResult(claimed=True)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        """A strongly consistent GetItem; None when absent or expired at `now`."""
        response = await self._call("get_item", "get", Key=self._key(key), ConsistentRead=True)
        item = response.get("Item")
        if item is None:
            return None
        record = self._record(key, item)
        return None if record.is_expired(time.time() if now is None else now) else record

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        """One UpdateItem conditional on `owner`; checks the 400 KB limit first.

        The completed item keeps the owner token, so a completion resent after a lost
        reply finds its own COMPLETED item and succeeds.
        """
        attrs = self.attributes
        final = self._item(record)
        final[attrs.owner_attr] = {"S": owner}
        size = _item_size(final)
        if size > MAX_ITEM_BYTES:
            raise IdempotencyResultTooLargeError(
                f"the record of {record.idempotency_key!r} would be {size} bytes, over "
                f"DynamoDB's item limit of {MAX_ITEM_BYTES} bytes",
                size=size,
                limit=MAX_ITEM_BYTES,
            )
        names = {"#owner": attrs.owner_attr, "#status": attrs.status_attr}
        values = self._owner_values(owner)
        key_names = {self.key_attr, self.sort_key_attr}
        sets: list[str] = []
        for index, name in enumerate(n for n in final if n not in key_names):
            names[f"#a{index}"] = name
            values[f":a{index}"] = final[name]
            sets.append(f"#a{index} = :a{index}")
        update = f"SET {', '.join(sets)}"
        if attrs.in_progress_expiry_attr not in final:
            names["#in_progress_expiry"] = attrs.in_progress_expiry_attr
            update += " REMOVE #in_progress_expiry"
        try:
            await self._call(
                "update_item",
                "complete",
                Key=self._key(record.idempotency_key),
                UpdateExpression=update,
                ConditionExpression=_OWNED_CONDITION,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except _ConditionFailed as refused:
            if self._completed_by(refused.old, owner):
                return  # our own completion, resent after its reply was lost
            raise _lost(record.idempotency_key, refused.old) from None
        except IdempotencyPersistenceLayerError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and "size" in str(cause).lower():
                raise IdempotencyResultTooLargeError(
                    f"DynamoDB refused the record of {record.idempotency_key!r} as too large",
                    cause,
                    size=size,
                    limit=MAX_ITEM_BYTES,
                ) from cause
            raise

    def _completed_by(self, old: Mapping[str, AttributeValue] | None, owner: str) -> bool:
        attrs = self.attributes
        return (
            old is not None
            and old.get(attrs.owner_attr) == {"S": owner}
            and old.get(attrs.status_attr) == {"S": RecordStatus.COMPLETED.value}
        )

    async def release(self, key: str, *, owner: str) -> None:
        """One DeleteItem of `owner`'s in-progress item; anything else is left alone
        (another owner's claim, a completed item even of this owner, no item)."""
        try:
            await self._call(
                "delete_item",
                "release",
                Key=self._key(key),
                ConditionExpression=_OWNED_CONDITION,
                ExpressionAttributeNames={
                    "#owner": self.attributes.owner_attr,
                    "#status": self.attributes.status_attr,
                },
                ExpressionAttributeValues=self._owner_values(owner),
            )
        except _ConditionFailed:
            return

    async def renew(self, record: DataRecord) -> None:
        """One UpdateItem of the in-progress expiry to `record`'s, conditional on
        `record.owner` still holding the item in progress."""
        key, owner = record.idempotency_key, record.owner
        in_progress_expiry_ms = record.in_progress_expiry_timestamp
        if owner is None or in_progress_expiry_ms is None:
            raise ValueError(f"renew needs an owner and an in-progress expiry: {record!r}")
        attrs = self.attributes
        values = self._owner_values(owner)
        values[":until"] = {"N": str(in_progress_expiry_ms)}
        try:
            await self._call(
                "update_item",
                "renew",
                Key=self._key(key),
                UpdateExpression="SET #in_progress_expiry = :until",
                ConditionExpression=_OWNED_CONDITION,
                ExpressionAttributeNames={
                    "#owner": attrs.owner_attr,
                    "#status": attrs.status_attr,
                    "#in_progress_expiry": attrs.in_progress_expiry_attr,
                },
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except _ConditionFailed as refused:
            raise _lost(key, refused.old) from None

    async def delete(self, key: str) -> bool:
        """An unconditional DeleteItem; True when an item was deleted."""
        response = await self._call(
            "delete_item", "delete", Key=self._key(key), ReturnValues="ALL_OLD"
        )
        return bool(response.get("Attributes"))

    async def create_table(self, *, exist_ok: bool = True) -> bool:
        """Create this layer's table (key schema, on-demand, TTL on the expiry attribute).

        For development and tests; the layer never creates tables by itself. Returns
        False when the table already existed (and `exist_ok`).
        """
        try:
            return await create_idempotency_table(
                await self.client(),
                self.table_name,
                key_attr=self.key_attr,
                sort_key_attr=self.sort_key_attr,
                ttl_attr=self.attributes.expiry_attr,
                exist_ok=exist_ok,
            )
        except IdempotencyError:
            raise
        except (BotoCoreError, OSError, asyncio.TimeoutError) as exc:
            _raise_mapped(exc, "create table", self.table_name)


async def create_idempotency_table(
    client: Any,
    table_name: str,
    *,
    key_attr: str = "id",
    sort_key_attr: str | None = None,
    ttl_attr: str = "expiration",
    exist_ok: bool = True,
) -> bool:
    """Create an on-demand idempotency table with TTL on `ttl_attr`; wait until active.

    `client` is an aiobotocore DynamoDB client. Returns False (and changes nothing)
    when the table exists and `exist_ok`; raises `IdempotencyPersistenceLayerError`
    for any other failure.
    """
    schema = [{"AttributeName": key_attr, "KeyType": "HASH"}]
    definitions = [{"AttributeName": key_attr, "AttributeType": "S"}]
    if sort_key_attr is not None:
        schema.append({"AttributeName": sort_key_attr, "KeyType": "RANGE"})
        definitions.append({"AttributeName": sort_key_attr, "AttributeType": "S"})
    try:
        await client.create_table(
            TableName=table_name,
            KeySchema=schema,
            AttributeDefinitions=definitions,
            BillingMode="PAY_PER_REQUEST",
        )
    except ClientError as exc:
        if exist_ok and _error_code(exc) == "ResourceInUseException":
            return False
        _raise_mapped(exc, "create table", table_name)
    try:
        waiter = client.get_waiter("table_exists")
        await waiter.wait(TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 300})
        await client.update_time_to_live(
            TableName=table_name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl_attr},
        )
    except (ClientError, BotoCoreError) as exc:
        _raise_mapped(exc, "create table", table_name)
    return True
