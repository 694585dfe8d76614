"""``python -m aioidempotency get|delete --store redis://...``: every field of a record
is shown (lease, validation hash, owner, stored result), a missing key exits 1, and a
bad store URL is an error, not a traceback. On a real Redis server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid

import pytest

from aioidempotency import store_from_url
from aioidempotency._cli import main
from aioidempotency._records import DataRecord, RecordStatus
from tests.servers.redis import ServerPool


async def run_cli(*argv: str) -> int:
    return await asyncio.wait_for(asyncio.to_thread(main, list(argv)), 60)


@pytest.fixture
def redis_url(cache_servers: ServerPool) -> str:
    node = cache_servers.standalone("redis")
    return f"redis://{node.host}:{node.port}?timeout=5"


async def test_get_shows_every_field_of_a_claim(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = f"cli#{uuid.uuid4().hex}"
    now = int(time.time())
    lease_ms = (now + 60) * 1000
    record = DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=now + 600,
        in_progress_expiry_timestamp=lease_ms,
        payload_hash="5d41402abc4b2a76b9719d911017c592",
        owner="owner-7-0123456789abcdef",
    )
    async with store_from_url(redis_url) as store:
        assert (await store.claim(record, now=now)).claimed
        capsys.readouterr()
        assert await run_cli("get", "--json", "--store", redis_url, key) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown == {
            "key": key,
            "status": "INPROGRESS",
            "expiration": now + 600,
            "expires_at": dt.datetime.fromtimestamp(now + 600, tz=dt.timezone.utc).isoformat(),
            "in_progress_expiration": lease_ms,
            "in_progress_expires_at": dt.datetime.fromtimestamp(
                now + 60, tz=dt.timezone.utc
            ).isoformat(),
            "validation": "5d41402abc4b2a76b9719d911017c592",
            "owner_token": "owner-7-0123456789abcdef",
        }

        await store.complete(
            DataRecord(
                idempotency_key=key,
                status=RecordStatus.COMPLETED,
                expiry_timestamp=now + 600,
                response_data='{"paid": 12}',
                payload_hash="5d41402abc4b2a76b9719d911017c592",
            ),
            owner="owner-7-0123456789abcdef",
        )
        assert await run_cli("get", "--json", "--store", redis_url, key) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["status"] == "COMPLETED"
        assert json.loads(shown["data"]) == {"paid": 12}
        assert "in_progress_expiration" not in shown

        assert await run_cli("delete", "--yes", "--store", redis_url, key) == 0
        assert capsys.readouterr().out.strip() == f"deleted {key!r}"
        assert await store.get(key) is None


async def test_a_missing_key_exits_1(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    key = f"cli#{uuid.uuid4().hex}"
    capsys.readouterr()
    assert await run_cli("get", "--store", redis_url, key) == 1
    assert capsys.readouterr().err.strip() == f"no record under {key!r}"
    assert await run_cli("delete", "--store", redis_url, key) == 1
    assert capsys.readouterr().out.strip() == f"no record under {key!r}"


async def test_a_bad_store_url_is_an_error_message(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert await run_cli("delete", "--store", "redis://localhost?client=jedis", "k") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown client 'jedis'")
    assert "Traceback" not in err
