"""JSON encoding of payloads (for hashing) and of results (for storing).

Both produce the same bytes as Powertools for AWS Lambda (Python) 3.x:
``json.dumps(data, sort_keys=True)`` with the default separators and
``ensure_ascii=True``. Decimals become their ``str()`` as a JSON string (NaN stays
NaN), pydantic models and dataclasses become dicts. For hashing only, Enums become
their value, dates and times their ``isoformat()``, UUIDs and paths their ``str()``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
from pathlib import PurePath
from typing import Any
from uuid import UUID

__all__ = ["KeyEncoder", "ResultEncoder", "dumps_key_data", "dumps_result"]


class ResultEncoder(json.JSONEncoder):
    """Encodes function results: Decimal, pydantic models and dataclasses."""

    def default(self, o: Any) -> Any:
        if isinstance(o, decimal.Decimal):
            return math.nan if o.is_nan() else str(o)
        model_dump = getattr(o, "model_dump", None)
        if callable(model_dump):
            return model_dump(mode="json")
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return super().default(o)


class KeyEncoder(ResultEncoder):
    """Encodes payloads for hashing: adds Enum, date/time, UUID and paths."""

    def default(self, o: Any) -> Any:
        try:
            return super().default(o)
        except TypeError:
            if isinstance(o, enum.Enum):
                return o.value
            if isinstance(o, (dt.date, dt.time)):
                return o.isoformat()
            if isinstance(o, (UUID, PurePath)):
                return str(o)
            raise


# One encoder each, built once: json.dumps(cls=...) would build one per call. Their
# settings are json.dumps' defaults plus sort_keys, so the bytes are the same.
_KEY_ENCODER = KeyEncoder(sort_keys=True)
_RESULT_ENCODER = ResultEncoder(sort_keys=True)


def dumps_key_data(data: Any) -> str:
    """Serialise the data an idempotency key or validation hash is computed from."""
    return _KEY_ENCODER.encode(data)


def dumps_result(data: Any) -> str:
    """Serialise a function result for storing (raises TypeError/ValueError if it cannot)."""
    return _RESULT_ENCODER.encode(data)
