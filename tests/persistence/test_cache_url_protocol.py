"""Cache URLs: ``protocol=3`` makes redis-py speak RESP3 to the server (and the store
works over it); ``protocol=4`` and a port out of range are refused with the option
named."""

from __future__ import annotations

import time
import uuid

import pytest

from aioidempotency import store_from_url
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency.exceptions import IdempotencyPersistenceConfigError
from tests.servers.redis import ServerPool


async def test_protocol_3_speaks_resp3_and_the_store_works(cache_servers: ServerPool) -> None:
    node = cache_servers.standalone("redis")
    name = f"resp3-{uuid.uuid4().hex[:8]}"
    url = f"redis://{node.host}:{node.port}?client=redis&protocol=3&client_name={name}"
    now = int(time.time())
    record = DataRecord(
        idempotency_key=f"url#{uuid.uuid4().hex}",
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=now + 60,
        owner="owner-3",
    )
    async with store_from_url(url) as store:
        assert (await store.claim(record, now=now)).claimed
        found = await store.get(record.idempotency_key)
        assert found is not None
        assert found.owner == "owner-3"
        with node.admin() as admin:
            clients = [c for c in admin.client_list() if c.get("name") == name]
        await store.delete(record.idempotency_key)
    assert clients, "the store's connection carries the URL's client_name"
    assert {c["resp"] for c in clients} == {"3"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://localhost?protocol=4", "protocol"),
        ("redis://localhost:70000", "the port is not a number from 1 to 65535"),
    ],
)
def test_a_protocol_or_port_out_of_range_is_refused(url: str, message: str) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match=message) as raised:
        store_from_url(url)
    assert url in str(raised.value)
