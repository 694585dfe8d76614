"""Exactly once under load: 4 processes x 100 concurrent calls over 20 keys on one table."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
from collections import Counter
from typing import Any

import pytest

from tests.backends.dynamodb import fresh_store
from tests.servers.moto import MotoServer

PROCESSES = 4
CALLS_PER_PROCESS = 100
KEYS = 20
TIMEOUT = 120.0


async def _calls(table: str, endpoint_url: str, worker: int) -> dict[str, Any]:
    from aioidempotency import IdempotencyAlreadyInProgressError, idempotent_function_async
    from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer

    store = DynamoDBPersistenceLayer(table, endpoint_url=endpoint_url, key_attr="pk")
    executed: list[int] = []

    @idempotent_function_async(data_keyword_argument="job", persistence_store=store)
    async def run_job(job: dict[str, int]) -> dict[str, int]:
        executed.append(job["key"])
        await asyncio.sleep(0)  # let the other calls of this process reach the store
        return {"key": job["key"], "square": job["key"] ** 2}

    async def one(index: int) -> str:
        key = (index + worker) % KEYS
        try:
            result = await run_job(job={"key": key})
        except IdempotencyAlreadyInProgressError:
            return "in progress"
        return "ok" if result == {"key": key, "square": key**2} else f"wrong result {result}"

    async with store:
        outcomes = await asyncio.gather(*(one(i) for i in range(CALLS_PER_PROCESS)))
    return {"executed": executed, "outcomes": Counter(outcomes)}


def _worker(
    table: str, endpoint_url: str, worker: int, start: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    try:
        start.wait(TIMEOUT)
        results.put((worker, asyncio.run(_calls(table, endpoint_url, worker))))
    except BaseException as exc:
        results.put((worker, {"error": repr(exc)}))


@pytest.mark.slow
async def test_four_processes_execute_each_key_exactly_once(moto_server: MotoServer) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    async with fresh_store(moto_server, key_attr="pk") as store:
        processes = [
            context.Process(
                target=_worker,
                args=(store.table_name, moto_server.endpoint_url, worker, start, results),
                daemon=True,
            )
            for worker in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        try:
            reports = [
                await asyncio.to_thread(results.get, True, TIMEOUT) for _ in range(PROCESSES)
            ]
        except queue.Empty:
            pytest.fail(f"a worker gave no answer within {TIMEOUT} s")
        finally:
            for process in processes:
                await asyncio.to_thread(process.join, 10)
                if process.is_alive():
                    process.kill()
        errors = [report for _, report in reports if "error" in report]
        assert not errors
        executed = Counter(key for _, report in reports for key in report["executed"])
        assert executed == Counter({key: 1 for key in range(KEYS)})
        outcomes: Counter[str] = sum((report["outcomes"] for _, report in reports), Counter())
        assert set(outcomes) <= {"ok", "in progress"}
        assert sum(outcomes.values()) == PROCESSES * CALLS_PER_PROCESS
        assert outcomes["ok"] >= KEYS
        client = await store.client()
        scan = await client.scan(TableName=store.table_name, ConsistentRead=True)
        statuses = Counter(item["status"]["S"] for item in scan["Items"])
        assert statuses == {"COMPLETED": KEYS}
