"""Stores written for Powertools, serving our engines: `PowertoolsStoreAdapter`.

A custom store written for Powertools for AWS Lambda (Python) subclasses its
`BasePersistenceLayer` and implements four methods: ``_get_record(idempotency_key)``,
``_put_record(data_record)``, ``_update_record(data_record)`` and
``_delete_record(data_record)``, exchanging Powertools' `DataRecord`s. The adapter
turns such a layer (Powertools' own `DynamoDBPersistenceLayer` and
`RedisCachePersistenceLayer` included) into a store of ours: the sync engine calls the
layer directly, the async engine in a worker thread (`asyncio.to_thread`).

Powertools is imported when an adapter is built, never with this package.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from aioidempotency._async.store import PersistenceLayer
from aioidempotency._contract import ClaimResult
from aioidempotency._records import DataRecord, RecordAttributes, RecordStatus
from aioidempotency._sync.store import SyncPersistenceLayer
from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
)

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["PowertoolsStoreAdapter", "SyncPowertoolsStoreAdapter"]

logger = logging.getLogger("aioidempotency.persistence")

_METHODS = ("_get_record", "_put_record", "_update_record", "_delete_record")
_ATTRIBUTES = RecordAttributes()  # the names `from_mapping` reads; nothing is stored by them


class _PowertoolsRecords:
    """The contract on a Powertools layer: one object shared by the async adapter and
    its sync twin, so both know which claims this process wrote."""

    def __init__(self, layer: Any, payload_validation: bool) -> None:
        missing = [name for name in _METHODS if not callable(getattr(layer, name, None))]
        if missing:
            raise IdempotencyPersistenceConfigError(
                f"{type(layer).__name__} is not a Powertools persistence layer: it has no "
                f"{', '.join(missing)} (a subclass of Powertools' BasePersistenceLayer has "
                "all four)"
            )
        from aws_lambda_powertools.utilities.idempotency import exceptions
        from aws_lambda_powertools.utilities.idempotency.persistence import datarecord

        self.layer = layer
        self.errors: ModuleType = exceptions
        self.record_class: Any = datarecord.DataRecord
        # Powertools' layers write the payload hash (and compare it on a refused put)
        # only with validation on. Left alone unless asked: Powertools' own calls on a
        # layer with validation on and no expression of theirs would fail.
        if payload_validation:
            layer.payload_validation_enabled = True
        self.lock = threading.Lock()
        self.claims: dict[str, dict[str, DataRecord]] = {}  # key -> owner -> claim written
        self.renew_warned = False

    # -- records --------------------------------------------------------------------

    def to_powertools(self, record: DataRecord) -> Any:
        return self.record_class(
            idempotency_key=record.idempotency_key,
            status=record.status.value,
            expiry_timestamp=record.expiry_timestamp,
            in_progress_expiry_timestamp=record.in_progress_expiry_timestamp,
            response_data=record.response_data or "",
            payload_hash=record.payload_hash or "",
        )

    def from_powertools(self, key: str, found: Any) -> DataRecord | None:
        """Our record for `found`, the layer's record under `key`; None when the
        layer's clock says it expired. Raises `IdempotencyInvalidStatusError` for a
        record our reader refuses."""
        try:
            status = found.status  # Powertools derives EXPIRED from its clock
        except self.errors.IdempotencyInvalidStatusError as exc:
            raise IdempotencyInvalidStatusError(
                f"record {key!r} has an invalid status: {exc.message!r}"
            ) from exc
        if status == "EXPIRED":
            return None
        item = {
            _ATTRIBUTES.status_attr: status,
            _ATTRIBUTES.expiry_attr: found.expiry_timestamp,
            _ATTRIBUTES.in_progress_expiry_attr: found.in_progress_expiry_timestamp,
            _ATTRIBUTES.data_attr: found.response_data or None,
            _ATTRIBUTES.validation_key_attr: found.payload_hash or None,
        }
        record = _ATTRIBUTES.from_mapping(
            key,
            {name: value for name, value in item.items() if value is not None},
            sort_key=getattr(found, "sort_key", None),
        )
        return self.with_owner(record)

    def with_owner(self, record: DataRecord) -> DataRecord:
        """`record` with the owner of the claim this process wrote, when the stored
        in-progress record is that claim (same timestamps); Powertools stores no owner."""
        if record.status is not RecordStatus.INPROGRESS:
            return record
        with self.lock:
            written = self.claims.get(record.idempotency_key, {})
            for owner, claim in written.items():
                if (claim.expiry_timestamp, claim.in_progress_expiry_timestamp) == (
                    record.expiry_timestamp,
                    record.in_progress_expiry_timestamp,
                ):
                    return dataclasses.replace(record, owner=owner)
        return record

    def read(self, key: str) -> DataRecord | None:
        """The record under `key` (None: none, or expired by the layer's clock)."""
        try:
            found = self.layer._get_record(idempotency_key=key)
        except self.errors.IdempotencyItemNotFoundError:
            return None
        except self.errors.IdempotencyPersistenceConsistencyError as exc:
            # Powertools' cache layer: the value under the key is not JSON.
            raise IdempotencyInvalidStatusError(
                f"record {key!r} is unusable ({type(self.layer).__name__} says it is "
                "inconsistent: not JSON)"
            ) from exc
        return self.from_powertools(key, found)

    def remember(self, record: DataRecord) -> None:
        """Note a claim this process wrote. It supersedes any earlier claim of the key
        written here (one the new claim took over): that one is no longer ours to
        release, so a late release of it cannot delete the new claim's record."""
        assert record.owner is not None
        with self.lock:
            self.claims[record.idempotency_key] = {record.owner: record}

    def forget(self, key: str, owner: str) -> bool:
        """Drop `owner`'s claim on `key`; True if this process wrote it."""
        with self.lock:
            written = self.claims.get(key)
            if written is None or written.pop(owner, None) is None:
                return False
            if not written:
                del self.claims[key]
            return True

    # -- the contract ---------------------------------------------------------------

    def claim(self, record: DataRecord) -> ClaimResult:
        key = record.idempotency_key
        if record.payload_hash is not None and not self.layer.payload_validation_enabled:
            raise IdempotencyPersistenceConfigError(
                f"{type(self.layer).__name__} does not store payload hashes, so "
                "payload_validation_jmespath cannot be checked: pass "
                "PowertoolsStoreAdapter(layer, payload_validation=True)"
            )
        try:
            self.layer._put_record(data_record=self.to_powertools(record))
        except self.errors.IdempotencyItemAlreadyExistsError as exc:
            old = exc.old_data_record
            existing = self.read(key) if old is None else self.from_powertools(key, old)
        except self.errors.IdempotencyValidationError:
            existing = self.read(key)  # the engine compares the hashes itself
        except self.errors.IdempotencyInvalidStatusError as exc:
            raise IdempotencyInvalidStatusError(
                f"record {key!r} has an invalid status: {exc.message!r}"
            ) from exc
        else:
            self.remember(record)
            return ClaimResult(claimed=True)
        # None: the record vanished or expired since the put; the engine claims again.
        return ClaimResult(claimed=False, existing=existing)

    def get(self, key: str, now: float | None) -> DataRecord | None:
        record = self.read(key)
        if record is None or record.is_expired(time.time() if now is None else now):
            return None
        return record

    def complete(self, record: DataRecord, owner: str) -> None:
        self.layer._update_record(data_record=self.to_powertools(record))
        self.forget(record.idempotency_key, owner)

    def release(self, key: str, owner: str) -> None:
        with self.lock:
            written = owner in self.claims.get(key, {})
        if not written:
            return  # not a claim this process wrote (a claim that failed): left as it is
        self.layer._delete_record(data_record=self.record_class(idempotency_key=key))
        self.forget(key, owner)

    def renew(self, record: DataRecord) -> None:
        if not self.renew_warned:
            self.renew_warned = True
            logger.warning(
                "%s cannot renew a claim (Powertools' layers have no such operation): "
                "a claim keeps its first in-progress expiry, so a function running "
                "longer than in_progress_lease_seconds can run twice; pass "
                "in_progress_lease_seconds=None for Powertools' behaviour",
                type(self.layer).__name__,
            )

    def delete(self, key: str) -> bool:
        try:
            self.layer._get_record(idempotency_key=key)
        except self.errors.IdempotencyItemNotFoundError:
            return False
        except self.errors.IdempotencyPersistenceConsistencyError:
            pass  # an unusable value: deleted all the same
        self.layer._delete_record(data_record=self.record_class(idempotency_key=key))
        return True


class _Mirrors:
    """What the engines read from a DynamoDB layer to word the in-progress refusal as
    Powertools does on a table with a composite key."""

    _records: _PowertoolsRecords

    @property
    def layer(self) -> Any:
        """The Powertools layer this adapter serves."""
        return self._records.layer

    @property
    def sort_key_attr(self) -> str | None:
        """The layer's `sort_key_attr` (DynamoDB, composite key), else None."""
        value = getattr(self._records.layer, "sort_key_attr", None)
        return value if isinstance(value, str) else None

    @property
    def static_pk_value(self) -> str | None:
        """The layer's `static_pk_value` (DynamoDB), else None."""
        value = getattr(self._records.layer, "static_pk_value", None)
        return value if isinstance(value, str) else None


class PowertoolsStoreAdapter(_Mirrors, PersistenceLayer):
    """A persistence layer written for Powertools (3.x), serving our engines.

    ``PowertoolsStoreAdapter(layer)`` takes an instance of a subclass of Powertools'
    `BasePersistenceLayer` (one's own, or Powertools' `DynamoDBPersistenceLayer` or
    `RedisCachePersistenceLayer`) and calls its ``_get_record``, ``_put_record``,
    ``_update_record`` and ``_delete_record``: the async engine in a worker thread, the
    sync engine (``@idempotent``, ``@idempotent_function``) directly. Records are
    converted both ways; a stored record our reader refuses (an unknown status, a
    missing expiry) is an unusable record, as with our stores.

    The guarantees are the layer's, as in Powertools, not those of our stores
    (docs/reliability.md):

    - Claims are as atomic as the layer's ``_put_record`` makes them (a conditional
      put in DynamoDB; Powertools' cache layer takes an orphaned record over under a
      lock key).
    - Expiry is decided by the layer with its own clock, as in Powertools: a record
      is taken over once its expiry, or its in-progress expiry, has passed.
    - No owner checks: a completion is written even if another call took the key
      over (a takeover may lose an update), and a release deletes the key. The
      adapter releases only a claim it wrote itself in this process, so a claim
      whose outcome is unknown (the put failed) is left to expire, as Powertools
      leaves it.
    - No renewals: Powertools' layers cannot extend a claim, so a claim keeps the
      in-progress expiry it was written with (the Lambda context's remaining time,
      or ``in_progress_lease_seconds``). Use ``in_progress_lease_seconds=None`` for
      Powertools' behaviour when there is no Lambda context (a claim lasts
      ``expires_after_seconds``); with a lease, the adapter logs a warning on the
      first renewal it cannot make.

    Payload validation (``payload_validation_jmespath``) needs the layer to store the
    payload hash: ``payload_validation=True`` turns the layer's
    ``payload_validation_enabled`` on (a layer Powertools configured with a
    ``payload_validation_jmespath`` has it on already); a call with a payload hash on a
    layer without it is refused (`IdempotencyPersistenceConfigError`). A layer also
    used by Powertools' decorators must then be configured with validation there too.
    The adapter never calls the layer's ``configure``, and does not use its local cache.
    """

    def __init__(self, layer: Any, *, payload_validation: bool = False) -> None:
        self._records = _PowertoolsRecords(layer, payload_validation)

    def _sync_twin(self) -> SyncPersistenceLayer:
        """The sync engine calls the layer directly, through the same records."""
        return SyncPowertoolsStoreAdapter._sharing(self._records)

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        return await asyncio.to_thread(self._records.claim, record)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        return await asyncio.to_thread(self._records.get, key, now)

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        await asyncio.to_thread(self._records.complete, record, owner)

    async def release(self, key: str, *, owner: str) -> None:
        await asyncio.to_thread(self._records.release, key, owner)

    async def renew(self, record: DataRecord) -> None:
        self._records.renew(record)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self._records.delete, key)


class SyncPowertoolsStoreAdapter(_Mirrors, SyncPersistenceLayer):
    """`PowertoolsStoreAdapter` for sync code only: the layer called directly.

    A `PowertoolsStoreAdapter` serves sync code too; this class is for code that only
    has sync engines. Same guarantees.
    """

    def __init__(self, layer: Any, *, payload_validation: bool = False) -> None:
        self._records = _PowertoolsRecords(layer, payload_validation)

    @classmethod
    def _sharing(cls, records: _PowertoolsRecords) -> SyncPowertoolsStoreAdapter:
        twin = cls.__new__(cls)
        twin._records = records
        return twin

    def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        return self._records.claim(record)

    def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        return self._records.get(key, now)

    def complete(self, record: DataRecord, *, owner: str) -> None:
        self._records.complete(record, owner)

    def release(self, key: str, *, owner: str) -> None:
        self._records.release(key, owner)

    def renew(self, record: DataRecord) -> None:
        self._records.renew(record)

    def delete(self, key: str) -> bool:
        return self._records.delete(key)
