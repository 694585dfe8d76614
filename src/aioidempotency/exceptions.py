"""Errors raised by aioidempotency.

The names follow Powertools for AWS Lambda (Python) so that code catching them keeps
working after a switch; unlike the reference they share one base class,
`IdempotencyError`, so a caller can catch them all at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aioidempotency._check import StoreCheckReport
    from aioidempotency._records import DataRecord

__all__ = [
    "IdempotencyAlreadyInProgressError",
    "IdempotencyClaimLostError",
    "IdempotencyCompletionError",
    "IdempotencyError",
    "IdempotencyInconsistentStateError",
    "IdempotencyInvalidRecordError",
    "IdempotencyInvalidStatusError",
    "IdempotencyItemAlreadyExistsError",
    "IdempotencyItemNotFoundError",
    "IdempotencyKeyError",
    "IdempotencyModelTypeError",
    "IdempotencyNoSerializationModelError",
    "IdempotencyPayloadError",
    "IdempotencyPersistenceAccessDeniedError",
    "IdempotencyPersistenceConfigError",
    "IdempotencyPersistenceConnectionError",
    "IdempotencyPersistenceConsistencyError",
    "IdempotencyPersistenceLayerError",
    "IdempotencyPersistenceMisconfiguredError",
    "IdempotencyResultTooLargeError",
    "IdempotencySerializationError",
    "IdempotencyStoreCheckError",
    "IdempotencyValidationError",
]


class IdempotencyError(Exception):
    """Base class of every error this library raises.

    Like the reference, the first argument is the message and the others are details
    (often the underlying exception); `str()` shows ``"message - (details)"``.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.message = str(args[0]) if args else ""
        self.details = "".join(str(arg) for arg in args[1:]) if args[1:] else None

    def __str__(self) -> str:
        if self.message and self.details:
            return f"{self.message} - ({self.details})"
        return self.message


class IdempotencyItemAlreadyExistsError(IdempotencyError):
    """A claim found a live record under the key (kept for reference compatibility)."""

    def __init__(self, *args: object, old_data_record: DataRecord | None = None) -> None:
        super().__init__(*args)
        self.old_data_record = old_data_record


class IdempotencyItemNotFoundError(IdempotencyError):
    """No record exists under the key."""


class IdempotencyAlreadyInProgressError(IdempotencyError):
    """Another call holds the key and has not finished yet."""


class IdempotencyInvalidStatusError(IdempotencyError):
    """A record carries a status that is neither INPROGRESS nor COMPLETED."""


class IdempotencyValidationError(IdempotencyError):
    """The payload differs from the one stored under the same key (payload validation)."""


class IdempotencyInconsistentStateError(IdempotencyError):
    """The store changed between a refused claim and the read; retried, then raised."""


class IdempotencyPersistenceLayerError(IdempotencyError):
    """The store failed; the underlying error is the `__cause__` and in `details`.

    `transient` tells whether retrying the same call later can succeed (the store was
    unreachable, timed out or was failing over); False for errors a retry repeats.
    """

    transient: bool = False


class IdempotencyKeyError(IdempotencyError):
    """No idempotency key could be taken from the payload (`raise_on_no_idempotency_key`)."""


class IdempotencyPayloadError(IdempotencyKeyError):
    """The payload (or the part chosen for the key) cannot be turned into JSON to hash."""


class IdempotencyModelTypeError(IdempotencyError):
    """An output serializer was given a model type it cannot handle."""


class IdempotencyNoSerializationModelError(IdempotencyError):
    """An output serializer class was given but no model type could be found for it."""


class IdempotencyPersistenceConfigError(IdempotencyError):
    """A persistence layer was configured in a way that cannot work.

    Raised when a store is built with arguments that cannot work, and (as its
    subclasses) when a store refuses a call for a reason only an operator can fix.
    """


class IdempotencyPersistenceConnectionError(IdempotencyPersistenceLayerError):
    """The store could not be reached (down, timed out, refused the connection, failing
    over); a retry later can succeed (`transient` is True)."""

    transient = True


class IdempotencyPersistenceMisconfiguredError(
    IdempotencyPersistenceConfigError, IdempotencyPersistenceLayerError
):
    """The store answered, but the call cannot work as the store or the layer is set up.

    A missing table, a table whose key schema does not match the layer's attribute
    names, a Redis cluster reached as a standalone server (or the other way round).
    Both a configuration error and a store failure: `transient` is False, since a
    retry fails the same way until an operator fixes it. ``await store.check()`` (or
    ``python -m aioidempotency check --store URL``) lists every such problem with its
    fix; docs/troubleshooting.md has one entry per error.
    """


class IdempotencyPersistenceAccessDeniedError(IdempotencyPersistenceMisconfiguredError):
    """The store refused the credentials or a command: a wrong or missing password, an
    ACL user without the store's commands (``WRONGPASS``, ``NOAUTH``, ``NOPERM``), AWS
    credentials that are invalid, expired or lack an IAM permission.

    Not transient: fix the credentials or the permissions (see `store.check()`).
    """


class IdempotencyStoreCheckError(IdempotencyPersistenceConfigError):
    """`store.check()` found problems (raised by `StoreCheckReport.raise_for_problems()`
    or ``check(raise_on_problem=True)``); `report` holds them, each with its fix."""

    def __init__(self, *args: object, report: StoreCheckReport | None = None) -> None:
        super().__init__(*args)
        self.report = report


class IdempotencyInvalidRecordError(IdempotencyPersistenceLayerError):
    """The store holds something under the key that this library cannot use.

    A value that is not a record (not JSON, another Redis type), or a record with a
    missing or mistyped status or timestamp. It is never overwritten, since it may hold
    a result or belong to someone else; `key` names it, the `__cause__` (an
    `IdempotencyInvalidStatusError`, also the second argument) says what is wrong, and
    `fix` is the command that frees it (``str()`` says both).

    Raised by the engines with Powertools' message for the operation that met the record
    as ``args[0]`` ("Failed to save in progress record to idempotency store" for a
    claim, "Failed to get record from idempotency store" for a read), as Powertools 3.x
    raises an `IdempotencyPersistenceLayerError` caused by an
    `IdempotencyInvalidStatusError` for a stored status it does not know.
    """

    def __init__(self, *args: object, key: str | None = None) -> None:
        super().__init__(*args)
        self.key = key

    @property
    def fix(self) -> str | None:
        """The command that frees the key, when the key is known."""
        if self.key is None:
            return None
        return f"python -m aioidempotency delete --store URL '{self.key}'"

    def __str__(self) -> str:
        text = super().__str__()
        if self.key is None:
            return text
        return (
            f"{text}; the record is left as it is: if it is not needed, "
            f"free the key with `{self.fix}`"
        )


class IdempotencyPersistenceConsistencyError(IdempotencyError):
    """The store holds data that contradicts what this call expects."""


class IdempotencyClaimLostError(IdempotencyPersistenceConsistencyError):
    """This call no longer owns its claim: another call took it over.

    Raised instead of overwriting or deleting the new owner's record. When raised on
    completion, the function did run: its return value is in `result`.
    """

    def __init__(self, *args: object, result: Any = None, key: str | None = None) -> None:
        super().__init__(*args)
        self.result = result
        self.key = key


class IdempotencyCompletionError(IdempotencyPersistenceLayerError):
    """The function ran, but its result could not be stored.

    The return value is in `result`, so it is never lost silently. When the store
    failed (unreachable, timed out), the engine keeps trying to store the result in
    the background for a few seconds: meanwhile a retry is refused as in progress,
    then replays it (or, if the store stays out of reach, runs again once the claim's
    lease runs out). The subclasses for results that cannot be stored at all
    (`IdempotencySerializationError`, `IdempotencyResultTooLargeError`) release the
    key instead, so a retry runs the function again.

    When the store failed, ``args[0]`` is Powertools' message for the same failure
    ("Failed to update record state to success in idempotency store") and the store's
    exception is the second argument and the ``__cause__``.
    """

    def __init__(self, *args: object, result: Any = None) -> None:
        super().__init__(*args)
        self.result = result


class IdempotencySerializationError(IdempotencyCompletionError):
    """A function result could not be turned into JSON; the claim was released."""


class IdempotencyResultTooLargeError(IdempotencyCompletionError):
    """A result is larger than the store accepts; the claim was released."""

    def __init__(self, *args: object, result: Any = None, size: int = 0, limit: int = 0) -> None:
        super().__init__(*args, result=result)
        self.size = size
        self.limit = limit
