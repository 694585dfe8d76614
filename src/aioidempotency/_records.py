"""The idempotency record and its mapping to the attributes a store keeps."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
import random
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
)

__all__ = ["DataRecord", "RecordAttributes", "RecordStatus", "new_owner_token"]

# Owner tokens must be unique, not secret (whoever reads the store reads them): a
# private generator seeded from os.urandom, and again in a forked child, makes them
# without a system call. os.urandom releases the GIL: under threads, a switch per call.
_tokens = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_tokens.seed)


def new_owner_token() -> str:
    """A new claim's owner token: 32 random hex digits."""
    return f"{_tokens.getrandbits(128):032x}"


class RecordStatus(str, enum.Enum):
    """Status of a record. `EXPIRED` is derived from the timestamps, never stored."""

    INPROGRESS = "INPROGRESS"
    COMPLETED = "COMPLETED"
    EXPIRED = "EXPIRED"


@dataclasses.dataclass(frozen=True, slots=True)
class DataRecord:
    """One idempotency record, as the engine sees it whatever the store.

    `expiry_timestamp` is in epoch seconds, `in_progress_expiry_timestamp` in epoch
    milliseconds (as in the reference). `response_data` is the JSON text of the result
    (COMPLETED only). `owner` is the token of the call that claimed the record.
    `sort_key`: as in Powertools, the idempotency key when the record was read from a
    DynamoDB table with a composite key (``sort_key_attr``), else None; where the record
    was read from, not part of it, so left out of equality.

    For response hooks written for Powertools: `get_expiration_datetime()`,
    `response_json_as_dict()` and `sort_key` behave as Powertools' (3.x). `is_expired`
    and `status` do not: see docs/getting-started.md, "Differences from Powertools".
    """

    idempotency_key: str
    status: RecordStatus
    expiry_timestamp: int
    in_progress_expiry_timestamp: int | None = None
    response_data: str | None = None
    payload_hash: str | None = None
    owner: str | None = None
    sort_key: str | None = dataclasses.field(default=None, compare=False)

    def is_expired(self, now: float) -> bool:
        """True when the record's expiry window has passed at `now` (epoch seconds)."""
        return int(now) > self.expiry_timestamp

    def is_orphaned(self, now: float) -> bool:
        """True for an in-progress record whose claim timed out at `now` (epoch seconds)."""
        return (
            self.status is RecordStatus.INPROGRESS
            and self.in_progress_expiry_timestamp is not None
            and self.in_progress_expiry_timestamp < int(now * 1000)
        )

    def is_claimable(self, now: float) -> bool:
        """True when a new claim may replace this record (expired or orphaned)."""
        return self.is_expired(now) or self.is_orphaned(now)

    def status_at(self, now: float) -> RecordStatus:
        """The status at `now`: `EXPIRED` once the expiry window has passed."""
        return RecordStatus.EXPIRED if self.is_expired(now) else self.status

    def response_json(self) -> Any:
        """The stored result decoded from JSON (`None` when nothing was stored)."""
        return None if self.response_data is None else json.loads(self.response_data)

    def response_json_as_dict(self) -> Any:
        """Powertools' name for the stored result decoded from JSON: None when no
        result (or an empty text) was stored."""
        return json.loads(self.response_data) if self.response_data else None

    def get_expiration_datetime(self) -> datetime.datetime | None:
        """The expiry as Powertools gives it: a naive datetime in the local time zone
        (UTC on Lambda), None for a zero timestamp."""
        if self.expiry_timestamp:
            return datetime.datetime.fromtimestamp(int(self.expiry_timestamp))
        return None


def _as_int(value: Any, name: str, key: str) -> int:
    """A stored timestamp as an integer: a finite number (int, float or Decimal),
    rounded down. Text, booleans and other types are refused: DynamoDB's conditions
    compare numbers only, so accepting ``"123"`` here would make this reader and the
    store's condition classify the same record differently."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise IdempotencyInvalidStatusError(
            f"record {key!r}: attribute {name!r} is not a number: {value!r}"
        )
    if isinstance(value, int):
        return value
    try:
        return math.floor(value)
    except (ValueError, OverflowError, ArithmeticError) as exc:
        raise IdempotencyInvalidStatusError(
            f"record {key!r}: attribute {name!r} is not a finite number: {value!r}"
        ) from exc


@dataclasses.dataclass(frozen=True, slots=True)
class RecordAttributes:
    """Attribute names of a stored record; the defaults are the reference's.

    Give one to a store as ``attributes=`` instead of its ``*_attr`` keywords.
    `owner_attr` is ours: the reference ignores attributes it does not know, so a
    record carrying an owner token stays readable by Powertools.
    """

    status_attr: str = "status"
    expiry_attr: str = "expiration"
    in_progress_expiry_attr: str = "in_progress_expiration"
    data_attr: str = "data"
    validation_key_attr: str = "validation"
    owner_attr: str = "owner_token"

    @staticmethod
    def either(attributes: RecordAttributes | None, keywords: RecordAttributes) -> RecordAttributes:
        """A store's names: `attributes` when given, else `keywords` (those built from its
        ``*_attr`` keywords). Both is an `IdempotencyPersistenceConfigError` unless every
        keyword kept its default."""
        if attributes is None:
            return keywords
        if not isinstance(attributes, RecordAttributes):
            raise IdempotencyPersistenceConfigError(
                f"attributes= takes a RecordAttributes, not {type(attributes).__name__}"
            )
        changed = [
            f"{field.name}={getattr(keywords, field.name)!r}"
            for field in dataclasses.fields(keywords)
            if getattr(keywords, field.name) != field.default
        ]
        if changed:
            raise IdempotencyPersistenceConfigError(
                f"attribute names given twice, as attributes= and as {', '.join(changed)}: "
                "pass them either in the RecordAttributes or as keywords"
            )
        return attributes

    def names(self) -> tuple[str, ...]:
        """The six names, in field order."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))

    def to_mapping(self, record: DataRecord) -> dict[str, Any]:
        """The record's attributes in the reference's order (key not included)."""
        item: dict[str, Any] = {}
        if record.status is RecordStatus.COMPLETED:
            item[self.data_attr] = record.response_data
        item[self.status_attr] = record.status.value
        item[self.expiry_attr] = record.expiry_timestamp
        if record.in_progress_expiry_timestamp is not None:
            item[self.in_progress_expiry_attr] = record.in_progress_expiry_timestamp
        if record.payload_hash is not None:
            item[self.validation_key_attr] = record.payload_hash
        if record.owner is not None and record.status is RecordStatus.INPROGRESS:
            item[self.owner_attr] = record.owner
        return item

    def from_mapping(
        self, key: str, item: Mapping[str, Any], *, sort_key: str | None = None
    ) -> DataRecord:
        """Build a record from stored attributes; unknown attributes are ignored.
        `sort_key` is set on the record as it is.

        Raises `IdempotencyInvalidStatusError` when a required attribute is missing or
        malformed.
        """
        raw_status = item.get(self.status_attr)
        try:
            if not isinstance(raw_status, str):
                raise ValueError(raw_status)
            status = RecordStatus(raw_status)
        except ValueError as exc:
            raise IdempotencyInvalidStatusError(
                f"record {key!r} has an invalid status: {raw_status!r}"
            ) from exc
        if status is RecordStatus.EXPIRED:
            raise IdempotencyInvalidStatusError(f"record {key!r} has a stored EXPIRED status")
        if self.expiry_attr not in item:
            raise IdempotencyInvalidStatusError(f"record {key!r} has no {self.expiry_attr!r}")
        expiry = _as_int(item[self.expiry_attr], self.expiry_attr, key)
        raw_in_progress = item.get(self.in_progress_expiry_attr)
        in_progress = (
            None
            if raw_in_progress is None
            else _as_int(raw_in_progress, self.in_progress_expiry_attr, key)
        )
        data = item.get(self.data_attr)
        if data is not None and not isinstance(data, str):
            raise IdempotencyInvalidStatusError(f"record {key!r} has non-text {self.data_attr!r}")
        validation = item.get(self.validation_key_attr)
        owner = item.get(self.owner_attr)
        return DataRecord(
            idempotency_key=key,
            status=status,
            expiry_timestamp=expiry,
            in_progress_expiry_timestamp=in_progress,
            response_data=data,
            payload_hash=None if validation is None else str(validation),
            owner=None if owner is None else str(owner),
            sort_key=sort_key,
        )

    def to_json(self, record: DataRecord) -> str:
        """The record as the JSON text a cache store keeps (the reference's layout)."""
        return json.dumps(self.to_mapping(record))

    def from_json(self, key: str, text: str | bytes) -> DataRecord:
        """Parse a cache value; raises `IdempotencyInvalidStatusError` when malformed."""
        try:
            item = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise IdempotencyInvalidStatusError(f"record {key!r} is not valid JSON") from exc
        if not isinstance(item, dict):
            raise IdempotencyInvalidStatusError(f"record {key!r} is not a JSON object")
        return self.from_mapping(key, item)
