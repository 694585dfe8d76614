"""A call's preparation, without I/O: its key, validation hash and Lambda context.

The one place where keys are derived (``prefix#digest``): both engines, the CLI and
the web layer use it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

from aioidempotency._config import IdempotencyConfig, LambdaContextLike, registered_lambda_context
from aioidempotency._contract import ClaimResult
from aioidempotency._events import Watch
from aioidempotency._keys import (
    default_key_prefix,
    hash_data,
    is_missing_idempotency_key,
    prepare_payload,
    select_key_data,
    select_validation_data,
)
from aioidempotency._records import DataRecord
from aioidempotency.exceptions import IdempotencyKeyError

__all__ = [
    "DISABLED_ENV",
    "DISABLED_MESSAGE",
    "IdempotencyDisabledWarning",
    "PreparedCall",
    "SentClaim",
    "idempotency_key",
    "is_disabled",
    "is_durable_replay",
    "key_prefix_of",
    "prepare_call",
]

DISABLED_ENV = "POWERTOOLS_IDEMPOTENCY_DISABLED"
_TRUE_VALUES = frozenset({"1", "y", "yes", "t", "true", "on"})
DISABLED_MESSAGE = (
    "Disabling idempotency is intended for development environments only "
    "and should not be used in production."
)


class IdempotencyDisabledWarning(UserWarning):
    """Idempotency is switched off by `POWERTOOLS_IDEMPOTENCY_DISABLED`.

    A `UserWarning` with Powertools' message, so a filter on that category and message
    catches Powertools' warning and ours alike::

        warnings.filterwarnings("ignore", "Disabling idempotency", UserWarning)

    It is not a subclass of Powertools' ``PowertoolsUserWarning``: that would import
    Powertools with this package, which costs Lambda cold starts tens of milliseconds
    and runs Powertools' package setup (its boto3 user-agent hook, its log handler) in
    programs that never asked for it.
    """


def is_disabled() -> bool:
    """True when `POWERTOOLS_IDEMPOTENCY_DISABLED` holds a true value."""
    return os.environ.get(DISABLED_ENV, "false").strip().lower() in _TRUE_VALUES


def is_durable_replay(context: Any) -> bool:
    """True when `context` is a durable-functions context replaying an execution.

    Powertools' rule (3.37): a context with both ``state`` and ``lambda_context`` is
    durable, and it replays when its checkpointed ``state.operations`` hold more than
    one operation (the execution's own operation is always there).
    """
    if not (hasattr(context, "state") and hasattr(context, "lambda_context")):
        return False
    try:
        return len(context.state.operations) > 1
    except (AttributeError, TypeError):
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedCall:
    """A call's idempotency key, validation hash and Lambda context.

    `durable_replay`: the call replays a durable execution that already claimed the
    key (see `is_durable_replay`); it adopts its own in-progress claim. `watch`: what
    the call's events share (its start and round trips), None when nobody sees them.
    """

    key: str
    payload_hash: str | None
    lambda_context: LambdaContextLike | None
    durable_replay: bool = False
    watch: Watch | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(eq=False, slots=True)
class SentClaim:
    """The first claim of a call, sent ahead of it with others
    (`IdempotencyEngine.claim_each`): the in-progress `record` and what the store
    answered, or how the claim failed. `taken` once the call's `run_prepared` has it;
    `lease`, the engine's lease that renews a won claim while its call waits."""

    record: DataRecord
    outcome: ClaimResult | Exception
    taken: bool = False
    lease: object = None


def key_prefix_of(key_prefix: str | None, key_source: Callable[..., Any] | None) -> str:
    """The key prefix: `key_prefix` if given, else derived from the function."""
    if key_prefix:
        return key_prefix
    if key_source is None:
        raise IdempotencyKeyError("no key_prefix and no function to derive it from")
    return default_key_prefix(key_source)


def idempotency_key(prefix: str, payload: Any, config: IdempotencyConfig) -> str:
    """The key of `payload` under `prefix` (`IdempotencyKeyError` if it has none)."""
    data = select_key_data(prepare_payload(payload), config)
    if is_missing_idempotency_key(data):
        raise IdempotencyKeyError("No data found to create a hashed idempotency_key")
    return f"{prefix}#{hash_data(data, config.hash_function)}"


def prepare_call(
    payload: Any,
    config: IdempotencyConfig,
    *,
    prefix: str,
    lambda_context: LambdaContextLike | None = None,
    durable_replay: bool = False,
    stacklevel: int = 2,
    watch: Watch | None = None,
) -> PreparedCall | None:
    """Derive the key and validation hash of a call.

    Returns None, after a warning, when idempotency is disabled by the environment or
    the payload has no key (`IdempotencyKeyError` instead when configured): the
    function then runs unprotected.
    """
    if is_disabled():
        warnings.warn(DISABLED_MESSAGE, IdempotencyDisabledWarning, stacklevel=stacklevel + 1)
        return None
    data = prepare_payload(payload, deep_copy=bool(config.jmespath_options))
    key_data = select_key_data(data, config)
    if is_missing_idempotency_key(key_data):
        if config.raise_on_no_idempotency_key:
            raise IdempotencyKeyError("No data found to create a hashed idempotency_key")
        warnings.warn(
            "No idempotency key value found. Skipping persistence layer and validation "
            f"operations. jmespath: {config.event_key_jmespath}",
            stacklevel=stacklevel + 1,
        )
        return None
    payload_hash = None
    if config.payload_validation_enabled:
        payload_hash = hash_data(select_validation_data(data, config), config.hash_function)
    context = lambda_context if lambda_context is not None else registered_lambda_context(config)
    key = f"{prefix}#{hash_data(key_data, config.hash_function)}"
    # Positional arguments: a frozen dataclass is built faster from them than by keyword.
    return PreparedCall(key, payload_hash, context, durable_replay, watch)
