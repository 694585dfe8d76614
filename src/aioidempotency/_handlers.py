"""What the decorators of both kinds share: finding the payload and the Lambda
context in a call's arguments, and the serializer argument's type."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from aioidempotency._config import LambdaContextLike
from aioidempotency.serialization import BaseIdempotencyModelSerializer, BaseIdempotencySerializer

__all__ = ["OutputSerializer", "PayloadArgument", "handler_event_and_context", "lambda_context_of"]

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
