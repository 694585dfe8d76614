"""Output serializers: how a function's return value becomes stored JSON and back.

A serializer turns the result into JSON-able data (`to_dict`) before it is stored,
and the stored data back into the result type (`from_dict`) on a replay.
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from aioidempotency.exceptions import (
    IdempotencyModelTypeError,
    IdempotencyNoSerializationModelError,
)

__all__ = [
    "BaseIdempotencyModelSerializer",
    "BaseIdempotencySerializer",
    "CustomDictSerializer",
    "DataclassSerializer",
    "NoOpSerializer",
    "PydanticSerializer",
    "resolve_output_serializer",
]


class BaseIdempotencySerializer(abc.ABC):
    """Turns a result into JSON-able data and back."""

    @abc.abstractmethod
    def to_dict(self, data: Any) -> Any:
        """The result as data `json.dumps` accepts."""

    @abc.abstractmethod
    def from_dict(self, data: Any) -> Any:
        """The result rebuilt from stored data."""


class BaseIdempotencyModelSerializer(BaseIdempotencySerializer):
    """A serializer for one model type, which can be built from a return annotation."""

    @classmethod
    @abc.abstractmethod
    def instantiate(cls, model_type: Any) -> BaseIdempotencySerializer:
        """A serializer for `model_type` (None when the function has no annotation)."""


class NoOpSerializer(BaseIdempotencySerializer):
    """The default: the result is stored as it is (it must be JSON-able)."""

    def to_dict(self, data: Any) -> Any:
        return data

    def from_dict(self, data: Any) -> Any:
        return data


class CustomDictSerializer(BaseIdempotencySerializer):
    """A serializer made of two functions."""

    def __init__(self, to_dict: Callable[[Any], Any], from_dict: Callable[[Any], Any]) -> None:
        self._to_dict = to_dict
        self._from_dict = from_dict

    def to_dict(self, data: Any) -> Any:
        return self._to_dict(data)

    def from_dict(self, data: Any) -> Any:
        return self._from_dict(data)


def _actual_type(model_type: Any) -> Any:
    """`X` from `X`, `Optional[X]` or `X | None`; an error for wider unions."""
    origin = typing.get_origin(model_type)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(model_type) if arg is not type(None)]
        if len(members) != 1:
            raise IdempotencyModelTypeError(
                "Invalid type: expected a single type, optionally wrapped in Optional or "
                "Union with None."
            )
        return members[0]
    return model_type


class DataclassSerializer(BaseIdempotencyModelSerializer):
    """Stores a dataclass result as a dict and rebuilds it with `model(**data)`."""

    def __init__(self, model: type[Any]) -> None:
        self._model = model

    def to_dict(self, data: Any) -> Any:
        return dataclasses.asdict(data)

    def from_dict(self, data: Any) -> Any:
        return self._model(**data)

    @classmethod
    def instantiate(cls, model_type: Any) -> BaseIdempotencySerializer:
        model_type = _actual_type(model_type)
        if model_type is None:
            raise IdempotencyNoSerializationModelError("No serialization model was supplied")
        if not (isinstance(model_type, type) and dataclasses.is_dataclass(model_type)):
            raise IdempotencyModelTypeError("Model type is not inherited of dataclass type")
        return cls(model=model_type)


class PydanticSerializer(BaseIdempotencyModelSerializer):
    """Stores a pydantic (v2) model as JSON-mode data and validates it back."""

    def __init__(self, model: type[Any]) -> None:
        self._model = model

    def to_dict(self, data: Any) -> Any:
        return data.model_dump(mode="json")

    def from_dict(self, data: Any) -> Any:
        return self._model.model_validate(data)

    @classmethod
    def instantiate(cls, model_type: Any) -> BaseIdempotencySerializer:
        try:
            from pydantic import BaseModel
        except ImportError as exc:  # pragma: no cover - pydantic is optional
            raise IdempotencyModelTypeError("PydanticSerializer needs pydantic installed") from exc
        model_type = _actual_type(model_type)
        if model_type is None:
            raise IdempotencyNoSerializationModelError("No serialization model was supplied")
        if not (isinstance(model_type, type) and issubclass(model_type, BaseModel)):
            raise IdempotencyModelTypeError("Model type is not inherited from pydantic BaseModel")
        return cls(model=model_type)


def resolve_output_serializer(
    output_serializer: BaseIdempotencySerializer | type[BaseIdempotencyModelSerializer] | None,
    function: Callable[..., Any],
) -> BaseIdempotencySerializer:
    """The serializer to use for `function`: a class is instantiated from its return
    annotation (resolved with `typing.get_type_hints`, so string annotations work)."""
    if output_serializer is None:
        return NoOpSerializer()
    if isinstance(output_serializer, type):
        if not issubclass(output_serializer, BaseIdempotencyModelSerializer):
            raise IdempotencyModelTypeError(
                f"{output_serializer.__name__} is not a model serializer class; pass an instance"
            )
        try:
            hints = typing.get_type_hints(function)
        except Exception as exc:
            hints = getattr(function, "__annotations__", {})
            if isinstance(hints.get("return"), str):
                raise IdempotencyModelTypeError(
                    f"cannot resolve the return annotation {hints['return']!r} of "
                    f"{getattr(function, '__qualname__', function)} ({exc}); define the model "
                    "at module level or pass a serializer instance, e.g. "
                    f"{output_serializer.__name__}(Model)"
                ) from exc
        return output_serializer.instantiate(hints.get("return"))
    return output_serializer
