"""One reader of records: whatever lies under a key, the cache store's claim decides
exactly what `RecordAttributes.from_json` (records.py) says, on real servers.

Hypothesis writes raw values (valid records of many shapes and sizes, values that are
not usable, another Redis type) with an admin client, claims the key at a chosen `now`
and checks the outcome against records.py: claimed iff the key is free or the record is
claimable at `now`; otherwise the existing record is exactly the parsed one and the
stored value is unchanged byte for byte; an unusable value raises
`IdempotencyInvalidStatusError` and is unchanged too.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._async.store import ClaimResult
from aioidempotency._records import DataRecord, RecordAttributes, RecordStatus
from aioidempotency.exceptions import IdempotencyInvalidStatusError
from tests.servers.redis import Kind, Server, ServerPool

#: The region of time the examples live in (epoch seconds).
T = 1_800_000_000
ATTRS = RecordAttributes()
HASH = object()  # stands for "a Redis hash under the key"
ABSENT = object()  # nothing under the key

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Sizes that sit around the store's thresholds (4 KiB fingerprint, 64 KiB owner check).
pad_sizes = st.sampled_from([0, 1, 900, 2047, 2048, 2100, 4000, 4097, 6000, 66_000, 70_000])
# Text that could confuse a scanner: quotes, escapes, our attribute names, braces.
tricky = st.sampled_from(
    ['"status": "INPROGRESS"', '\\"expiration\\": 1', "}{", "\u00e9\u2028", '\\"', "owner_token"]
)


def seconds(offset: st.SearchStrategy[int]) -> st.SearchStrategy[int | float]:
    """A timestamp near T, stored as an int or a float (both are valid)."""
    return st.tuples(offset, st.booleans(), st.sampled_from([0.0, 0.25, 0.999])).map(
        lambda t: T + t[0] if t[1] else float(T + t[0]) + t[2]
    )


@st.composite
def valid_pairs(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """The (name, value) pairs of a record records.py accepts, in any order, with extras."""
    status = draw(st.sampled_from(["INPROGRESS", "COMPLETED"]))
    pairs: list[tuple[str, Any]] = [
        ("status", status),
        ("expiration", draw(seconds(st.integers(-4, 4)))),
    ]
    if draw(st.booleans()):
        ms = draw(st.integers(-4000, 4000))
        pairs.append(("in_progress_expiration", T * 1000 + ms + draw(st.sampled_from([0, 0.5]))))
    # data may be absent from a COMPLETED record (a stored None) or present in another
    if (status == "COMPLETED" or draw(st.booleans())) and draw(st.integers(0, 5)):
        filler = "x" * draw(pad_sizes)
        data = json.dumps({"r": draw(json_value), "pad": filler, "t": draw(tricky)})
        pairs.append(("data", data))
    if draw(st.booleans()):
        pairs.append(("validation", uuid.UUID(int=draw(st.integers(0, 2**64))).hex))
    if draw(st.booleans()):
        pairs.append(("owner_token", f"{draw(st.integers(0, 2**128 - 1)):032x}"))
    for index in range(draw(st.integers(0, 3))):
        pairs.append((f"extra{index}", draw(json_value)))
    if draw(st.booleans()):
        pairs.append(("padding", "p" * draw(pad_sizes) + draw(tricky)))
    order = draw(st.permutations(range(len(pairs))))
    pairs = [pairs[i] for i in order]
    if draw(st.integers(0, 4)) == 0:  # a duplicate key: the last one counts
        name, value = draw(st.sampled_from(pairs))
        pairs.insert(0, (name, draw(st.one_of(json_value, st.just(value)))))
    return pairs


CORRUPTIONS = [
    ("status", None),  # removed
    ("status", "DONE"),
    ("status", 1),
    ("status", "EXPIRED"),
    ("expiration", None),
    ("expiration", str(T)),
    ("expiration", math.nan),
    ("expiration", math.inf),
    ("expiration", True),
    ("in_progress_expiration", str(T * 1000)),
    ("data", 123),
    ("data", {"nested": True}),
]


@st.composite
def unusable_pairs(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """A record made unusable by one change records.py refuses."""
    pairs = draw(valid_pairs())
    name, bad = draw(st.sampled_from(CORRUPTIONS))
    pairs = [(n, v) for n, v in pairs if n != name]
    if bad is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), (name, bad))
    return pairs


def key_text(name: str, escape_at: int | None) -> str:
    """`name` as a JSON object key, one character written as a \\uXXXX escape."""
    if escape_at is None or not name:
        return json.dumps(name)
    i = escape_at % len(name)
    return '"' + name[:i] + f"\\u{ord(name[i]):04x}" + name[i + 1 :] + '"'


@st.composite
def render(draw: st.DrawFn, pairs: list[tuple[str, Any]]) -> bytes:
    """The pairs as a JSON object text, with drawn separators and escaped keys."""
    item_sep, key_sep = draw(st.sampled_from([(", ", ": "), (",", ":"), (" ,\n ", " :\t")]))
    parts = []
    for name, value in pairs:
        escape = draw(st.one_of(st.none(), st.integers(0, 30)))
        parts.append(key_text(name, escape) + key_sep + json.dumps(value))
    return ("{" + item_sep.join(parts) + "}").encode()


NOT_RECORDS = [
    b"",
    b"not json",
    b"{",
    b"[1, 2]",
    b'"text"',
    b"null",
    b"123",
    b"\xff\xfe{",
    b'{"status": "COMPLETED", "expiration": NaN, "data": "1"}',
    b"x" * 70_000,
]


@st.composite
def stored_values(draw: st.DrawFn) -> object:
    """What lies under the key: nothing, a valid record, an unusable one, another type."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "unusable", "garbage", "other"]))
    if kind == "valid":
        return draw(render(draw(valid_pairs())))
    if kind == "unusable":
        return draw(render(draw(unusable_pairs())))
    if kind == "garbage":
        return draw(st.sampled_from(NOT_RECORDS))
    return draw(st.sampled_from([ABSENT, HASH]))


def expected(key: str, value: object, now: float) -> DataRecord | Exception | None:
    """What records.py says: None (the claim wins), the existing record, or the error."""
    if value is ABSENT:
        return None
    if value is HASH:
        return IdempotencyInvalidStatusError("a hash")
    assert isinstance(value, bytes)
    try:
        record = ATTRS.from_json(key, value)
    except IdempotencyInvalidStatusError as exc:
        return exc
    return None if record.is_claimable(now) else record


BACKENDS = [
    pytest.param("valkey", "glide", True, id="valkey-glide-atomic"),
    pytest.param("valkey", "glide", False, id="valkey-glide-protocol"),
    pytest.param("redis", "redis", True, id="redis-redispy-atomic"),
    pytest.param("redis", "redis", False, id="redis-redispy-protocol"),
]


@pytest.mark.parametrize(("kind", "client", "atomic"), BACKENDS)
async def test_the_claim_classifies_every_value_as_records_py_does(
    cache_servers: ServerPool, kind: Kind, client: str, atomic: bool
) -> None:
    """Hypothesis drives the examples from a worker thread; each claim runs on this
    test's loop, which stays running (a glide client hangs on a loop that is open but
    idle while other glide clients live in the process)."""
    loop = asyncio.get_running_loop()
    server: Server = cache_servers.standalone(kind)
    query = f"client={client}&atomic={str(atomic).lower()}&timeout=10"
    layer = CachePersistenceLayer.from_url(f"redis://{server.host}:{server.port}?{query}")
    admin = server.admin()

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(value=stored_values(), now_ms=st.integers(-6000, 6000))
    def check(value: object, now_ms: int) -> None:
        key = f"property#{uuid.uuid4().hex}"
        now = T + now_ms / 1000
        if value is HASH:
            admin.hset(key, "status", "COMPLETED")
        elif isinstance(value, bytes):  # else ABSENT: stored_values draws nothing else
            admin.set(key, value, ex=3600)
        before = admin.dump(key)
        mine = DataRecord(
            key, RecordStatus.INPROGRESS, int(now) + 600, owner=uuid.uuid4().hex, payload_hash="v"
        )
        want = expected(key, value, now)
        try:
            if isinstance(want, Exception):
                with pytest.raises(IdempotencyInvalidStatusError):
                    on_loop(layer.claim(mine, now=now))
                assert admin.dump(key) == before, "an unusable value was changed"
                return
            result = on_loop(layer.claim(mine, now=now))
            if want is None:
                assert result.claimed, (value, now)
                assert admin.get(key) == ATTRS.to_json(mine).encode()
            else:
                assert not result.claimed, (value, now)
                assert result.existing == want
                assert admin.dump(key) == before, "a live record was changed"
        finally:
            admin.delete(key, f"{key}:lock")

    def on_loop(claim: Coroutine[Any, Any, ClaimResult]) -> ClaimResult:
        return asyncio.run_coroutine_threadsafe(claim, loop).result(timeout=60)

    try:
        await asyncio.wait_for(asyncio.to_thread(check), 600)
    finally:
        await layer.aclose()
        admin.close()
