"""The thread-based primitives the generated sync engine is written with.

Same names as ``_async/concurrency.py``: see there for what each one is for.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from typing_extensions import TypeVarTuple, Unpack

__all__ = ["Background", "Cancelled", "Outcome", "scope", "shielded", "sleep"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

Cancelled = KeyboardInterrupt
"""What interrupts a sync call from outside: Ctrl-C (or a signal handler raising it)."""

sleep = time.sleep


class _Process:
    """Calls of one process share results; a forked child starts with its own scope."""

    current: object = object()

    @classmethod
    def after_fork(cls) -> None:
        cls.current = object()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Process.after_fork)


def scope() -> object:
    """What in-process calls can share a result within: the process (all threads)."""
    return _Process.current


def shielded(operation: Callable[[], T]) -> T:
    """Run ``operation()``: nothing cancels a sync call half-way."""
    return operation()


class Outcome(Generic[T]):
    """A value set once, that threads wait for."""

    def __init__(self) -> None:
        self._set = threading.Event()
        self._value: T | None = None

    def set(self, value: T) -> None:
        """Set the value (the first one counts)."""
        if not self._set.is_set():
            self._value = value
            self._set.set()

    def wait(self, timeout: float) -> T:
        """The value, once set; `TimeoutError` after `timeout` seconds."""
        if not self._set.wait(timeout):
            raise TimeoutError
        return self._value  # type: ignore[return-value]


class Background:
    """Bounded work that outlives the call that started it (releases, completions),
    each run in a daemon thread: it happens only after a failure, so it is rare."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._pid = os.getpid()

    def spawn(self, work: Callable[[Unpack[Ts]], None], *args: Unpack[Ts]) -> None:
        """Run ``work(*args)`` in a daemon thread."""

        def run() -> None:
            try:
                work(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name="aioidempotency-background", daemon=True)
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's threads are gone
                self._threads, self._pid = set(), os.getpid()
            self._threads.add(thread)
        thread.start()

    def drain(self, timeout: float) -> bool:
        """Wait for the work started so far; True if it all finished within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = [t for t in self._threads if t.is_alive() or not t.ident]
            if not pending:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            pending[0].join(left)
