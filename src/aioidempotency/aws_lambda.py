"""Run ``async def handler(event, context)`` under the standard AWS Lambda runtime.

The Python runtime calls a handler synchronously and serialises what it returns; an
async handler would hand it a coroutine. `lambda_handler` turns the coroutine
function into the sync callable the runtime expects. Every invocation of the
execution environment runs on one event loop, created on the first (cold) invocation
and kept while the environment lives: clients bound to a loop (aiobotocore, glide,
redis-py) and their connections survive warm invocations. Between two invocations
the loop does not run (Lambda freezes the environment anyway); background work left
by the engine (a release retried after a failure) resumes in the next invocation.

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
    """The event loop of the execution environment: one per process and thread.

    The Lambda runtime invokes a handler from one thread, so in Lambda this is one
    loop for the life of the environment. A thread of its own gets its own loop (two
    threads cannot run one loop); a forked child drops the parent's loop and opens
    a new one on first use. `created` counts the loops opened, for tests.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._pid = os.getpid()
        self._closables: list[Any] = []
        self.created = 0

    def close_at_exit(self, resource: Any) -> None:
        """Await ``resource.aclose()`` on this process's loop when the interpreter exits.

        `lambda_handler` registers the store of an idempotent handler itself, so its
        clients (an aiohttp session under aiobotocore) are closed, not abandoned.
        """
        if callable(getattr(resource, "aclose", None)) and not any(
            known is resource for known in self._closables
        ):
            self._closables.append(resource)

    def loop(self) -> asyncio.AbstractEventLoop:
        """This thread's loop, opened on first use (or after it was closed)."""
        if self._pid != os.getpid():  # forked without the at-fork hook (rare)
            self._after_fork()
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed():
            loop = asyncio.new_event_loop()
            self._local.loop = loop
            self.created += 1
        return loop

    def run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        """Run `coroutine` to completion on this thread's loop."""
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
        return self.loop().run_until_complete(coroutine)

    def close(self) -> None:
        """Close the registered resources, cancel what is left on this thread's loop
        and close it (at exit, in tests)."""
        loop: asyncio.AbstractEventLoop | None = getattr(self._local, "loop", None)
        if loop is None or loop.is_closed() or loop.is_running():
            return
        self._local.loop = None
        try:
            for resource in self._closables:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.wait_for(resource.aclose(), _CLOSE_TIMEOUT))
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _after_fork(self) -> None:
        # The parent's loop (its selector, its clients' sockets) is not the child's:
        # drop it without closing anything the parent still uses.
        self._local = threading.local()
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
