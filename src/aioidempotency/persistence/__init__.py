"""Stores for idempotency records and the contract they implement.

`DynamoDBPersistenceLayer` is imported on first use, so the package works without
the ``dynamodb`` extra installed.
"""

from typing import TYPE_CHECKING, Any

from aioidempotency.persistence.base import ClaimResult, PersistenceLayer
from aioidempotency.persistence.cache import CacheClient, CachePersistenceLayer
from aioidempotency.persistence.memory import InMemoryPersistenceLayer
from aioidempotency.persistence.urls import store_from_url

if TYPE_CHECKING:
    from aioidempotency.persistence.dynamodb import DynamoDBPersistenceLayer

__all__ = [
    "CacheClient",
    "CachePersistenceLayer",
    "ClaimResult",
    "DynamoDBPersistenceLayer",
    "InMemoryPersistenceLayer",
    "PersistenceLayer",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    if name == "DynamoDBPersistenceLayer":
        from aioidempotency.persistence.dynamodb import DynamoDBPersistenceLayer

        return DynamoDBPersistenceLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
