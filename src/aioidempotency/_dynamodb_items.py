"""What the async and the sync DynamoDB stores share: settings, items, conditions, errors.

Nothing here sends a request. `aioidempotency._async.dynamodb` (and its generated twin
`aioidempotency._sync.dynamodb`) build on it; how a client of each kind is configured
and opened comes from ``dynamodb_client`` on each side, and the holders of the clients
from ``clients`` on each side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

try:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        NoRegionError,
        ReadTimeoutError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
except ImportError:  # pragma: no cover - depends on the installed extras
    # The stores import without the extra (so `from aioidempotency import *` works);
    # building one says what to install.
    MISSING_EXTRA: str | None = (
        "the DynamoDB store needs botocore: pip install 'aioidempotency[dynamodb]' "
        "(boto3 alone serves sync code)"
    )

    class _NotInstalled(Exception):
        """Stands in for botocore's exceptions, which nothing can raise here."""

    BotoCoreError = ClientError = HTTPClientError = _NotInstalled
    NoRegionError = ReadTimeoutError = BotoConnectionError = NoCredentialsError = _NotInstalled
else:
    MISSING_EXTRA = None

from aioidempotency._records import RecordAttributes, RecordStatus
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceLayerError,
    IdempotencyPersistenceMisconfiguredError,
)

__all__ = [
    "CLAIM_CONDITION",
    "CONDITION_FAILED",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_READ_TIMEOUT",
    "MAX_ITEM_BYTES",
    "MISSING_EXTRA",
    "OWNED_CONDITION",
    "TRANSPORT_ERRORS",
    "AttributeValue",
    "ClientError",
    "ConditionFailed",
    "DynamoDBSettings",
    "Item",
    "attr",
    "client_kind",
    "config_options",
    "error_code",
    "item_size",
    "lost",
    "owner_values",
    "parse_url",
    "passed_in_child",
    "plain",
    "raise_mapped",
    "session_kind",
    "settings",
]

MAX_ITEM_BYTES = 400 * 1024
"""DynamoDB's item size limit (attribute names plus values), in bytes."""

DEFAULT_CONNECT_TIMEOUT = 2.0
"""Seconds to open a connection, for clients a layer opens (botocore's is 60)."""
DEFAULT_READ_TIMEOUT = 3.0
"""Seconds to wait for a reply, for clients a layer opens (botocore's is 60)."""
DEFAULT_MAX_ATTEMPTS = 2
"""Attempts per request, the first included ("standard" retry mode), for clients a
layer opens when neither `boto_config` nor the AWS configuration (``AWS_MAX_ATTEMPTS``,
``max_attempts`` in the profile) sets one."""

CLAIM_CONDITION = (
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
"""The claim's condition: the key is free, expired or orphaned (and a usable record)."""
OWNED_CONDITION = "#owner = :owner AND #status = :inprogress"
"""The condition of completion, release and renewal: the caller's in-progress claim."""
CONDITION_FAILED = "ConditionalCheckFailedException"

TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, OSError, asyncio.TimeoutError)
"""What a request raises, besides `ClientError`, when it did not get an answer."""

_URL_OPTIONS = frozenset(
    {
        "key_attr",
        "static_pk_value",
        "sort_key_attr",
        "endpoint_url",
        *(field.name for field in dataclasses.fields(RecordAttributes)),
    }
)
_URL_NUMBERS = {"connect_timeout": float, "read_timeout": float, "max_attempts": int}
_TRANSIENT_CODES = frozenset({"InternalServerError", "ServiceUnavailable"})
#: Codes of requests refused for their credentials or signature, not their permissions.
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidClientTokenId",
        "MissingAuthenticationTokenException",
        "IncompleteSignature",
    }
)
_CHECK_HINT = "; `python -m aioidempotency check --store URL` (or `await store.check()`) says more"

#: DynamoDB's messages for a key that is not the table's ("The provided key element does
#: not match the schema", "One or more parameter values were invalid: Missing the key pk
#: in the item", "... Type mismatch for key ...").
_KEY_SCHEMA = re.compile(r"key element does not match the schema|Missing the key|mismatch for key")

_XML_CODE = re.compile(r"<Code>(\w+)</Code>")

AttributeValue = dict[str, Any]
Item = dict[str, AttributeValue]


class ConditionFailed(Exception):
    """A conditional write was refused; `old` is the stored item when it exists."""

    def __init__(self, old: Mapping[str, AttributeValue] | None) -> None:
        super().__init__(CONDITION_FAILED)
        self.old = old


# -- settings ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DynamoDBSettings:
    """Everything a DynamoDB layer was built with, checked; its sync twin is built from it.

    The clients and sessions given are sorted by kind: `async_client`/`async_session`
    (aiobotocore, aioboto3) serve the async layer, `sync_client`/`sync_session`
    (boto3, botocore) the sync one. `pid` is the process that built the settings:
    a client given is refused in any other (a forked child).
    """

    table_name: str
    key_attr: str
    sort_key_attr: str | None
    static_pk_value: str
    attributes: RecordAttributes
    region_name: str | None
    endpoint_url: str | None
    boto_config: Any
    connect_timeout: float
    read_timeout: float
    max_attempts: int | None
    async_client: Any = None
    sync_client: Any = None
    async_session: Any = None
    sync_session: Any = None
    pid: int = dataclasses.field(default_factory=os.getpid)


def _instance_of(value: Any, module: str, name: str) -> bool:
    """`isinstance(value, module.name)` if `module` is imported (else nothing of it exists)."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(value, cls)


def _async_client(client: Any) -> bool:
    return _instance_of(client, "aiobotocore.client", "AioBaseClient")


def _async_session(session: Any) -> bool:
    return _instance_of(session, "aiobotocore.session", "AioSession") or _instance_of(
        session, "aioboto3.session", "Session"
    )


def client_kind(client: Any) -> str:
    """``"sync"`` for a botocore/boto3 client, ``"async"`` for an aiobotocore one and for
    anything else (a client object of unknown kind is taken to be async, as before)."""
    if not _async_client(client) and _instance_of(client, "botocore.client", "BaseClient"):
        return "sync"
    return "async"


def session_kind(session: Any) -> str:
    """``"sync"`` for a boto3 or botocore session, ``"async"`` for an aioboto3 or
    aiobotocore one and for anything else."""
    if not _async_session(session) and (
        _instance_of(session, "boto3.session", "Session")
        or _instance_of(session, "botocore.session", "Session")
    ):
        return "sync"
    return "async"


def _sort_by_kind(what: str, given: Any, boto3_given: Any) -> tuple[Any, Any]:
    """(async, sync) from ``{what}=`` (either kind) and ``boto3_{what}=`` (sync only)."""
    kind = client_kind if what == "client" else session_kind
    async_one = sync_one = None
    if given is not None:
        if kind(given) == "sync":
            sync_one = given
        else:
            async_one = given
    if boto3_given is not None:
        if (_async_client if what == "client" else _async_session)(boto3_given):
            raise IdempotencyPersistenceConfigError(
                f"boto3_{what}= takes a boto3 {what}, not {type(boto3_given).__name__}; pass "
                f"an aiobotocore or aioboto3 {what} as {what}= instead"
            )
        if sync_one is not None:
            raise IdempotencyPersistenceConfigError(
                f"two boto3 {what}s given ({what}= and boto3_{what}=): pass one of them"
            )
        sync_one = boto3_given
    return async_one, sync_one


def settings(
    table_name: str,
    *,
    key_attr: str,
    static_pk_value: str | None,
    sort_key_attr: str | None,
    attributes: RecordAttributes,
    client: Any,
    session: Any,
    boto3_client: Any,
    boto3_session: Any,
    region_name: str | None,
    endpoint_url: str | None,
    boto_config: Any,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int | None,
) -> DynamoDBSettings:
    """Check a layer's constructor arguments (`IdempotencyPersistenceConfigError`)."""
    if MISSING_EXTRA is not None:  # pragma: no cover - depends on the installed extras
        raise ImportError(MISSING_EXTRA)
    if not table_name:
        raise IdempotencyPersistenceConfigError("table_name must not be empty")
    if sort_key_attr == key_attr:
        raise IdempotencyPersistenceConfigError(
            f"key_attr and sort_key_attr cannot be the same attribute: {key_attr!r}"
        )
    names = [key_attr, *([sort_key_attr] if sort_key_attr else []), *attributes.names()]
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
    async_client, sync_client = _sort_by_kind("client", client, boto3_client)
    async_session, sync_session = _sort_by_kind("session", session, boto3_session)
    return DynamoDBSettings(
        table_name=table_name,
        key_attr=key_attr,
        sort_key_attr=sort_key_attr,
        static_pk_value=(
            static_pk_value
            if static_pk_value is not None
            else f"idempotency#{os.environ.get('AWS_LAMBDA_FUNCTION_NAME', '')}"
        ),
        attributes=attributes,
        region_name=region_name,
        endpoint_url=endpoint_url,
        boto_config=boto_config,
        connect_timeout=float(connect_timeout),
        read_timeout=float(read_timeout),
        max_attempts=max_attempts,
        async_client=async_client,
        sync_client=sync_client,
        async_session=async_session,
        sync_session=sync_session,
    )


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """The table and the constructor's options of ``dynamodb://TABLE?region=..&..``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "dynamodb":
        raise IdempotencyPersistenceConfigError(f"not a dynamodb:// URL: {url!r}")
    table = unquote(parts.netloc or parts.path.lstrip("/"))
    if not table:
        raise IdempotencyPersistenceConfigError(f"no table name in {url!r}")
    options: dict[str, Any] = {"region_name": None}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in {"region", "region_name"}:
            options["region_name"] = value
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
    return table, options


def _configured(session: Any, name: str, env_name: str) -> Any:
    """A variable set in the AWS configuration `session` sees (environment first, then
    the profile), or None when unset (botocore's own default does not count)."""
    if os.environ.get(env_name):
        return os.environ[env_name]
    botocore_session = getattr(session, "_session", session)  # (aio)boto3 wraps botocore's
    try:
        scoped = botocore_session.get_scoped_config() if botocore_session is not None else {}
    except Exception:  # an unreadable profile: botocore reports it when the client opens
        return None
    return scoped.get(name) if isinstance(scoped, Mapping) else None


def config_options(
    settings: DynamoDBSettings, session: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options `boto_config` sets explicitly, and the bounded defaults under them.

    The defaults: the layer's timeouts, `max_attempts` (else the AWS configuration's
    of `session`, else `DEFAULT_MAX_ATTEMPTS`), the "standard" retry mode unless the
    AWS configuration sets one, and no client-side parameter validation: the layer's
    requests have fixed shapes, tested against DynamoDB's API, and validating them
    costs more client CPU than building them (a malformed one would still be refused
    by the server). Each side builds its client's config from the two.
    """
    given: dict[str, Any] = dict(getattr(settings.boto_config, "_user_provided_options", {}))
    defaults: dict[str, Any] = {}
    if "connect_timeout" not in given:
        defaults["connect_timeout"] = settings.connect_timeout
    if "read_timeout" not in given:
        defaults["read_timeout"] = settings.read_timeout
    if "parameter_validation" not in given:
        defaults["parameter_validation"] = False
    retries = dict(given.get("retries") or {})
    if not retries.keys() & {"max_attempts", "total_max_attempts"}:
        if settings.max_attempts is not None:
            retries["total_max_attempts"] = settings.max_attempts
        elif _configured(session, "max_attempts", "AWS_MAX_ATTEMPTS") is None:
            retries["total_max_attempts"] = DEFAULT_MAX_ATTEMPTS
    if "mode" not in retries and _configured(session, "retry_mode", "AWS_RETRY_MODE") is None:
        retries["mode"] = "standard"
    defaults["retries"] = retries
    return given, defaults


# -- items ---------------------------------------------------------------------------------


def attr(value: str | int) -> AttributeValue:
    """A string or integer as a low-level DynamoDB value (S or N)."""
    if isinstance(value, bool):
        raise TypeError(f"unexpected boolean attribute value {value!r}")
    return {"N": str(value)} if isinstance(value, int) else {"S": value}


def plain(value: Mapping[str, Any]) -> Any:
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


def _number_size(text: str) -> int:
    digits = text.lstrip("-").replace(".", "").strip("0") or "0"
    return (len(digits) + 1) // 2 + 1


def item_size(item: Mapping[str, AttributeValue]) -> int:
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


def owner_values(owner: str) -> dict[str, AttributeValue]:
    """The values of `OWNED_CONDITION` for `owner`."""
    return {":owner": {"S": owner}, ":inprogress": {"S": RecordStatus.INPROGRESS.value}}


# -- errors --------------------------------------------------------------------------------


def passed_in_child(given: str) -> str:
    """Why a client given to a layer (as `given`) is refused in a forked child (the
    `refusal` of its `PassedClient`)."""
    return (
        f"the DynamoDB client passed as {given} would share its connections with the "
        "parent in this forked child. Pass table_name= with session=, region_name=, "
        f"endpoint_url= or boto_config= instead of {given}, so that each process opens "
        "its own client, or build the layer after the fork"
    )


def lost(key: str, old: Mapping[str, AttributeValue] | None) -> IdempotencyClaimLostError:
    """The error of a completion or renewal whose claim is no longer the caller's."""
    what = "is gone" if old is None else "was taken over or completed"
    return IdempotencyClaimLostError(f"the claim on {key!r} {what}", key=key)


def error_code(exc: ClientError) -> str:
    """The service's error code of a `ClientError` (also when the reply was an XML error
    document botocore could not parse, whose code is then the HTTP status: moto's
    replies to refused credentials)."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code.isdigit():
        found = _XML_CODE.search(str(error.get("Message", "")))
        if found is not None:
            return found.group(1)
    return code


def raise_mapped(exc: BaseException, action: str, table: str) -> NoReturn:
    """Raise the typed error for a failed request, with the botocore error chained."""
    where = f"DynamoDB {action} on table {table!r}"
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code == "ResourceNotFoundException":
            raise IdempotencyPersistenceMisconfiguredError(
                f"{where}: the table does not exist (create it first: docs/dynamodb.md, "
                f"Table setup; or fix the table name, region or endpoint){_CHECK_HINT} [{code}]",
                exc,
            ) from exc
        if code in _CREDENTIAL_CODES:
            raise IdempotencyPersistenceAccessDeniedError(
                f"{where}: AWS refused the credentials (invalid, expired, or for another "
                f"account){_CHECK_HINT} [{code}]",
                exc,
            ) from exc
        if code in {"AccessDeniedException", "AccessDenied"}:
            raise IdempotencyPersistenceAccessDeniedError(
                f"{where}: access denied (the IAM policy lacks a permission: "
                f"docs/dynamodb.md, IAM){_CHECK_HINT} [{code}]",
                exc,
            ) from exc
        message = str(exc.response.get("Error", {}).get("Message", ""))
        if code == "ValidationException" and _KEY_SCHEMA.search(message):
            raise IdempotencyPersistenceMisconfiguredError(
                f"{where}: the table's key is not the layer's key_attr/sort_key_attr"
                f"{_CHECK_HINT} [{code}]",
                exc,
            ) from exc
        if code in {
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
    if isinstance(exc, NoCredentialsError):
        raise IdempotencyPersistenceAccessDeniedError(
            f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with a role)",
            exc,
        ) from exc
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
