"""The sync cache store's paths on what a server may hold besides its own claims: a
record that vanishes between a claim's two round trips, an orphan whose takeover lock
is held, a value that is not a record and a key of another Redis type (the protocol
path never writes over them), and `wait_replicas` on a client that cannot wait."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from aioidempotency import IdempotencyConfig, SyncIdempotencyEngine
from aioidempotency._lua import LuaScript
from aioidempotency._sync.cache import SyncCachePersistenceLayer
from aioidempotency.exceptions import (
    IdempotencyClaimLostError,
    IdempotencyPersistenceConfigError,
)
from tests.persistence.test_cache_store import completed, in_progress, new_key, tok
from tests.servers.redis import ServerPool


class VanishingClient:
    """A user's own sync client (get/set/delete/run_script on redis-py) that deletes the
    keys in `vanish` right before reading them, as if they expired in between."""

    def __init__(self, inner: redis.Redis) -> None:
        self.inner = inner
        self.vanish: set[str] = set()
        self.vanished: list[str] = []

    def get(self, name: str) -> Any:
        if name in self.vanish:
            self.vanish.discard(name)
            self.vanished.append(name)
            self.inner.delete(name)
        return self.inner.get(name)

    def set(
        self,
        name: str,
        value: str,
        *,
        ex: int | None = None,
        exat: int | None = None,
        nx: bool = False,
    ) -> Any:
        return self.inner.set(name, value, ex=ex, exat=exat, nx=nx)

    def delete(self, *names: str) -> Any:
        return self.inner.delete(*names)

    def run_script(self, script: LuaScript, key: str, args: Any) -> Any:
        return self.inner.eval(script.code, 1, key, *args)


@pytest.fixture
def raw(cache_servers: ServerPool) -> Iterator[redis.Redis]:
    node = cache_servers.standalone("valkey")
    with node.admin() as client:
        yield client


@pytest.mark.parametrize(
    ("atomic", "size"),
    # The atomic path reads a record itself only when it is too large for the script
    # to return (over 64 KiB); the protocol path reads any record its SET NX found.
    [(True, 100_000), (False, 10)],
    ids=["atomic-large-record", "protocol"],
)
def test_a_record_gone_between_the_claim_and_its_read_is_claimed_again(
    raw: redis.Redis, atomic: bool, size: int
) -> None:
    client = VanishingClient(raw)
    layer = SyncCachePersistenceLayer(client, atomic=atomic)
    engine = SyncIdempotencyEngine(layer, IdempotencyConfig(), key_prefix=new_key())
    runs: list[int] = []

    def report(n: int) -> str:
        runs.append(n)
        return f"{n}:" + "x" * size

    assert engine.run({"order": 1}, report, 1) == "1:" + "x" * size
    key = engine.idempotency_key({"order": 1})
    client.vanish.add(key)
    assert engine.run({"order": 1}, report, 2) == "2:" + "x" * size
    assert client.vanished == [key]
    assert runs == [1, 2]
    stored = json.loads(raw.get(key))  # type: ignore[arg-type]
    assert stored["status"] == "COMPLETED"
    assert json.loads(stored["data"]).startswith("2:")


def test_wait_replicas_needs_a_client_that_can_wait(raw: redis.Redis) -> None:
    layer = SyncCachePersistenceLayer(VanishingClient(raw), wait_replicas=1)
    key = new_key()
    assert layer.atomic
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        layer.claim(in_progress(key, "a"), now=time.time())
    assert str(raised.value) == (
        "VanishingClient cannot wait for replicas; wait_replicas needs a redis-py or "
        "valkey-glide client"
    )
    assert raw.get(key) is None  # refused before anything was written


# -- the protocol path on what is not its own claim ---------------------------------------------


def test_an_orphan_whose_takeover_lock_is_held_is_busy(raw: redis.Redis) -> None:
    layer = SyncCachePersistenceLayer(raw, atomic=False)
    key = new_key()
    past = int(time.time() * 1000) - 1000
    assert layer.claim(in_progress(key, "crashed", in_progress_ms=past), now=time.time()).claimed
    raw.set(f"{key}:lock", "True", ex=10)  # another call is taking it over
    refused = layer.claim(in_progress(key, "b"), now=time.time())
    assert not refused.claimed
    assert refused.existing is None
    assert refused.busy
    assert json.loads(raw.get(key))["owner_token"] == tok("crashed")  # type: ignore[arg-type]


@pytest.mark.parametrize("content", ["garbage", "hash"])
def test_what_is_not_a_claim_is_never_completed_renewed_or_released(
    raw: redis.Redis, content: str
) -> None:
    layer = SyncCachePersistenceLayer(raw, atomic=False)
    key = new_key()
    if content == "hash":
        raw.hset(key, "status", "INPROGRESS")
    else:
        raw.set(key, "not a record")

    def unchanged() -> bool:
        if content == "hash":
            return raw.hgetall(key) == {b"status": b"INPROGRESS"}
        return raw.get(key) == b"not a record"

    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        layer.complete(completed(key, 1), owner=tok("a"))
    assert unchanged()
    with pytest.raises(IdempotencyClaimLostError, match="taken over"):
        layer.renew(in_progress(key, "a"))
    assert unchanged()
    layer.release(key, owner=tok("a"))
    assert unchanged()
