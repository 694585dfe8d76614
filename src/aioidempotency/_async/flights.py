"""In-process flights: the calls of this process that hold a claim right now.

A duplicate of a running call, in the same process, joins it and shares its result
instead of asking the store: one claim and one completion for any number of copies.
"""

from __future__ import annotations

import dataclasses

from aioidempotency._async.concurrency import Outcome, scope
from aioidempotency._records import DataRecord

__all__ = ["Flight", "Flights"]


@dataclasses.dataclass
class Flight:
    """A running call that holds the claim on its key; `outcome` is its completed
    record, or None when it released the key."""

    scope: object
    payload_hash: str | None
    outcome: Outcome[DataRecord | None]


class Flights:
    """The flights of one engine, by key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def find(self, key: str) -> Flight | None:
        """The flight holding `key` that the caller may join, if any."""
        flight = self._flights.get(key)
        if flight is None or flight.scope is not scope():
            return None
        return flight

    def start(self, key: str, payload_hash: str | None) -> Flight:
        """Record that the caller now holds `key`."""
        flight = Flight(scope=scope(), payload_hash=payload_hash, outcome=Outcome())
        self._flights[key] = flight
        return flight

    def land(self, key: str, flight: Flight) -> None:
        """The flight is over: wake those who joined it (None if it stored nothing)."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.outcome.set(None)

    async def join(self, flight: Flight, timeout: float) -> DataRecord | None:
        """The flight's completed record (None if it released the key);
        `TimeoutError` after `timeout` seconds."""
        return await flight.outcome.wait(timeout)
