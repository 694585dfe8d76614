"""The plain data of the persistence contract, shared by async and sync stores."""

from __future__ import annotations

import dataclasses

from aioidempotency._records import DataRecord
from aioidempotency.exceptions import IdempotencyResultTooLargeError

__all__ = ["ClaimResult", "check_result_size"]


def check_result_size(record: DataRecord, limit: int | None) -> None:
    """Raise `IdempotencyResultTooLargeError` when the stored result of `record` is
    over `limit` bytes (None: no limit). Stores call it before they write."""
    if limit is None or record.response_data is None:
        return
    size = len(record.response_data.encode())
    if size > limit:
        raise IdempotencyResultTooLargeError(
            f"result of {size} bytes exceeds the store's limit of {limit} bytes",
            size=size,
            limit=limit,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimResult:
    """What a claim returns.

    - `claimed=True`: the in-progress record was written; the caller owns the key.
    - `claimed=False` with `existing`: the live record that refused the claim, read in
      the same round trip where the store allows (the engine validates it, replays it,
      refuses or waits).
    - `claimed=False, busy=True` without `existing`: another caller is taking over an
      orphaned record right now (the reference's lock key); the engine reports the key
      as in progress (or waits).
    - `claimed=False, busy=False` without `existing`: the record vanished between two
      steps of the claim; the engine retries the claim (up to 3 attempts).
    """

    claimed: bool
    existing: DataRecord | None = None
    busy: bool = False
