"""``python -m aioidempotency get|delete|demo --store dynamodb://TABLE?...`` on moto."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer
from aioidempotency._cli import main
from aioidempotency._records import DataRecord, RecordStatus
from tests.backends.dynamodb import fresh_store
from tests.servers.moto import MotoServer


def store_url(store: DynamoDBPersistenceLayer, **extra: str) -> str:
    options = "".join(f"&{name}={value}" for name, value in extra.items())
    return (
        f"dynamodb://{store.table_name}?region=eu-west-1&endpoint_url={store.endpoint_url}{options}"
    )


async def run_cli(*argv: str) -> int:
    return await asyncio.wait_for(asyncio.to_thread(main, list(argv)), 120)


async def test_get_and_delete_a_record(
    moto_server: MotoServer, aws_session: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with fresh_store(
        moto_server, session=aws_session, key_attr="pk", sort_key_attr="sk"
    ) as store:
        record = DataRecord(
            idempotency_key="fn#abc",
            status=RecordStatus.INPROGRESS,
            expiry_timestamp=int(time.time()) + 600,
            owner="owner-1",
        )
        assert (await store.claim(record, now=time.time())).claimed
        url = store_url(store, key_attr="pk", sort_key_attr="sk")
        capsys.readouterr()
        assert await run_cli("get", "--json", "--store", url, "fn#abc") == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["status"] == "INPROGRESS"
        assert shown["owner_token"] == "owner-1"
        assert await run_cli("delete", "--store", url, "fn#abc") == 0
        assert await store.get("fn#abc") is None
        assert await run_cli("get", "--store", url, "fn#abc") == 1


async def test_demo_executes_each_payment_once(
    moto_server: MotoServer, aws_session: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with fresh_store(moto_server, session=aws_session) as store:
        argv = ["demo", "--store", store_url(store), "-n", "20", "-k", "3", "-c", "10"]
        assert await run_cli(*argv, "--no-progress", "--work-ms", "0") == 0
        assert "must equal N: OK" in capsys.readouterr().out
