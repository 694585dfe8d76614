"""`store_errors`, the block the engines wrap store calls in: what leaves it."""

from __future__ import annotations

import asyncio

import pytest

from aioidempotency._errors import store_errors
from aioidempotency.exceptions import (
    IdempotencyInvalidRecordError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceLayerError,
    IdempotencyValidationError,
)

MESSAGE = "Failed to save in progress record to idempotency store"


def test_a_block_that_does_not_fail_is_left_alone() -> None:
    done: list[int] = []
    with store_errors(MESSAGE, "fn#k") as entered:
        done.append(1)
    assert entered is None
    assert done == [1]


@pytest.mark.parametrize(
    ("failure", "transient"),
    [(ConnectionResetError("reset"), True), (TimeoutError(), True), (KeyError("x"), False)],
)
def test_a_clients_error_is_wrapped_with_its_cause(failure: Exception, transient: bool) -> None:
    with pytest.raises(IdempotencyPersistenceLayerError) as raised, store_errors(MESSAGE, "fn#k"):
        raise failure
    assert raised.value.__cause__ is failure
    assert raised.value.transient is transient
    assert MESSAGE in str(raised.value)


def test_an_unusable_record_names_its_key_and_how_to_free_it() -> None:
    problem = IdempotencyInvalidStatusError("record 'fn#k' has an invalid status: 'DONE'")
    with (
        pytest.raises(IdempotencyInvalidRecordError, match="delete") as raised,
        store_errors(MESSAGE, "fn#k"),
    ):
        raise problem
    assert raised.value.key == "fn#k"
    assert raised.value.__cause__ is problem


def test_our_own_errors_leave_as_they_are() -> None:
    ours = IdempotencyValidationError("payload does not match")
    with pytest.raises(IdempotencyValidationError) as raised, store_errors(MESSAGE, "fn#k"):
        raise ours
    assert raised.value is ours
    assert raised.value.__cause__ is None


@pytest.mark.parametrize("stop", [asyncio.CancelledError(), KeyboardInterrupt()])
def test_a_cancellation_or_an_interrupt_is_not_the_stores(stop: BaseException) -> None:
    with pytest.raises(type(stop)) as raised, store_errors(MESSAGE, "fn#k"):
        raise stop
    assert raised.value is stop
