"""How the decorators find the payload of a call: a handler's event by position or by
keyword, a function's payload argument by name, including through ``**kwargs``; a
call without it is refused before the store is touched."""

from __future__ import annotations

from typing import Any

import pytest

from aioidempotency import (
    InMemoryPersistenceLayer,
    idempotent,
    idempotent_async,
    idempotent_function,
)


def test_a_handler_takes_its_event_by_keyword() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[Any] = []

    @idempotent(persistence_store=store)
    def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        runs.append(event)
        return {"ok": event["id"]}

    assert handler(event={"id": 1}, context=None) == {"ok": 1}
    assert handler({"id": 1}) == {"ok": 1}, "by position: the same key, a replay"
    assert runs == [{"id": 1}]


async def test_a_handler_called_without_an_event_is_refused() -> None:
    store = InMemoryPersistenceLayer()

    @idempotent_async(persistence_store=store)
    async def handler(event: Any = None, context: Any = None) -> None:
        raise AssertionError("must not run")

    with pytest.raises(TypeError, match=r"called as handler\(event, context\)"):
        await handler()
    with pytest.raises(TypeError, match=r"called as handler\(event, context\)"):
        await handler(context=None)
    assert len(store) == 0


def test_a_payload_passed_through_var_keywords_is_found() -> None:
    store = InMemoryPersistenceLayer()
    runs: list[Any] = []

    @idempotent_function(data_keyword_argument="order", persistence_store=store)
    def place(**fields: Any) -> Any:
        runs.append(fields["order"])
        return fields["order"]["id"]

    assert place(order={"id": 3}, note="first") == 3
    assert place(order={"id": 3}, note="again") == 3
    assert runs == [{"id": 3}]

    with pytest.raises(RuntimeError, match="Unable to extract 'order'"):
        place(note="no order")
    assert runs == [{"id": 3}]
    assert len(store) == 1


def test_a_payload_argument_the_function_lacks_is_refused_when_decorating() -> None:
    with pytest.raises(TypeError, match=r"place\(\) has no parameter 'order'"):

        @idempotent_function(
            data_keyword_argument="order", persistence_store=InMemoryPersistenceLayer()
        )
        def place(payment: Any) -> Any:
            return payment
