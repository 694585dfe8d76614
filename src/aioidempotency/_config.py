"""`IdempotencyConfig`: what to key on, how long to remember, how to behave when busy."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import jmespath
import jmespath.parser

from aioidempotency.exceptions import IdempotencyPersistenceConfigError

if TYPE_CHECKING:
    from aioidempotency._events import EventListener
    from aioidempotency._records import DataRecord

__all__ = [
    "IdempotencyConfig",
    "IdempotentHookFunction",
    "LambdaContextLike",
    "ResponseHook",
    "usable_hash_functions",
]


class LambdaContextLike(Protocol):
    """The part of a Lambda context the engine uses."""

    def get_remaining_time_in_millis(self) -> int: ...


class IdempotentHookFunction(Protocol):
    """A response hook, under Powertools' name: called as ``hook(response, record)``
    on every replay, and what it returns is returned to the caller.

    Powertools' parameter names; positional-only here, since the engine passes both
    positionally, so a hook may name them as it likes.
    """

    def __call__(self, response: Any, idempotent_data: DataRecord, /) -> Any: ...


ResponseHook = Callable[[Any, "DataRecord"], Any]
"""Called as ``hook(response, record)`` on every replay; its return value is returned."""


@functools.cache
def _usable_hash_functions() -> tuple[str, ...]:
    usable = []
    for name in sorted(hashlib.algorithms_available):
        try:
            hashlib.new(name, b"", usedforsecurity=False).hexdigest()
        except (TypeError, ValueError):  # shake_128/256 need a length; some are disabled
            continue
        usable.append(name)
    return tuple(usable)


def usable_hash_functions() -> list[str]:
    """hashlib's algorithms that give a hex digest without a length (not ``shake_*``):
    the values `IdempotencyConfig.hash_function` accepts, sorted."""
    return list(_usable_hash_functions())


_registered_context: contextvars.ContextVar[LambdaContextLike | None] = contextvars.ContextVar(
    "aioidempotency_lambda_context", default=None
)


@dataclasses.dataclass(frozen=True)
class IdempotencyConfig:
    """Settings of an idempotent function; immutable once built.

    The first nine knobs are Powertools' (same names, same defaults). Ours:

    - `in_progress_lease_seconds`: for calls without a Lambda context, a claim expires
      this long after it was last renewed, and is renewed in the background (between a
      third and a half of it after the last renewal) while the function runs. A crashed
      worker's key is free again within one lease; a slow but live one keeps it. `None`
      restores the reference behaviour (the claim lasts the whole
      `expires_after_seconds`).
    - `wait_for_in_progress_seconds`: a duplicate that finds the key in progress waits
      up to this long for the first call's result instead of failing at once with
      `IdempotencyAlreadyInProgressError`. 0 (the default) keeps the reference
      behaviour.
    - `wait_poll_interval_seconds`: first pause between two reads of the store while
      waiting; it doubles up to 1 s. Duplicates in one process do not poll at all.
    - `lambda_context` (keyword-only, as in Powertools): the invocation's context. A
      call given no context of its own and with none registered in its task or thread
      (`register_lambda_context`) bounds its claim by this context's remaining time.
      Not compared, not in the repr.
    - `on_event` (keyword-only): called with an `aioidempotency.events.IdempotencyEvent`
      for every decision about a call (see docs/observability.md); it must be quick,
      and an exception it raises is logged, never raised to the call.
    """

    event_key_jmespath: str = ""
    payload_validation_jmespath: str = ""
    jmespath_options: dict[str, Any] | None = None
    raise_on_no_idempotency_key: bool = False
    expires_after_seconds: int = 60 * 60
    use_local_cache: bool = False
    local_cache_max_items: int = 256
    hash_function: str = "md5"
    response_hook: ResponseHook | None = None
    in_progress_lease_seconds: float | None = 60.0
    wait_for_in_progress_seconds: float = 0.0
    wait_poll_interval_seconds: float = 0.05
    on_event: EventListener | None = dataclasses.field(default=None, kw_only=True)
    lambda_context: LambdaContextLike | None = dataclasses.field(
        default=None, kw_only=True, repr=False, compare=False
    )

    _event_key: jmespath.parser.ParsedResult | None = dataclasses.field(
        init=False, repr=False, compare=False, default=None
    )
    _validation_key: jmespath.parser.ParsedResult | None = dataclasses.field(
        init=False, repr=False, compare=False, default=None
    )

    def __post_init__(self) -> None:
        usable = _usable_hash_functions()
        if self.hash_function not in usable:
            problem = (
                f"hash_function {self.hash_function!r} cannot be used: its digest needs a "
                "length, or this Python refuses it"
                if self.hash_function in hashlib.algorithms_available
                else f"unknown hash_function {self.hash_function!r}"
            )
            raise IdempotencyPersistenceConfigError(f"{problem}; choose one of {list(usable)}")
        if self.expires_after_seconds <= 0:
            raise IdempotencyPersistenceConfigError("expires_after_seconds must be positive")
        if self.local_cache_max_items < 1:
            raise IdempotencyPersistenceConfigError("local_cache_max_items must be at least 1")
        lease = self.in_progress_lease_seconds
        if lease is not None and lease <= 0:
            raise IdempotencyPersistenceConfigError(
                "in_progress_lease_seconds must be positive, or None for no lease"
            )
        if self.wait_for_in_progress_seconds < 0:
            raise IdempotencyPersistenceConfigError("wait_for_in_progress_seconds must be >= 0")
        if self.wait_poll_interval_seconds <= 0:
            raise IdempotencyPersistenceConfigError("wait_poll_interval_seconds must be positive")
        if self.lambda_context is not None and not callable(
            getattr(self.lambda_context, "get_remaining_time_in_millis", None)
        ):
            raise IdempotencyPersistenceConfigError(
                "lambda_context must have a get_remaining_time_in_millis() method; "
                f"got a {type(self.lambda_context).__name__}"
            )
        if self.on_event is not None and not callable(self.on_event):
            raise IdempotencyPersistenceConfigError(
                f"on_event must be callable, not {type(self.on_event).__name__}"
            )
        try:
            if self.event_key_jmespath:
                object.__setattr__(self, "_event_key", jmespath.compile(self.event_key_jmespath))
            if self.payload_validation_jmespath:
                object.__setattr__(
                    self, "_validation_key", jmespath.compile(self.payload_validation_jmespath)
                )
        except jmespath.exceptions.JMESPathError as exc:
            raise IdempotencyPersistenceConfigError(f"invalid JMESPath expression: {exc}") from exc

    @property
    def payload_validation_enabled(self) -> bool:
        """True when `payload_validation_jmespath` is set."""
        return bool(self.payload_validation_jmespath)

    def register_lambda_context(self, lambda_context: LambdaContextLike) -> None:
        """Make `lambda_context` known to idempotent calls in the current task or thread.

        Kept for code migrating from Powertools. The context is held in a
        `contextvars.ContextVar`, never on this (shared, immutable) config; it takes
        precedence over the config's own `lambda_context`, as the registered one
        replaces it in Powertools.
        """
        _registered_context.set(lambda_context)


def registered_lambda_context(
    config: IdempotencyConfig | None = None,
) -> LambdaContextLike | None:
    """The Lambda context registered in the current task or thread, else `config`'s
    own ``lambda_context`` (when a config is given), else None."""
    context = _registered_context.get()
    if context is None and config is not None:
        return config.lambda_context
    return context
