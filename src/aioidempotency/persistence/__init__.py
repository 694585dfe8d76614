"""Stores for idempotency records and the contract they implement."""

from aioidempotency.persistence.base import ClaimResult, PersistenceLayer
from aioidempotency.persistence.memory import InMemoryPersistenceLayer

__all__ = ["ClaimResult", "InMemoryPersistenceLayer", "PersistenceLayer"]
