"""The engine on DynamoDB: requests per case, too-large results, takeovers, loops, sync shim."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from aioidempotency import (
    IdempotencyClaimLostError,
    IdempotencyCompletionError,
    IdempotencyConfig,
    IdempotencyEngine,
    IdempotencyResultTooLargeError,
    idempotent_function,
    idempotent_function_async,
)
from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency.exceptions import IdempotencyPersistenceLayerError
from tests.backends.dynamodb import counting_requests, fresh_store, inject_error
from tests.helpers import FakeLambdaContext
from tests.servers.moto import MotoServer

ORDER = {"order_id": "o-1", "amount": 42}


class Calls:
    """An async function that counts its executions; raises `error` when set."""

    def __init__(self, result: Any = "ok", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.count = 0

    async def __call__(self) -> Any:
        self.count += 1
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture(params=["dynamodb_simple", "dynamodb_composite"])
def ddb(request: pytest.FixtureRequest) -> DynamoDBPersistenceLayer:
    store = request.getfixturevalue(f"store_{request.param}")
    assert isinstance(store, DynamoDBPersistenceLayer)
    return store


@pytest.mark.parametrize("validation", [False, True])
async def test_requests_per_case(ddb: DynamoDBPersistenceLayer, validation: bool) -> None:
    config = IdempotencyConfig(payload_validation_jmespath="amount" if validation else "")
    engine = IdempotencyEngine(ddb, config, key_prefix="orders")
    fn = Calls({"id": 7})
    with counting_requests(await ddb.client()) as requests:
        assert await engine.run(ORDER, fn) == {"id": 7}
        first = dict(requests.counts)
        requests.reset()
        assert await engine.run(ORDER, fn) == {"id": 7}
        replay = dict(requests.counts)
        requests.reset()
        with pytest.raises(ValueError, match="boom"):
            await engine.run({"order_id": "o-2"}, Calls(error=ValueError("boom")))
        failure = dict(requests.counts)
    assert fn.count == 1
    assert first == {"PutItem": 1, "UpdateItem": 1}
    assert replay == {"PutItem": 1}
    assert failure == {"PutItem": 1, "DeleteItem": 1}
    assert await ddb.get(engine.idempotency_key({"order_id": "o-2"})) is None


async def test_a_local_cache_hit_sends_no_request(ddb: DynamoDBPersistenceLayer) -> None:
    engine = IdempotencyEngine(ddb, IdempotencyConfig(use_local_cache=True), key_prefix="orders")
    fn = Calls([1, 2, 3])
    with counting_requests(await ddb.client()) as requests:
        assert await engine.run(ORDER, fn) == [1, 2, 3]
        assert requests.total == 2
        requests.reset()
        assert await engine.run(ORDER, fn) == [1, 2, 3]
        assert requests.total == 0
    assert fn.count == 1


async def test_a_result_too_large_is_reported_and_its_claim_released(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    engine = IdempotencyEngine(ddb, key_prefix="orders")
    fn = Calls("x" * 420_000)
    with counting_requests(await ddb.client()) as requests:
        with pytest.raises(IdempotencyResultTooLargeError) as error:
            await engine.run(ORDER, fn)
        assert requests.counts == {"PutItem": 1, "DeleteItem": 1}
    assert error.value.result == fn.result  # the result is never lost silently
    assert await ddb.get(engine.idempotency_key(ORDER)) is None
    fn.result = "small"
    assert await engine.run(ORDER, fn) == "small"
    assert fn.count == 2


async def test_a_result_that_cannot_be_stored_yet_is_attached_and_stored_later(
    moto_server: MotoServer, user_client: Any
) -> None:
    async with fresh_store(moto_server, client=user_client) as store:
        heal = inject_error(user_client, "UpdateItem", "ProvisionedThroughputExceededException")
        engine = IdempotencyEngine(store, key_prefix="orders")
        fn = Calls({"id": 7})
        with (
            counting_requests(user_client) as requests,
            pytest.raises(IdempotencyCompletionError) as error,
        ):
            await engine.run(ORDER, fn)
        assert requests.counts == {"PutItem": 1}  # UpdateItem never sent
        assert error.value.result == {"id": 7}
        assert isinstance(error.value.__cause__, IdempotencyPersistenceLayerError)
        assert "throttled" in str(error.value)
        # the function ran: its result is kept (never traded for a release) and stored
        # in the background once the store takes it
        heal()
        assert await engine.drain(timeout=30)
        stored = await store.get(engine.idempotency_key(ORDER))
        assert stored is not None
        assert stored.response_json() == {"id": 7}
        assert await engine.run(ORDER, fn) == {"id": 7}
        assert fn.count == 1


async def test_a_taken_over_call_cannot_complete_over_the_new_owner(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    t0 = time.time()
    slow_engine = IdempotencyEngine(ddb, key_prefix="orders", clock=lambda: t0)
    later_engine = IdempotencyEngine(ddb, key_prefix="orders", clock=lambda: t0 + 5)
    started, finish = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await asyncio.wait_for(finish.wait(), 10)
        return "slow result"

    # no time left in its invocation: the claim is orphaned at once
    slow_call = asyncio.create_task(
        slow_engine.run(ORDER, slow, lambda_context=FakeLambdaContext(remaining_ms=0))
    )
    await asyncio.wait_for(started.wait(), 10)
    assert await later_engine.run(ORDER, Calls("new owner's result")) == "new owner's result"
    stored = await ddb.get(later_engine.idempotency_key(ORDER))
    finish.set()
    with pytest.raises(IdempotencyClaimLostError) as lost:
        await asyncio.wait_for(slow_call, 10)
    assert lost.value.result == "slow result"
    assert await ddb.get(later_engine.idempotency_key(ORDER)) == stored
    replayed = await IdempotencyEngine(ddb, key_prefix="orders").run(ORDER, Calls("never"))
    assert replayed == "new owner's result"


async def test_asyncio_run_per_invocation_executes_once(moto_server: MotoServer) -> None:
    """End to end: one decorated function, a new event loop for every call."""
    async with fresh_store(moto_server) as store:
        executions: Counter[str] = Counter()

        @idempotent_function_async(data_keyword_argument="order", persistence_store=store)
        async def charge(order: dict[str, Any]) -> dict[str, Any]:
            executions[order["order_id"]] += 1
            return {"charged": order["amount"]}

        def lambda_runtime() -> list[Any]:
            return [asyncio.run(charge(order=ORDER)) for _ in range(3)]

        results = await asyncio.wait_for(asyncio.to_thread(lambda_runtime), timeout=60)
        assert results == [{"charged": 42}] * 3
        assert executions == {"o-1": 1}


async def test_the_sync_shim_drives_the_store_from_its_own_loop(
    ddb: DynamoDBPersistenceLayer,
) -> None:
    executions: list[str] = []

    @idempotent_function(data_keyword_argument="order", persistence_store=ddb)
    def charge(order: dict[str, Any]) -> str:
        executions.append(order["order_id"])
        return "charged"

    def caller() -> list[str]:
        return [charge(order=ORDER) for _ in range(2)]

    assert await asyncio.wait_for(asyncio.to_thread(caller), timeout=60) == ["charged"] * 2
    assert executions == ["o-1"]
    assert await ddb.get(charge.engine.idempotency_key(ORDER, charge)) is not None
