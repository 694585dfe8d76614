"""`@idempotent_async` and `@idempotent_function_async`: the async decorators.

Both keep the decorated function's signature and types (ParamSpec) and build one
`IdempotencyEngine` per decorated function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast, overload

from typing_extensions import ParamSpec

from aioidempotency._async.engine import IdempotencyEngine, is_durable_replay
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._config import IdempotencyConfig, LambdaContextLike
from aioidempotency.aws_lambda import ASYNC_HANDLER_ATTR, LambdaHandler, lambda_handler
from aioidempotency.serialization import (
    BaseIdempotencyModelSerializer,
    BaseIdempotencySerializer,
    resolve_output_serializer,
)

__all__ = ["HandlerDecorator", "idempotent_async", "idempotent_function_async"]

P = ParamSpec("P")
R = TypeVar("R")

OutputSerializer = BaseIdempotencySerializer | type[BaseIdempotencyModelSerializer] | None


def lambda_context_of(context: Any) -> LambdaContextLike | None:
    """The Lambda context in a handler's `context` argument, if it has one.

    Accepts a plain Lambda context and a durable-functions context that wraps one.
    """
    inner = getattr(context, "lambda_context", None)
    if inner is not None and callable(getattr(inner, "get_remaining_time_in_millis", None)):
        return inner  # type: ignore[no-any-return]
    if callable(getattr(context, "get_remaining_time_in_millis", None)):
        return context  # type: ignore[no-any-return]
    return None


def handler_event_and_context(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, LambdaContextLike | None]:
    """The (event, Lambda context) of a ``handler(event, context, ...)`` call."""
    if args:
        event = args[0]
    elif "event" in kwargs:
        event = kwargs["event"]
    else:
        raise TypeError("an idempotent handler is called as handler(event, context)")
    context = args[1] if len(args) > 1 else kwargs.get("context")
    return event, lambda_context_of(context)


class PayloadArgument:
    """Finds the payload argument of an ``idempotent_function`` call by name."""

    def __init__(self, function: Callable[..., Any], name: str) -> None:
        self.name = name
        self.signature = inspect.signature(function)
        params = self.signature.parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if name not in params and not takes_kwargs:
            raise TypeError(
                f"{function.__qualname__}() has no parameter {name!r} "
                "(data_keyword_argument must name one of its parameters)"
            )
        self._var_keyword = next(
            (p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )

    def extract(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The payload, whether passed by keyword or by position."""
        if self.name in kwargs:
            return kwargs[self.name]
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if self.name in bound.arguments:
            return bound.arguments[self.name]
        if self._var_keyword and self.name in bound.arguments.get(self._var_keyword, {}):
            return bound.arguments[self._var_keyword][self.name]
        raise RuntimeError(
            f"Unable to extract '{self.name}' from the arguments of this call; pass it "
            "as an argument (by keyword or by position)"
        )


def engine_for(
    function: Callable[..., Any],
    persistence_store: PersistenceLayer,
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


def _require_coroutine_function(function: Callable[..., Any], sync_name: str) -> None:
    if not inspect.iscoroutinefunction(function):
        raise TypeError(
            f"{getattr(function, '__qualname__', function)!r} is not an async function; "
            f"use @{sync_name} for plain def functions"
        )


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
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...


def idempotent_async(
    *,
    persistence_store: PersistenceLayer,
    config: IdempotencyConfig | None = None,
    key_prefix: str | None = None,
    output_serializer: OutputSerializer = None,
) -> HandlerDecorator:
    """Make an ``async def handler(event, context)`` Lambda handler idempotent.

    The payload is the event; the claim expires with the invocation's remaining time
    (``context.get_remaining_time_in_millis()``). Over ``@lambda_handler`` it makes
    the async handler inside idempotent and keeps the sync wrapper outermost.
    """

    def decorate(handler: Any) -> Any:
        inner = getattr(handler, ASYNC_HANDLER_ATTR, None)
        if inner is not None:
            return lambda_handler(decorate(inner))
        _require_coroutine_function(handler, "idempotent")
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

        wrapper.engine = engine  # type: ignore[attr-defined]
        return wrapper

    return cast(HandlerDecorator, decorate)


def idempotent_function_async(
    *,
    data_keyword_argument: str,
    persistence_store: PersistenceLayer,
    config: IdempotencyConfig | None = None,
    output_serializer: OutputSerializer = None,
    key_prefix: str | None = None,
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Make any ``async def`` idempotent on one of its arguments.

    The payload is the argument named ``data_keyword_argument``, passed by keyword or
    by position. ``output_serializer`` may be a serializer or a model serializer class
    (instantiated from the function's return annotation).
    """

    def decorate(
        function: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        _require_coroutine_function(function, "idempotent_function")
        argument = PayloadArgument(function, data_keyword_argument)
        engine = engine_for(function, persistence_store, config, key_prefix, output_serializer)

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            payload = argument.extract(args, kwargs)
            return await engine.run_for(
                payload, functools.partial(function, *args, **kwargs), key_source=function
            )

        wrapper.engine = engine  # type: ignore[attr-defined]
        return wrapper

    return decorate
