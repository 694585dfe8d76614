"""A store of one's own whose completion fails with a configuration error (not a store
failure of the network kind): the caller gets an `IdempotencyCompletionError` that is
not transient, with the function's result, and the background retry stores the result
once the store works again."""

from __future__ import annotations

import pytest

from aioidempotency import IdempotencyConfig, IdempotencyEngine, InMemoryPersistenceLayer
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import IdempotencyCompletionError, IdempotencyPersistenceConfigError


class ReconfiguredStore(InMemoryPersistenceLayer):
    """Its first completion fails: its table setting was being reloaded."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        if self.failures:
            self.failures -= 1
            raise IdempotencyPersistenceConfigError("no table configured")
        await super().complete(record, owner=owner)


async def test_a_completion_refused_for_configuration_is_not_transient() -> None:
    store = ReconfiguredStore()
    engine = IdempotencyEngine(
        store, IdempotencyConfig(event_key_jmespath="id"), key_prefix="payments"
    )
    runs: list[str] = []

    async def charge() -> str:
        runs.append("charge")
        return "paid"

    with pytest.raises(IdempotencyCompletionError) as raised:
        await engine.run({"id": "p-1"}, charge)
    assert raised.value.transient is False
    assert raised.value.result == "paid"
    assert isinstance(raised.value.__cause__, IdempotencyPersistenceConfigError)
    assert await engine.drain(timeout=10)
    record = await store.get(engine.idempotency_key({"id": "p-1"}))
    assert record is not None
    assert record.status is RecordStatus.COMPLETED
    assert await engine.run({"id": "p-1"}, charge) == "paid"
    assert runs == ["charge"], "the background retry stored the result: replayed"
