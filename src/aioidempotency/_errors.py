"""What a caller sees when a store fails: one mapping, used by both engines.

A store failure becomes an `IdempotencyError` with the store's exception chained;
an unusable stored record names its key and the command that frees it; network
failures are marked transient so callers can tell a retry from a bug.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Literal

from aioidempotency._contract import ClaimResult
from aioidempotency._records import RecordStatus
from aioidempotency.exceptions import (
    IdempotencyError,
    IdempotencyInvalidRecordError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceLayerError,
)

__all__ = ["invalid_record", "is_own", "is_transient", "store_error", "store_errors"]


def invalid_record(key: str, problem: IdempotencyInvalidStatusError) -> IdempotencyError:
    """The error for an unusable record under `key`: what is wrong, and how to free it."""
    return IdempotencyInvalidRecordError(
        f"the store holds an unusable record under {key!r}: {problem.message}. "
        "It is left as it is; if it is not needed, free the key with "
        f"`python -m aioidempotency delete --store URL '{key}'`",
        problem,
        key=key,
    )


def is_transient(exc: BaseException) -> bool:
    """Whether retrying after `exc` can succeed: our errors say so; a client's own
    connection errors and timeouts are transient."""
    if isinstance(exc, IdempotencyPersistenceLayerError):
        return exc.transient
    if isinstance(exc, IdempotencyError):
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError))


def store_error(message: str, key: str, exc: BaseException) -> IdempotencyError:
    """What the caller sees for the store failure `exc`: an `IdempotencyError` (ours
    as it is; a client's wrapped with `message`, transient when the network failed)."""
    if isinstance(exc, IdempotencyInvalidStatusError):
        return invalid_record(key, exc)
    if isinstance(exc, IdempotencyError):
        return exc
    error = IdempotencyPersistenceLayerError(message, exc)
    error.transient = is_transient(exc)
    return error


class store_errors:
    """Raise `store_error(message, key, exc)` for any `Exception` of the block, with
    the store's exception as its cause.

    A class, not a ``@contextlib.contextmanager`` generator: the engines enter one per
    claim, and a block cost 1.4 µs that way against 0.5 µs this way (CPython 3.11).
    """

    __slots__ = ("key", "message")

    def __init__(self, message: str, key: str) -> None:
        self.message = message
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc is None or not isinstance(exc, Exception):
            return False  # no failure, or a cancellation or exit: not the store's
        error = store_error(self.message, self.key, exc)
        if error is exc:
            return False  # ours already: raised as it is
        raise error from exc


def is_own(result: ClaimResult, owner: str) -> bool:
    """True when a refused claim shows the caller's own in-progress record: a client
    resent the claim after losing the reply to the first one, which had won."""
    existing = result.existing
    return (
        not result.claimed
        and existing is not None
        and existing.owner == owner
        and existing.status is RecordStatus.INPROGRESS
    )
