"""The pytest plugin's shared store (a URL other than ``memory://``): a call without a
key during a test is no record to delete, and the keyed records of the test are still
deleted after it. Run in a pytest of its own (`pytester`) on the suite's Redis."""

from __future__ import annotations

import pytest
import redis

from tests.servers.redis import ServerPool
from tests.test_testing_plugin import INI, plugin_args

pytest_plugins = ["pytester"]

TEST = """
import pytest

from aioidempotency import IdempotencyConfig, IdempotencyEngine


async def charge():
    return "paid"


@pytest.mark.asyncio
async def test_calls_with_and_without_a_key(idempotency_store):
    engine = IdempotencyEngine(
        idempotency_store, IdempotencyConfig(event_key_jmespath="id"), key_prefix="plugin"
    )
    with pytest.warns(UserWarning, match="No idempotency key value found"):
        assert await engine.run({"other": 1}, charge) == "paid"
    assert await engine.run({"id": "p-1"}, charge) == "paid"
    key = engine.idempotency_key({"id": "p-1"})
    assert (await idempotency_store.get(key)) is not None
"""


def test_a_call_without_a_key_leaves_nothing_to_delete(
    pytester: pytest.Pytester, cache_servers: ServerPool
) -> None:
    node = cache_servers.standalone("redis")
    db = 8  # a database of its own: the suite's cache backends flush database 0
    with redis.Redis(node.host, node.port, db=db, socket_timeout=5) as admin:
        admin.flushdb()
        pytester.makeini(INI)
        pytester.makepyfile(test_keyless=TEST)
        url = f"redis://{node.host}:{node.port}/{db}?client=redis&timeout=5"
        result = pytester.runpytest_subprocess(
            *plugin_args(), f"--idempotency-store-url={url}", timeout=240
        )
        result.assert_outcomes(passed=1)
        assert admin.dbsize() == 0  # the keyed call's record was deleted after the test
