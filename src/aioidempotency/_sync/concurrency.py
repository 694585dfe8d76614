"""The thread-based primitives the generated sync engine is written with.

Same names as ``_async/concurrency.py``: see there for what each one is for.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from typing_extensions import TypeVarTuple, Unpack

from aioidempotency._forks import fork_generation

__all__ = ["Background", "Cancelled", "Outcome", "Slots", "scope", "shielded", "sleep"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

Cancelled = KeyboardInterrupt
"""What interrupts a sync call from outside: Ctrl-C (or a signal handler raising it)."""

sleep = time.sleep


scope: Callable[[], object] = fork_generation
"""What in-process calls can share a result within: the process (all threads), until a
fork. Within a process it returns one object every time (the counter `_forks` holds),
and a forked child a new one, so flights compare scopes with ``is`` as the async
engine's compare event loops."""


def shielded(operation: Callable[[], T]) -> T:
    """Run ``operation()``: nothing cancels a sync call half-way."""
    return operation()


class Outcome(Generic[T]):
    """A value set once, by the thread that owns it, that other threads wait for.

    A bare lock held until the value is set: every flight makes one and most are never
    waited for, so it costs a lock allocation, not an `Event` (a condition, its lock
    and their Python-level bookkeeping). A waiter acquires the lock once it is
    released and hands it on at once, so every waiter wakes.
    """

    __slots__ = ("_done", "_unset", "_value")

    def __init__(self) -> None:
        self._unset = threading.Lock()
        self._unset.acquire()
        self._done = False
        self._value: T | None = None

    def set(self, value: T) -> None:
        """Set the value (the first one counts)."""
        if not self._done:
            self._value = value
            self._done = True
            self._unset.release()

    def wait(self, timeout: float) -> T:
        """The value, once set; `TimeoutError` after `timeout` seconds."""
        if not self._unset.acquire(timeout=max(timeout, 0)):
            raise TimeoutError
        self._unset.release()
        return self._value  # type: ignore[return-value]


class Slots:
    """At most `size` threads inside at once (``with slots: ...``); the others wait.

    A queue of `size` tokens: taking and returning one is a C call, where a
    `threading.BoundedSemaphore` runs a Python condition (several µs per call, and a
    lock that busy threads queue on).
    """

    __slots__ = ("_tokens",)

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"Slots size must be >= 0, not {size}")
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(size):
            self._tokens.put(None)

    def __enter__(self) -> None:
        self._tokens.get()

    def __exit__(self, *exc: Any) -> None:
        self._tokens.put(None)


class Background:
    """Bounded work that outlives the call that started it (releases, completions),
    each run in a daemon thread: it happens only after a failure, so it is rare."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._generation = fork_generation()

    def spawn(self, work: Callable[[Unpack[Ts]], None], *args: Unpack[Ts]) -> None:
        """Run ``work(*args)`` in a daemon thread."""

        def run() -> None:
            try:
                work(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name="aioidempotency-background", daemon=True)
        if self._generation != fork_generation():
            self._after_fork()
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _after_fork(self) -> None:
        """In a forked child: the parent's threads stay behind, and the lock is new (one
        of them may have held it at the fork)."""
        self._lock = threading.Lock()
        self._threads = set()
        self._generation = fork_generation()

    def drain(self, timeout: float) -> bool:
        """Wait for the work started so far; True if it all finished within `timeout`."""
        if self._generation != fork_generation():
            self._after_fork()
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
