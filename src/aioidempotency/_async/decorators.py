"""`@idempotent_async` and `@idempotent_function_async`: the decorators.

Both keep the decorated function's signature and types (ParamSpec) and build one
`IdempotencyEngine` per decorated function, reachable as the wrapper's ``engine``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast, overload

from typing_extensions import ParamSpec

from aioidempotency._async.engine import IdempotencyEngine
from aioidempotency._calls import is_durable_replay
from aioidempotency._config import IdempotencyConfig
from aioidempotency._handlers import OutputSerializer, PayloadArgument, handler_event_and_context
from aioidempotency._twins import StoreForAsync

# begin async-only
from aioidempotency.aws_lambda import ASYNC_HANDLER_ATTR, LambdaHandler, lambda_handler

# end async-only
from aioidempotency.serialization import resolve_output_serializer

__all__ = ["IdempotentFunction", "idempotent_async", "idempotent_function_async"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class IdempotentFunction(Protocol[P, R_co]):
    """A decorated function: called as the function it wraps; ``engine`` runs it."""

    engine: IdempotencyEngine

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    @property
    def __wrapped__(self) -> Callable[P, R_co]:
        """The function it wraps (set by `functools.wraps`), called without the engine."""
        ...


def engine_for(
    function: Callable[..., Any],
    persistence_store: StoreForAsync,
    config: IdempotencyConfig | None,
    key_prefix: str | None,
    output_serializer: OutputSerializer,
) -> IdempotencyEngine:
    """The engine of one decorated function (its serializer resolved from it)."""
    return IdempotencyEngine(
        persistence_store,
        config,
        key_prefix=key_prefix,
        output_serializer=resolve_output_serializer(output_serializer, function),
    )


def require_coroutine_function(function: Callable[..., Any], other: str) -> None:
    """Refuse a function of the other kind, naming the decorator it needs."""
    if not inspect.iscoroutinefunction(function):  # async-only
        # sync-only: if inspect.iscoroutinefunction(function):
        kind = "not an async function"  # async-only
        # sync-only: kind = "an async function"
        name = getattr(function, "__qualname__", function)
        raise TypeError(f"{name!r} is {kind}; use @{other} for it")


# begin async-only
class HandlerDecorator(Protocol):
    """What `idempotent_async(...)` returns: it decorates an async handler, or a
    `lambda_handler` (which stays the sync handler the Lambda runtime calls)."""

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, handler: LambdaHandler[P, R], /
    ) -> LambdaHandler[P, R]: ...

    @overload
    def __call__(
        self, handler: Callable[P, Coroutine[Any, Any, R]], /
    ) -> IdempotentFunction[P, Coroutine[Any, Any, R]]: ...


# end async-only
def idempotent_async(
    *,
    persistence_store: StoreForAsync,
    config: IdempotencyConfig | None = None,
    key_prefix: str | None = None,
    output_serializer: OutputSerializer = None,
) -> HandlerDecorator:  # async-only
    # sync-only: ) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]:
    """Make a Lambda handler ``handler(event, context)`` idempotent.

    The payload is the event; the claim expires with the invocation's remaining time
    (``context.get_remaining_time_in_millis()``).
    """

    def decorate(handler: Any) -> Any:
        # begin async-only
        inner = getattr(handler, ASYNC_HANDLER_ATTR, None)
        if inner is not None:  # over @lambda_handler: the sync wrapper stays outermost
            return lambda_handler(decorate(inner))
        # end async-only
        require_coroutine_function(handler, "idempotent")  # async-only
        # sync-only: require_plain_function(handler, "idempotent_async")
        engine = engine_for(handler, persistence_store, config, key_prefix, output_serializer)

        @functools.wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            event, context = handler_event_and_context(args, kwargs)
            raw_context = args[1] if len(args) > 1 else kwargs.get("context")
            return await engine.run_for(
                event,
                functools.partial(handler, *args, **kwargs),
                key_source=handler,
                lambda_context=context,
                durable_replay=is_durable_replay(raw_context),
            )

        decorated = cast(IdempotentFunction[..., Any], wrapper)
        decorated.engine = engine
        return decorated

    return cast(HandlerDecorator, decorate)  # async-only
    # sync-only: return decorate


def idempotent_function_async(
    *,
    data_keyword_argument: str,
    persistence_store: StoreForAsync,
    config: IdempotencyConfig | None = None,
    output_serializer: OutputSerializer = None,
    key_prefix: str | None = None,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], IdempotentFunction[P, Coroutine[Any, Any, R]]]:
    """Make any function idempotent on one of its arguments.

    The payload is the argument named ``data_keyword_argument``, passed by keyword or
    by position. ``output_serializer`` may be a serializer or a model serializer class
    (instantiated from the function's return annotation).
    """

    def decorate(
        function: Callable[P, Coroutine[Any, Any, R]],
    ) -> IdempotentFunction[P, Coroutine[Any, Any, R]]:
        require_coroutine_function(function, "idempotent_function")  # async-only
        # sync-only: require_plain_function(function, "idempotent_function_async")
        argument = PayloadArgument(function, data_keyword_argument)
        engine = engine_for(function, persistence_store, config, key_prefix, output_serializer)

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            payload = argument.extract(args, kwargs)
            # The engine finds a registered Lambda context itself (prepare_call).
            return await engine.run_for(
                payload, functools.partial(function, *args, **kwargs), key_source=function
            )

        decorated = cast(IdempotentFunction[P, Coroutine[Any, Any, R]], wrapper)
        decorated.engine = engine
        return decorated

    return decorate
