"""`IdempotencyConfig` refuses settings it cannot honour when it is built, with an error
that names the setting, instead of failing (or misbehaving) at the first call."""

from __future__ import annotations

from typing import Any

import pytest

from aioidempotency import IdempotencyConfig, IdempotencyPersistenceConfigError


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hash_function": "crc32"}, "unknown hash_function 'crc32'"),
        ({"expires_after_seconds": 0}, "expires_after_seconds must be positive"),
        ({"local_cache_max_items": 0}, "local_cache_max_items must be at least 1"),
        ({"in_progress_lease_seconds": 0}, "in_progress_lease_seconds must be positive"),
        ({"in_progress_lease_seconds": -1.5}, "or None for no lease"),
        ({"wait_for_in_progress_seconds": -0.1}, "wait_for_in_progress_seconds must be >= 0"),
        ({"wait_poll_interval_seconds": 0}, "wait_poll_interval_seconds must be positive"),
        ({"event_key_jmespath": "body.[order"}, "invalid JMESPath expression"),
        ({"payload_validation_jmespath": "amount ||"}, "invalid JMESPath expression"),
    ],
)
def test_a_setting_it_cannot_honour_is_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(IdempotencyPersistenceConfigError, match=message):
        IdempotencyConfig(**settings)


def test_the_hash_functions_listed_are_the_guaranteed_ones() -> None:
    with pytest.raises(IdempotencyPersistenceConfigError) as caught:
        IdempotencyConfig(hash_function="no-such-hash")
    assert "'sha256'" in str(caught.value)


def test_the_limits_themselves_are_accepted() -> None:
    config = IdempotencyConfig(
        hash_function="sha256",
        expires_after_seconds=1,
        local_cache_max_items=1,
        in_progress_lease_seconds=None,
        wait_for_in_progress_seconds=0,
        wait_poll_interval_seconds=0.001,
        event_key_jmespath="body.order",
        payload_validation_jmespath="body.amount",
    )
    assert config.payload_validation_enabled
    assert config.in_progress_lease_seconds is None
    assert not IdempotencyConfig().payload_validation_enabled
