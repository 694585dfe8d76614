"""The engine's local cache (`use_local_cache=True`): completed records only, the least
recently used out first once `local_cache_max_items` are kept, expired records gone on
the engine's clock, and nothing at all when it is off."""

from __future__ import annotations

from aioidempotency._local_cache import LocalCache
from aioidempotency._records import DataRecord, RecordStatus


class Clock:
    """Epoch seconds that the test moves."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(
    key: str, *, expires: int = 5_000, status: RecordStatus = RecordStatus.COMPLETED
) -> DataRecord:
    return DataRecord(
        idempotency_key=key,
        status=status,
        expiry_timestamp=expires,
        response_data='"ok"',
    )


def test_the_least_recently_used_record_goes_first() -> None:
    cache = LocalCache(enabled=True, max_items=2, clock=Clock())
    a, b, c = record("a"), record("b"), record("c")
    cache.put(a)
    cache.put(b)
    assert cache.get("a") is a  # now the most recently used
    cache.put(c)
    assert cache.get("b") is None
    assert cache.get("a") is a
    assert cache.get("c") is c


def test_putting_a_key_again_replaces_its_record_and_refreshes_it() -> None:
    cache = LocalCache(enabled=True, max_items=2, clock=Clock())
    cache.put(record("a"))
    cache.put(record("b"))
    newer = record("a", expires=6_000)
    cache.put(newer)
    cache.put(record("c"))
    assert cache.get("a") is newer
    assert cache.get("b") is None


def test_an_expired_record_is_a_miss_and_leaves_the_cache() -> None:
    clock = Clock(1_000)
    cache = LocalCache(enabled=True, max_items=2, clock=clock)
    lasting, expiring = record("lasting", expires=9_000), record("expiring", expires=1_100)
    cache.put(lasting)
    cache.put(expiring)
    assert cache.get("expiring") is expiring
    clock.now = 1_100.9  # still within its last second
    assert cache.get("expiring") is expiring
    clock.now = 1_101
    assert cache.get("expiring") is None
    # It left: a new record fits without pushing out the older one still live.
    cache.put(record("new"))
    assert cache.get("lasting") is lasting
    clock.now = 1_000  # and a clock going back does not bring it back
    assert cache.get("expiring") is None


def test_only_completed_records_are_kept() -> None:
    cache = LocalCache(enabled=True, max_items=4, clock=Clock())
    cache.put(record("running", status=RecordStatus.INPROGRESS))
    assert cache.get("running") is None


def test_a_discarded_key_is_forgotten() -> None:
    cache = LocalCache(enabled=True, max_items=4, clock=Clock())
    kept, dropped = record("kept"), record("dropped")
    cache.put(kept)
    cache.put(dropped)
    cache.discard("dropped")
    cache.discard("never-there")
    assert cache.get("dropped") is None
    assert cache.get("kept") is kept


def test_a_disabled_cache_keeps_nothing() -> None:
    cache = LocalCache(enabled=False, max_items=4, clock=Clock())
    cache.put(record("a"))
    assert cache.get("a") is None
    cache.discard("a")
    assert cache.get("a") is None
