"""`FakeClock`: epoch seconds that move only when a test says so, and the default clock
the pytest plugin gives engines and in-memory stores so that a fake reaches them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from aioidempotency._config import IdempotencyConfig

__all__ = ["FakeClock", "default_clock"]

_EPSILON = 0.002
"""Seconds past a boundary: a millisecond timestamp is past it, rounding included."""


class FakeClock:
    """Epoch seconds that move only through `advance`; safe from any thread.

    It starts at the real time (or `start`) and never goes back: records written on it
    then expire after the real time too, so a Redis or DynamoDB server, which expires
    records by its own clock, keeps them until the engine, on this clock, says they
    expired. Pass it as an engine's ``clock=`` or, under the pytest plugin, take the
    ``idempotency_clock`` fixture, which every engine and in-memory store uses.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        """The current time, epoch seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock `seconds` ahead (not back) and return the new time."""
        if seconds < 0:
            raise ValueError(f"a FakeClock only moves ahead; got {seconds} seconds")
        with self._lock:
            self._now += seconds
            return self._now

    def advance_past_expiry(self, config: IdempotencyConfig | None = None) -> float:
        """Move past `config`'s ``expires_after_seconds`` (the default config's without
        one): every record written until now has expired."""
        config = config or IdempotencyConfig()
        return self.advance(config.expires_after_seconds + 1)

    def advance_past_lease(self, config: IdempotencyConfig | None = None) -> float:
        """Move past `config`'s in-progress lease: a claim nobody renewed since now
        (its worker crashed) is orphaned, and the next call takes the key over."""
        return self.advance(_lease(config) + _EPSILON)

    def advance_to_renewal(self, config: IdempotencyConfig | None = None) -> float:
        """Move one third of `config`'s lease ahead: a running call's lease, renewed
        until now, is due for renewal (the keeper renews it at its next look, within a
        sixth of the lease of real time)."""
        return self.advance(_lease(config) / 3 + _EPSILON)


def _lease(config: IdempotencyConfig | None) -> float:
    lease = (config or IdempotencyConfig()).in_progress_lease_seconds
    if lease is None:
        raise ValueError("the config has no in-progress lease (in_progress_lease_seconds=None)")
    return lease


class DefaultClock:
    """The real time, or the `FakeClock` a test installed (`fake`)."""

    def __init__(self) -> None:
        self.fake: FakeClock | None = None

    def __call__(self) -> float:
        fake = self.fake
        return time.time() if fake is None else fake.now

    def __repr__(self) -> str:
        return f"<aioidempotency test clock: {'fake' if self.fake else 'real time'}>"


default_clock = DefaultClock()
"""The clock the pytest plugin makes the default of engines and in-memory stores."""


def _clock_takers() -> list[Callable[..., Any]]:
    """The constructors whose keyword-only ``clock`` defaults to the real time."""
    from aioidempotency._async.engine import IdempotencyEngine
    from aioidempotency._async.memory import InMemoryPersistenceLayer
    from aioidempotency._sync.engine import SyncIdempotencyEngine
    from aioidempotency._sync.memory import SyncInMemoryPersistenceLayer

    return [
        IdempotencyEngine.__init__,
        SyncIdempotencyEngine.__init__,
        InMemoryPersistenceLayer.__init__,
        SyncInMemoryPersistenceLayer.__init__,
    ]


_replaced: list[tuple[dict[str, Any], Any]] = []
_installs = 0
"""How many pytest sessions of the process installed the default clock (a session run
inside another one, as pytester's in-process runs are, must not uninstall it)."""


def install_default_clock() -> None:
    """Make `default_clock` the default ``clock`` of engines and in-memory stores built
    from now on (until as many `uninstall_default_clock` calls). It reads the real time
    until a test sets its `fake`. Raises `RuntimeError` when a constructor no longer
    takes a keyword-only ``clock`` defaulting to ``time.time``."""
    global _installs
    if not _replaced:
        for constructor in _clock_takers():
            defaults = constructor.__kwdefaults__
            if defaults is None or defaults.get("clock") is not time.time:
                raise RuntimeError(
                    f"{constructor.__qualname__} takes no keyword-only clock=time.time; "
                    "aioidempotency.testing cannot fake its time"
                )
        for constructor in _clock_takers():
            defaults = constructor.__kwdefaults__
            assert defaults is not None
            _replaced.append((defaults, defaults["clock"]))
            defaults["clock"] = default_clock
    _installs += 1


def uninstall_default_clock() -> None:
    """Undo one `install_default_clock`; the last one gives engines and in-memory stores
    their real-time default back."""
    global _installs
    _installs = max(0, _installs - 1)
    if _installs:
        return
    while _replaced:
        defaults, original = _replaced.pop()
        defaults["clock"] = original
    default_clock.fake = None
