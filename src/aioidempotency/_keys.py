"""From a payload to an idempotency key and a validation hash (Powertools-identical)."""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jmespath
import jmespath.functions
import jmespath.parser
import jmespath.visitor

from aioidempotency._config import IdempotencyConfig
from aioidempotency._encoding import dumps_key_data
from aioidempotency.exceptions import IdempotencyPayloadError, IdempotencyPersistenceConfigError

__all__ = [
    "PowertoolsFunctions",
    "default_key_prefix",
    "hash_data",
    "is_missing_idempotency_key",
    "prepare_payload",
    "select_key_data",
    "select_validation_data",
]


class PowertoolsFunctions(jmespath.functions.Functions):  # type: ignore[misc]
    """The JMESPath functions Powertools adds: `powertools_json`, `powertools_base64`
    and `powertools_base64_gzip`."""

    @jmespath.functions.signature({"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_powertools_json(self, value: str) -> Any:
        return json.loads(value)

    @jmespath.functions.signature({"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_powertools_base64(self, value: str) -> str:
        return base64.b64decode(value).decode()

    @jmespath.functions.signature({"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_powertools_base64_gzip(self, value: str) -> str:
        return gzip.decompress(base64.b64decode(value)).decode()


@functools.lru_cache(maxsize=1)
def _default_options() -> jmespath.Options:
    return jmespath.Options(custom_functions=PowertoolsFunctions())


@functools.lru_cache(maxsize=1)
def _default_interpreter() -> jmespath.visitor.TreeInterpreter:
    """The interpreter of the default options, shared by every search that uses them:
    `ParsedResult.search` builds one per call, and each leaves a reference cycle (its
    method cache holds its bound methods) for the garbage collector to find, three
    objects per key derived. It keeps no state between searches."""
    return jmespath.visitor.TreeInterpreter(_default_options())


def _options(config: IdempotencyConfig) -> jmespath.Options:
    if config.jmespath_options:
        return jmespath.Options(**config.jmespath_options)
    return _default_options()


_PLAIN = frozenset({dict, list, str})
"""Payload types that are plain data as they are (exactly these: a subclass may wrap)."""


def prepare_payload(payload: Any, *, deep_copy: bool = False) -> Any:
    """The payload as plain data: dataclasses, pydantic models, objects with `.dict()`
    and event wrappers with `raw_event` are unwrapped.

    Key derivation only reads the payload (JMESPath and `json.dumps` never change it),
    so no copy is made unless `deep_copy` asks for one: the engine does when custom
    JMESPath functions, which could mutate their input, are configured.
    """
    try:
        if type(payload) in _PLAIN:  # the usual case: nothing to unwrap
            data: Any = payload
        elif dataclasses.is_dataclass(payload) and not isinstance(payload, type):
            data = dataclasses.asdict(payload)
        elif callable(getattr(payload, "model_dump", None)):
            data = payload.model_dump(mode="json")
        elif callable(getattr(payload, "dict", None)):
            data = payload.dict()
        else:
            data = getattr(payload, "raw_event", payload)
        return copy.deepcopy(data) if deep_copy else data
    except RecursionError as exc:
        raise IdempotencyPayloadError(
            "the payload is nested too deeply to compute an idempotency key"
        ) from exc


def _search(
    expression: jmespath.parser.ParsedResult, source: str, data: Any, config: IdempotencyConfig
) -> Any:
    try:
        if not config.jmespath_options:
            return _default_interpreter().visit(expression.parsed, data)
        return expression.search(data, options=_options(config))
    except Exception as exc:
        # e.g. powertools_json() of a missing body or of text that is not JSON
        raise IdempotencyPayloadError(
            f"cannot select {source}={expression.expression!r} from the payload: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def select_key_data(data: Any, config: IdempotencyConfig) -> Any:
    """The part of the prepared payload that the key is computed from.

    Raises `IdempotencyPayloadError` when the expression fails on this payload.
    """
    if config._event_key is None:
        return data
    return _search(config._event_key, "event_key_jmespath", data, config)


def select_validation_data(data: Any, config: IdempotencyConfig) -> Any:
    """The part of the prepared payload that the validation hash is computed from.

    Raises `IdempotencyPayloadError` when the expression fails on this payload.
    """
    if config._validation_key is None:
        return None
    return _search(config._validation_key, "payload_validation_jmespath", data, config)


def is_missing_idempotency_key(data: Any) -> bool:
    """True when the selected data cannot key a call (all None, empty or falsy).

    Numbers and booleans are valid keys, `0` and `False` included.
    """
    if isinstance(data, dict):
        return all(value is None for value in data.values())
    if isinstance(data, (list, tuple)):
        return all(item is None for item in data)
    if isinstance(data, (int, float, bool)):
        return False
    return not data


@functools.lru_cache(maxsize=16)
def _hasher(name: str) -> Callable[[bytes], Any]:
    constructor = getattr(hashlib, name, None)  # hashlib.md5 & co. beat hashlib.new(name)
    if constructor is not None and name in hashlib.algorithms_guaranteed:
        return functools.partial(constructor, usedforsecurity=False)
    if name not in hashlib.algorithms_available:
        raise IdempotencyPersistenceConfigError(f"unknown hash function {name!r}")
    return functools.partial(hashlib.new, name, usedforsecurity=False)


def hash_data(data: Any, hash_function: str = "md5") -> str:
    """Hex digest of `data` serialised as the reference does."""
    try:
        text = dumps_key_data(data)
    except (TypeError, ValueError) as exc:
        raise IdempotencyPayloadError(
            f"the payload cannot be serialised to compute an idempotency key: {exc}"
        ) from exc
    except RecursionError as exc:
        raise IdempotencyPayloadError(
            "the payload is nested too deeply to compute an idempotency key"
        ) from exc
    digest = _hasher(hash_function)(text.encode())
    return str(digest.hexdigest())


def default_key_prefix(fn: Callable[..., Any]) -> str:
    """The reference's prefix: ``{AWS_LAMBDA_FUNCTION_NAME or 'test-func'}.{module}.{qualname}``.

    Raises `IdempotencyPersistenceConfigError` for callables with no stable name
    (lambdas, partials, callable objects): pass `key_prefix` for those.
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<lambda>" in qualname:
        raise IdempotencyPersistenceConfigError(
            f"cannot derive a stable idempotency key prefix from {fn!r} (a lambda, a partial "
            "or a callable object); pass key_prefix=... explicitly"
        )
    return function_key_prefix(f"{module}.{qualname}")


def function_key_prefix(dotted_name: str) -> str:
    """The prefix of the function ``module.qualname``:
    ``{AWS_LAMBDA_FUNCTION_NAME or 'test-func'}.{module}.{qualname}``."""
    function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "test-func")
    return f"{function_name}.{dotted_name}"
