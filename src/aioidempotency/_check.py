"""What `store.check()` finds: a report of problems, each with what is wrong and its fix.

Shared by both worlds. The stores (``_async/cache.py``, ``_async/dynamodb.py`` and their
generated twins) ask their servers; this module turns what they found, and the errors
they met, into `StoreProblem`s. Nothing here sends a request.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from aioidempotency._cache_errors import DENIED, TRANSIENT, classify
from aioidempotency._lua import LuaScript
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyError,
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceLayerError,
    IdempotencyStoreCheckError,
)

__all__ = [
    "CHECK_SCRIPT",
    "MIN_SERVER_VERSION",
    "PROBE_PREFIX",
    "ProbeFailed",
    "ProblemKind",
    "StoreCheckReport",
    "StoreProblem",
    "cache_problem",
    "cluster_problem",
    "dynamodb_problem",
    "key_schema_problem",
    "parse_info",
    "probe_records",
    "script_problems",
    "server_mode",
    "server_name",
    "store_problem",
    "table_status_problem",
    "ttl_problem",
    "version_problem",
]

ProblemKind = Literal[
    "unreachable",
    "authentication",
    "permission",
    "server-version",
    "scripts",
    "cluster-mode",
    "table-missing",
    "table-status",
    "key-schema",
    "ttl",
    "client",
    "store-error",
]
"""What a problem is about (``StoreProblem.kind``)."""


@dataclasses.dataclass(frozen=True)
class StoreProblem:
    """One thing `check()` found wrong: its `kind`, what is wrong (`message`) and what
    to do (`fix`). `transient` is True when it may clear by itself (the store could
    not be reached, a table still being created)."""

    kind: ProblemKind
    message: str
    fix: str
    transient: bool = False

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}\n    fix: {self.fix}"


@dataclasses.dataclass(frozen=True)
class StoreCheckReport:
    """What `store.check()` found: the store checked, the facts it learned (server
    version, table key, ...) and the `problems`, each with its fix. `ok` is True when
    there are none; `raise_for_problems()` raises them."""

    store: str
    problems: tuple[StoreProblem, ...] = ()
    facts: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise `IdempotencyStoreCheckError` (an `IdempotencyPersistenceConfigError`)
        listing every problem, with this report as its `report`; do nothing when `ok`."""
        if self.problems:
            listed = "; ".join(f"[{p.kind}] {p.message} (fix: {p.fix})" for p in self.problems)
            raise IdempotencyStoreCheckError(
                f"{self.store}: {len(self.problems)} problem(s): {listed}", report=self
            )

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``check --json`` prints)."""
        return {
            "store": self.store,
            "ok": self.ok,
            "facts": dict(self.facts),
            "problems": [dataclasses.asdict(problem) for problem in self.problems],
        }

    def __str__(self) -> str:
        lines = [f"store: {self.store}"]
        lines += [f"  {name}: {value}" for name, value in self.facts]
        if not self.problems:
            lines.append("no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {index}. {problem}" for index, problem in enumerate(self.problems, 1)]
        return "\n".join(lines)


# -- the probe ---------------------------------------------------------------------------

PROBE_PREFIX = "aioidempotency-check#"
"""Keys `check()` writes (and deletes) to prove the store's operations work."""
_PROBE_SECONDS = 60


class ProbeFailed(Exception):
    """A probe step answered, but not as the contract says (`step` names it)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


def probe_records(now: float | None = None) -> tuple[DataRecord, DataRecord, DataRecord]:
    """A fresh probe key's in-progress claim, its renewed copy and its completed record,
    all expiring within a minute (so a probe cut short cleans up after itself)."""
    now = time.time() if now is None else now
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    expiry = int(now) + _PROBE_SECONDS
    claim = DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=expiry,
        in_progress_expiry_timestamp=int(now + _PROBE_SECONDS / 2) * 1000,
        owner=uuid.uuid4().hex,
    )
    renewed = dataclasses.replace(claim, in_progress_expiry_timestamp=(expiry - 1) * 1000)
    done = DataRecord(
        idempotency_key=key,
        status=RecordStatus.COMPLETED,
        expiry_timestamp=expiry,
        response_data='"check"',
    )
    return claim, renewed, done


# -- any store -----------------------------------------------------------------------------


def store_problem(exc: BaseException, step: str = "") -> StoreProblem:
    """A problem for an error any store raised during `step` (judged by its class)."""
    where = f" during {step}" if step else ""
    if isinstance(exc, ProbeFailed):
        return StoreProblem(
            "store-error",
            f"the store answered {exc.step} of a probe record wrongly: {exc}",
            "check the store's implementation against the PersistenceLayer contract",
        )
    if isinstance(exc, IdempotencyPersistenceAccessDeniedError):
        return StoreProblem(
            "permission", f"the store refused access{where}: {exc}", "fix the credentials"
        )
    if isinstance(exc, IdempotencyPersistenceLayerError) and exc.transient:
        return StoreProblem(
            "unreachable",
            f"the store could not be reached{where}: {exc}",
            "check that the store runs and that this process can reach it",
            transient=True,
        )
    if isinstance(exc, IdempotencyPersistenceConfigError):
        return StoreProblem("client", f"the store is misconfigured{where}: {exc}", _read_message)
    return StoreProblem(
        "store-error",
        f"the store failed{where}: {type(exc).__name__}: {exc}",
        "see the error; docs/troubleshooting.md lists each error with its fix",
    )


_read_message = "follow the error's message; docs/troubleshooting.md lists each error"


def _cause(exc: BaseException) -> BaseException:
    """The client's error behind one of ours (the innermost cause of our own errors)."""
    while isinstance(exc, IdempotencyError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


# -- Redis and Valkey --------------------------------------------------------------------------

MIN_SERVER_VERSION = (6, 2)
"""The oldest Redis/Valkey the store runs on: records are written with ``SET ... EXAT``
(Redis 6.2), by the scripts and by the protocol path alike; renewal uses ``KEEPTTL``."""

# Each command the scripts run inside the server, tried on the probe key: ACLs apply to
# them one by one, and a script that may not run STRLEN takes the record for another
# Redis type. Returns {command, error} pairs for the refused ones. ARGV: an epoch-second
# expiry in the next minute.
CHECK_SCRIPT = LuaScript(
    """
local key = KEYS[1]
local refused = {}
local function try(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply['err'] then
    table.insert(refused, (select(1, ...)))
    table.insert(refused, reply['err'])
  end
end
try('SET', key, 'check', 'EXAT', ARGV[1])
try('SET', key, 'check', 'KEEPTTL')
try('TIME')
try('GET', key)
try('STRLEN', key)
try('GETRANGE', key, 0, 1)
try('EXISTS', key)
try('TYPE', key)
try('DEL', key)
return refused
"""
)

_ATOMIC_COMMANDS = (
    "+evalsha +eval +get +set +del +strlen +getrange +exists +type +time",
    "the atomic path: SET (its claim), EVALSHA/EVAL, and inside its scripts GET, SET, DEL, STRLEN, "
    "GETRANGE, EXISTS, TYPE and TIME",
)
_PROTOCOL_COMMANDS = ("+get +set +del", "the protocol path: GET, SET and DEL")
_AUTH_REPLY = re.compile(r"WRONGPASS|NOAUTH|invalid username-password|auth", re.IGNORECASE)
_SCRIPT_REPLY = re.compile(
    r"unknown command|NOSCRIPT|script|syntax error|not allowed|disabled", re.IGNORECASE
)
_CLUSTER_OFF_REPLY = re.compile(
    r"cluster mode is not enabled|cluster support disabled|no topology views", re.IGNORECASE
)


def _acl_fix(user: str | None, atomic: bool, glide: bool, wait: bool) -> str:
    commands, _ = _ATOMIC_COMMANDS if atomic else _PROTOCOL_COMMANDS
    if glide:
        commands = "+@connection +info " + commands  # glide runs INFO when it connects
    if wait:
        commands += " +wait"
    return (
        f"ACL SETUSER {user or 'default'} {commands} (the commands of "
        f"{(_ATOMIC_COMMANDS if atomic else _PROTOCOL_COMMANDS)[1]}; on the keys the "
        "service uses, e.g. ~* or ~prefix*; see docs/redis-valkey.md, Permissions)"
    )


def cache_problem(
    exc: BaseException,
    *,
    where: str,
    user: str | None,
    atomic: bool,
    glide: bool,
    cluster: bool | None,
    wait: bool = False,
    step: str = "",
) -> StoreProblem:
    """A problem for an error a Redis/Valkey store met during `step` at `where`."""
    if isinstance(exc, ProbeFailed):
        return store_problem(exc)
    cause = _cause(exc)
    text = _text(cause)
    doing = f" during {step}" if step else ""
    if isinstance(exc, IdempotencyClaimLostError):
        return StoreProblem(
            "permission",
            f"the store's scripts lost the probe's own claim{doing}: {text}. A user that may "
            "not run STRLEN inside scripts makes them see another Redis type",
            _acl_fix(user, atomic, glide, wait),
        )
    kind = classify(cause)
    if kind == DENIED:
        if _AUTH_REPLY.search(text) and "permission" not in text.lower():
            return StoreProblem(
                "authentication",
                f"{where} refused the login of user {user or 'default'!r}: {text}",
                "put the right user and password in the URL (redis://USER:PASSWORD@host:port, "
                "or redis://:PASSWORD@host:port for a server with requirepass only), or pass "
                "username= and password=",
            )
        return StoreProblem(
            "permission",
            f"{where} refused a command of user {user or 'default'!r}{doing}: {text}",
            _acl_fix(user, atomic, glide, wait),
        )
    if _CLUSTER_OFF_REPLY.search(text) and cluster:
        return cluster_problem(where, server_cluster=False) or store_problem(exc, step)
    moved = type(cause).__name__ == "MovedError" or re.search(r"\bMOVED\b|\bmoved:", text, re.I)
    if moved and cluster is False:
        return cluster_problem(where, server_cluster=True) or store_problem(exc, step)
    if kind == TRANSIENT:
        return StoreProblem(
            "unreachable",
            f"{where} could not be reached{doing}: {text}",
            "check the host and port, that the server runs, TLS (rediss:// or valkeys:// "
            "for a server that requires TLS, redis:// for one that does not), and the "
            "network path (security groups, VPC); raise timeout= if the server is slow",
            transient=True,
        )
    if atomic and _SCRIPT_REPLY.search(text):
        return StoreProblem(
            "scripts",
            f"{where} refused the store's Lua scripts{doing}: {text}",
            "enable scripting on the server (some managed services turn EVAL off), or "
            "build the layer with atomic=false (the protocol path, which needs GET, SET "
            "and DEL only; see docs/redis-valkey.md, The two paths)",
        )
    if isinstance(exc, IdempotencyPersistenceConfigError):
        return StoreProblem("client", f"{text}", _read_message)
    return StoreProblem(
        "store-error",
        f"{where} failed{doing}: {type(cause).__name__}: {text}",
        "see the error; docs/troubleshooting.md lists each error with its fix",
    )


def parse_info(reply: Any) -> dict[str, str]:
    """``INFO``'s reply as a mapping of its fields (a client's parsed dict, or its text)."""
    if isinstance(reply, Mapping):
        return {str(name): str(value) for name, value in reply.items()}
    if isinstance(reply, bytes):
        reply = reply.decode(errors="replace")
    fields: dict[str, str] = {}
    for line in str(reply).splitlines():
        name, sep, value = line.strip().partition(":")
        if sep and not name.startswith("#"):
            fields[name] = value
    return fields


def server_name(info: Mapping[str, str]) -> str:
    """``Redis 7.0.15`` or ``Valkey 9.1.2`` (Valkey also reports a Redis version)."""
    if "valkey_version" in info or info.get("server_name") == "valkey":
        return f"Valkey {info.get('valkey_version', info.get('redis_version', '?'))}"
    return f"Redis {info.get('redis_version', '?')}"


def server_mode(info: Mapping[str, str]) -> str:
    """``standalone`` or ``cluster`` (Redis says ``redis_mode``, Valkey ``server_mode``)."""
    return info.get("redis_mode") or info.get("server_mode") or "standalone"


def _version(text: str) -> tuple[int, ...] | None:
    parts = re.findall(r"\d+", text)
    return tuple(int(part) for part in parts[:3]) if parts else None


def version_problem(info: Mapping[str, str], where: str) -> StoreProblem | None:
    """A problem when the server is older than `MIN_SERVER_VERSION` (Valkey's reported
    Redis version counts: every Valkey is a Redis 7.2 or later)."""
    version = _version(info.get("redis_version", ""))
    if version is None or version[:2] >= MIN_SERVER_VERSION:
        return None
    return StoreProblem(
        "server-version",
        f"{where} runs {server_name(info)}, older than 6.2: the store writes records "
        "with SET ... EXAT (and renews them with KEEPTTL), which it does not know",
        "upgrade to Redis 6.2 or later, or to Valkey (ElastiCache: engine version 6.2 or later)",
    )


def cluster_problem(where: str, *, server_cluster: bool) -> StoreProblem:
    """The problem of a layer whose cluster mode is not the server's."""
    if server_cluster:
        return StoreProblem(
            "cluster-mode",
            f"{where} runs in cluster mode, but the layer connects to it as a standalone "
            "server: keys held by the other nodes fail with MOVED",
            "add cluster=true to the URL (or pass mode='cluster'); for ElastiCache, use the "
            "configuration endpoint",
        )
    return StoreProblem(
        "cluster-mode",
        f"{where} is not a cluster node, but the layer connects in cluster mode",
        "remove cluster=true from the URL (or pass mode='standalone')",
    )


def script_problems(
    reply: Sequence[Any],
    *,
    where: str,
    user: str | None,
    glide: bool,
    wait: bool,
) -> list[StoreProblem]:
    """The problems `CHECK_SCRIPT`'s reply shows: commands refused inside scripts."""
    pairs = [
        (_decoded(reply[index]).upper(), _decoded(reply[index + 1]))
        for index in range(0, len(reply) - 1, 2)
    ]
    denied = [name for name, error in pairs if classify(Exception(error)) == DENIED or _acl(error)]
    problems: list[StoreProblem] = []
    if denied:
        problems.append(
            StoreProblem(
                "permission",
                f"{where} refuses user {user or 'default'!r} the commands "
                f"{', '.join(denied)} inside scripts; the store's scripts need them "
                "(without STRLEN a record looks like another Redis type)",
                _acl_fix(user, True, glide, wait),
            )
        )
    failed = [f"{name}: {error}" for name, error in pairs if name not in denied]
    if failed:
        problems.append(
            StoreProblem(
                "scripts",
                f"{where} refused commands the store's scripts run: {'; '.join(failed)}",
                "upgrade to Redis 6.2 or later (SET ... EXAT, KEEPTTL), or build the layer "
                "with atomic=false (the protocol path, see docs/redis-valkey.md)",
            )
        )
    return problems


def _acl(error: str) -> bool:
    return bool(re.search(r"can't run this command|ACL fail|NOPERM", error, re.IGNORECASE))


def _decoded(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# -- DynamoDB ----------------------------------------------------------------------------------

_AUTH_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidClientTokenId",
        "MissingAuthenticationTokenException",
        "IncompleteSignature",
        "NoCredentialsError",
    }
)
_IAM_ACTIONS = (
    "grant dynamodb:PutItem, dynamodb:GetItem, dynamodb:UpdateItem and dynamodb:DeleteItem "
    "on the table (docs/dynamodb.md, IAM); check() also reads dynamodb:DescribeTable and "
    "dynamodb:DescribeTimeToLive"
)


def _client_code(exc: BaseException) -> tuple[str, str]:
    """A botocore error's code and message (its class name for a client-side error)."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error", {})
        code, message = str(error.get("Code", "")), str(error.get("Message", ""))
        found = re.search(r"<Code>(\w+)</Code>.*?<Message>(.*?)</Message>", message, re.S)
        if code.isdigit() and found is not None:  # an XML error botocore did not parse
            return found.group(1), found.group(2)
        return code, message
    return type(exc).__name__, _text(exc)


def dynamodb_problem(exc: BaseException, *, table: str, where: str, step: str = "") -> StoreProblem:
    """A problem for an error a DynamoDB store met during `step`."""
    if isinstance(exc, ProbeFailed):
        return store_problem(exc)
    cause = _cause(exc)
    code, message = _client_code(cause)
    doing = f" during {step}" if step else ""
    if code in _AUTH_CODES:
        return StoreProblem(
            "authentication",
            f"AWS refused the credentials{doing}: {code}: {message}",
            "check the credentials this process runs with (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, or the role of the "
            "function or task), and that they are for this account and not expired",
        )
    if code in {"AccessDeniedException", "AccessDenied"}:
        action = re.search(r"perform: (\S+)", message)
        what = action.group(1) if action else "an action"
        return StoreProblem(
            "permission",
            f"the credentials may not run {what} on table {table!r}{doing}: {message}",
            _IAM_ACTIONS,
        )
    if code == "ResourceNotFoundException":
        return StoreProblem(
            "table-missing",
            f"table {table!r} does not exist in {where}",
            "create it (docs/dynamodb.md, Table setup; `await store.create_table()` in "
            "development), or fix the table name, the region (region_name or AWS_REGION) "
            "or endpoint_url",
        )
    if code == "ValidationException" and "key" in message.lower():
        return StoreProblem(
            "key-schema",
            f"table {table!r} refused the layer's key{doing}: {message}",
            "make key_attr (and sort_key_attr for a composite key) the table's key "
            "attributes; check() shows the table's key when it may read it",
        )
    if isinstance(exc, IdempotencyPersistenceLayerError) and exc.transient:
        return StoreProblem(
            "unreachable",
            f"{where} could not be reached{doing}: {_text(exc)}",
            "check region_name (or AWS_REGION), endpoint_url, and the network path (a "
            "Lambda function in a VPC needs a VPC endpoint for DynamoDB or a NAT gateway)",
            transient=True,
        )
    if isinstance(exc, IdempotencyPersistenceConfigError):
        return StoreProblem("client", _text(exc), _read_message)
    return StoreProblem(
        "store-error",
        f"table {table!r} in {where} failed{doing}: {code}: {message or _text(cause)}",
        "see the error; docs/troubleshooting.md lists each error with its fix",
    )


def _key_text(hash_key: str | None, range_key: str | None) -> str:
    if range_key is None:
        return f"partition key {hash_key!r}"
    return f"partition key {hash_key!r} and sort key {range_key!r}"


def key_schema_problem(
    description: Mapping[str, Any], *, table: str, key_attr: str, sort_key_attr: str | None
) -> StoreProblem | None:
    """A problem when the table's key (``DescribeTable``'s ``Table``) is not the layer's:
    other attribute names, a simple key where the layer has a composite one (or the
    other way round), or key attributes that are not strings."""
    schema = {
        part.get("KeyType"): part.get("AttributeName") for part in description.get("KeySchema", [])
    }
    types = {
        part.get("AttributeName"): part.get("AttributeType")
        for part in description.get("AttributeDefinitions", [])
    }
    hash_key, range_key = schema.get("HASH"), schema.get("RANGE")
    if hash_key != key_attr or range_key != sort_key_attr:
        if range_key is None:
            suggestion = f"key_attr={hash_key!r} and no sort_key_attr"
        else:
            suggestion = f"key_attr={hash_key!r}, sort_key_attr={range_key!r}"
        return StoreProblem(
            "key-schema",
            f"table {table!r} has {_key_text(hash_key, range_key)}, but the layer uses "
            f"{_key_text(key_attr, sort_key_attr)}",
            f"build the layer with {suggestion} (the table's key), or use a table whose "
            f"key is {_key_text(key_attr, sort_key_attr)}",
        )
    not_strings = [name for name in (hash_key, range_key) if name and types.get(name) != "S"]
    if not_strings:
        found = ", ".join(f"{name!r} is {types.get(name)}" for name in not_strings)
        return StoreProblem(
            "key-schema",
            f"table {table!r}'s key attributes must be strings (S): {found}",
            "create the table with string (S) key attributes (docs/dynamodb.md, Table setup)",
        )
    return None


def table_status_problem(description: Mapping[str, Any], *, table: str) -> StoreProblem | None:
    """A problem when the table cannot take requests now (not ACTIVE or UPDATING)."""
    status = str(description.get("TableStatus", "ACTIVE"))
    if status in {"ACTIVE", "UPDATING"}:
        return None
    creating = status == "CREATING"
    return StoreProblem(
        "table-status",
        f"table {table!r} is {status}",
        "wait until it is ACTIVE" if creating else "restore or recreate the table",
        transient=creating,
    )


def ttl_problem(
    description: Mapping[str, Any], *, table: str, expiry_attr: str
) -> StoreProblem | None:
    """A problem when TTL is off, or on another attribute than the layer's expiry
    (``DescribeTimeToLive``'s ``TimeToLiveDescription``)."""
    status = str(description.get("TimeToLiveStatus", "DISABLED"))
    attribute = description.get("AttributeName")
    enable = (
        f"aws dynamodb update-time-to-live --table-name {table} "
        f"--time-to-live-specification Enabled=true,AttributeName={expiry_attr}"
    )
    if status in {"ENABLED", "ENABLING"}:
        if attribute == expiry_attr:
            return None
        return StoreProblem(
            "ttl",
            f"TTL on table {table!r} is on attribute {attribute!r}, but the layer writes "
            f"expiries to {expiry_attr!r}: expired records are never deleted",
            f"build the layer with expiry_attr={attribute!r}, or move the TTL: disable it, "
            f"then `{enable}`",
        )
    return StoreProblem(
        "ttl",
        f"TTL is {status} on table {table!r}: expired records are never deleted and the "
        "table only grows (they still count as expired)",
        f"`{enable}` (or TimeToLiveSpecification in CloudFormation, docs/dynamodb.md)",
    )
