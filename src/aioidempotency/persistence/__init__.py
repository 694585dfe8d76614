"""Stores for idempotency records and the contract they implement."""

from aioidempotency.persistence.base import ClaimResult, PersistenceLayer
from aioidempotency.persistence.cache import CacheClient, CachePersistenceLayer
from aioidempotency.persistence.dynamodb import DynamoDBPersistenceLayer
from aioidempotency.persistence.memory import InMemoryPersistenceLayer
from aioidempotency.persistence.urls import store_from_url

__all__ = [
    "CacheClient",
    "CachePersistenceLayer",
    "ClaimResult",
    "DynamoDBPersistenceLayer",
    "InMemoryPersistenceLayer",
    "PersistenceLayer",
    "store_from_url",
]
