"""Run ``async def handler(event, context)`` under the standard AWS Lambda runtime.

The Python runtime calls a handler synchronously and serialises what it returns; an
async handler would hand it a coroutine. `lambda_handler` turns the coroutine
function into the sync callable the runtime expects. Every invocation of the
execution environment runs on one event loop, started on the first (cold) invocation
in a daemon thread and kept while the environment lives: clients bound to a loop
(aiobotocore, glide, redis-py) and their connections survive warm invocations.

A forked child gets a loop of its own on its first call. Calling the handler from
inside a running event loop is refused: it would block that loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast

from typing_extensions import ParamSpec

__all__ = [
    "HandlerLoop",
    "LambdaHandler",
    "LambdaHandlerError",
    "handler_loop",
    "lambda_handler",
]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

_CLOSE_TIMEOUT = 5.0
"""Seconds each resource may take to close at exit."""
_START_TIMEOUT = 10.0

ASYNC_HANDLER_ATTR = "__aioidempotency_async_handler__"
"""Attribute of a `lambda_handler` wrapper holding the coroutine function it runs."""


class LambdaHandler(Protocol[P, R_co]):
    """The sync handler `lambda_handler` returns: called as the async one, it returns
    what the async one returns; the async one is kept on it."""

    __aioidempotency_async_handler__: Callable[..., Coroutine[Any, Any, Any]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


class LambdaHandlerError(RuntimeError):
    """A `lambda_handler` was called where it cannot run (inside a running loop)."""


class HandlerLoop:
    """The event loop of the execution environment, running in a daemon thread.

    Started on the first invocation and kept for the life of the process; the
    caller's thread waits for each handler's result (its context variables are
    copied into the handler's task). The loop keeps running between invocations:
    background work (a release retried after a failure) goes on until Lambda freezes
    the environment, and clients that dispatch replies through one loop of the
    process (valkey-glide 2.x reads every client's replies on the first loop that
    opened one) never wait on a loop that is not running. A forked child starts a
    loop of its own. `created` counts the loops started, for tests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closables: list[Any] = []
        self.created = 0

    def close_at_exit(self, resource: Any) -> None:
        """Await ``resource.aclose()`` on this loop when the interpreter exits.

        `lambda_handler` registers the store of an idempotent handler itself, so its
        clients (an aiohttp session under aiobotocore) are closed, not abandoned.
        """
        if callable(getattr(resource, "aclose", None)) and not any(
            known is resource for known in self._closables
        ):
            self._closables.append(resource)

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started if needed."""
        if self._pid != os.getpid():  # forked without the at-fork hook (rare)
            self._after_fork()
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            return loop
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                self._loop, self._thread = self._start()
            return self._loop

    def _start(self) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=serve, name="aioidempotency-lambda", daemon=True)
        thread.start()
        if not ready.wait(_START_TIMEOUT):  # pragma: no cover - a thread that cannot start
            raise LambdaHandlerError("the Lambda handler loop did not start")
        self.created += 1
        return loop, thread

    def run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        """Run `coroutine` on the loop and wait for its result in this thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coroutine.close()  # never awaited: say so without a warning
            raise LambdaHandlerError(
                "a lambda_handler was called from inside a running event loop, which it "
                "would block; await the undecorated async handler instead (it is the "
                "wrapper's __wrapped__)"
            )
        # Scheduled from this thread, the task starts with a copy of its context.
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop())
        try:
            return future.result()
        except BaseException:
            future.cancel()  # an interrupt in this thread stops the handler too
            raise

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Close the registered resources, cancel what is left, stop the loop (at
        exit, in tests). The next invocation starts a new loop."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shut_down() -> None:
            for resource in self._closables:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(resource.aclose(), timeout)
            current = asyncio.current_task()
            pending = [task for task in asyncio.all_tasks() if task is not current]
            for task in pending:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), timeout)
            await loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout * 3)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    def _after_fork(self) -> None:
        # The parent's loop thread does not exist in the child: start afresh, and
        # leave the parent's loop (its selector, its clients' sockets) untouched.
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._pid = os.getpid()

    def _at_exit(self) -> None:
        if self._pid == os.getpid():
            self.close()


handler_loop = HandlerLoop()
"""The loop every `lambda_handler` of this process shares."""

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=handler_loop._after_fork)
atexit.register(handler_loop._at_exit)


def lambda_handler(handler: Callable[P, Coroutine[Any, Any, R]]) -> LambdaHandler[P, R]:
    """Turn ``async def handler(event, context)`` into the sync handler Lambda calls.

    Stack it outside ``@idempotent_async`` (or inside it: the idempotent wrapper of a
    `lambda_handler` is itself a sync handler)::

        @lambda_handler
        @idempotent_async(persistence_store=store)
        async def handler(event, context): ...

    Deploy it with the handler string ``module.handler``.
    """
    if not inspect.iscoroutinefunction(handler):
        raise TypeError(
            f"{getattr(handler, '__qualname__', handler)!r} is not an async function; "
            "@lambda_handler runs async def handlers (a plain def handler needs nothing)"
        )

    @functools.wraps(handler)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return handler_loop.run(handler(*args, **kwargs))

    setattr(run, ASYNC_HANDLER_ATTR, handler)
    engine = getattr(handler, "engine", None)  # an @idempotent_async handler's engine
    if engine is not None:
        handler_loop.close_at_exit(engine.persistence_store)
    return cast("LambdaHandler[P, R]", run)
