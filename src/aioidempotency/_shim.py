"""Sync shims: `@idempotent` and `@idempotent_function` for plain ``def`` code.

The persistence calls run on one long-lived event loop in a daemon thread, so the
store's clients and connection pools survive across calls (warm Lambda
invocations). The decorated function itself runs in the caller's thread, never in
an executor, so nested idempotent calls cannot exhaust a pool. Every wait across
threads has a timeout, and a forked child starts its own loop. At interpreter exit the
loop finishes the engines' background work and closes the stores it used (bounded by
`EXIT_TIMEOUT`), so no client is left open.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import inspect
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

from typing_extensions import ParamSpec

from aioidempotency._async.decorators import (
    OutputSerializer,
    PayloadArgument,
    engine_for,
    handler_event_and_context,
)
from aioidempotency._async.engine import IdempotencyEngine, is_durable_replay
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._config import IdempotencyConfig, LambdaContextLike, registered_lambda_context
from aioidempotency.exceptions import IdempotencyPersistenceConnectionError

__all__ = ["BackgroundLoop", "background_loop", "idempotent", "idempotent_function", "run_sync"]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_STORE_TIMEOUT = 60.0
EXIT_TIMEOUT = 5.0
"""Seconds the exit hook may spend finishing background work and closing stores."""

logger = logging.getLogger("aioidempotency")


class BackgroundLoop:
    """An event loop running forever in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._engines: weakref.WeakSet[IdempotencyEngine] = weakref.WeakSet()

    @property
    def thread(self) -> threading.Thread | None:
        """The thread running the loop (None before first use)."""
        return self._thread

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running background loop, started if needed."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            return loop
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = self._start()
            return self._loop

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=serve, name="aioidempotency-loop", daemon=True)
        thread.start()
        if not ready.wait(timeout=10):  # pragma: no cover - a thread that cannot start
            raise RuntimeError("the aioidempotency background loop did not start")
        self._thread = thread
        return loop

    def remember(self, engine: IdempotencyEngine) -> None:
        """Note that `engine` (and its store) runs on this loop, to be closed at exit."""
        if engine not in self._engines:
            with self._lock:
                self._engines.add(engine)

    def close(self, timeout: float = EXIT_TIMEOUT) -> bool:
        """Finish the remembered engines' background work, close their stores' clients,
        stop the loop and close it; True when all of it finished within `timeout`.

        Called at interpreter exit. A later sync call starts a new loop.
        """
        with self._lock:
            loop, thread = self._loop, self._thread
            engines = list(self._engines)
            self._engines = weakref.WeakSet()
        if loop is None or loop.is_closed() or thread is None or not thread.is_alive():
            return True
        deadline = time.monotonic() + timeout
        done = asyncio.run_coroutine_threadsafe(_shut_down(engines, timeout), loop)
        try:
            finished = done.result(timeout=timeout + 0.5)
        except Exception:  # the loop is blocked, or the shutdown itself failed
            logger.warning("closing the idempotency stores at exit failed", exc_info=True)
            done.cancel()
            return False
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        if thread.is_alive():  # pragma: no cover - a callback that blocks the loop
            return False
        with self._lock:
            if self._loop is loop:
                self._loop = None
                self._thread = None
        loop.close()
        return finished

    def _after_fork(self) -> None:
        # The parent's loop thread does not exist in the child: start afresh. The
        # parent's engines are not the child's to close (their clients are the parent's).
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._engines = weakref.WeakSet()


async def _shut_down(engines: list[IdempotencyEngine], timeout: float) -> bool:
    """On the background loop: drain the engines, close their stores, cancel the rest.

    Each step gets what is left of `timeout`; one that runs out is logged and the next
    one still runs. True when every step finished in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    async def step(what: str, awaitables: list[Any]) -> bool:
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*awaitables, return_exceptions=True),
                max(0.0, deadline - loop.time()),
            )
        except asyncio.TimeoutError:
            logger.warning("%s at exit did not finish within %gs", what, timeout)
            return False
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                logger.warning("%s at exit failed: %r", what, outcome)
        return True

    drains = [engine.drain(timeout=timeout) for engine in engines]
    drained = await step("finishing background releases", drains)
    stores = {id(engine.persistence_store): engine.persistence_store for engine in engines}
    closed = await step("closing the stores", [store.aclose() for store in stores.values()])
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    for task in others:  # lease timers and the like: nothing is left to protect
        task.cancel()
    cancelled = await step("cancelling background tasks", others)
    finalised = await step("closing async generators", [loop.shutdown_asyncgens()])
    return drained and closed and cancelled and finalised


background_loop = BackgroundLoop()
"""The loop every sync shim of this process shares."""

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=background_loop._after_fork)
atexit.register(background_loop.close)


class _CallerRaised(Exception):
    """Carries an exception raised in the caller's thread across to the loop."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


def _settle(waiter: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if waiter.done():
        return
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(result)


def run_sync(
    engine: IdempotencyEngine,
    payload: Any,
    fn: Callable[[], R],
    *,
    key_source: Callable[..., Any],
    lambda_context: LambdaContextLike | None = None,
    timeout: float = DEFAULT_STORE_TIMEOUT,
    durable_replay: bool = False,
) -> R:
    """Run the engine for a sync function: store calls on the background loop,
    ``fn`` in this thread. ``timeout`` bounds each wait for the store;
    ``durable_replay`` says the call replays a durable execution (see
    `aioidempotency._async.engine.is_durable_replay`)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "a sync idempotent function was called from inside a running event loop, "
            "which it would block; use @idempotent_async / @idempotent_function_async "
            "or `await engine.run(payload, fn)` in async code"
        )
    # Key derivation and the local cache need no I/O: do them here, in the caller's
    # thread, so a disabled run, a missing key or a cache hit never crosses to the loop.
    call = engine.prepare_call(
        payload,
        key_source=key_source,
        lambda_context=lambda_context,
        durable_replay=durable_replay,
    )
    if call is None:
        return fn()
    hit, replayed = engine.replay_from_cache(call)
    if hit:
        return cast(R, replayed)
    loop = background_loop.loop()
    background_loop.remember(engine)
    channel: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    async def run_in_caller() -> R:
        waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        channel.put(("run", waiter))
        return await waiter

    future: concurrent.futures.Future[R] = asyncio.run_coroutine_threadsafe(
        engine.run_prepared(call, run_in_caller), loop
    )
    future.add_done_callback(lambda done: channel.put(("done", done)))
    wait = timeout + engine.config.wait_for_in_progress_seconds
    try:
        while True:
            try:
                kind, item = channel.get(timeout=wait)
            except queue.Empty:
                raise IdempotencyPersistenceConnectionError(
                    f"the idempotency store did not answer within {wait:g} s"
                ) from None
            if kind == "done":
                break
            try:
                result = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, item, None, _CallerRaised(exc))
            else:
                loop.call_soon_threadsafe(_settle, item, result, None)
    except BaseException:
        future.cancel()  # the engine releases any claim it holds
        raise
    error: BaseException | None = None
    try:
        return future.result()
    except _CallerRaised as wrapped:
        error = wrapped.original
    assert error is not None
    raise error


def _require_plain_function(function: Callable[..., Any], async_name: str) -> None:
    if inspect.iscoroutinefunction(function):
        raise TypeError(
            f"{getattr(function, '__qualname__', function)!r} is an async function; "
            f"use @{async_name} for it"
        )


def idempotent(
    *,
    persistence_store: PersistenceLayer,
    config: IdempotencyConfig | None = None,
    key_prefix: str | None = None,
    output_serializer: OutputSerializer = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make a ``def handler(event, context)`` Lambda handler idempotent (sync shim)."""

    def decorate(handler: Callable[P, R]) -> Callable[P, R]:
        _require_plain_function(handler, "idempotent_async")
        engine = engine_for(handler, persistence_store, config, key_prefix, output_serializer)

        @functools.wraps(handler)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            event, context = handler_event_and_context(args, kwargs)
            return run_sync(
                engine,
                event,
                functools.partial(handler, *args, **kwargs),
                key_source=handler,
                lambda_context=context,
                durable_replay=is_durable_replay(
                    args[1] if len(args) > 1 else kwargs.get("context")
                ),
            )

        wrapper.engine = engine  # type: ignore[attr-defined]
        return wrapper

    return decorate


def idempotent_function(
    *,
    data_keyword_argument: str,
    persistence_store: PersistenceLayer,
    config: IdempotencyConfig | None = None,
    output_serializer: OutputSerializer = None,
    key_prefix: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make any plain ``def`` idempotent on one of its arguments (sync shim)."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        _require_plain_function(function, "idempotent_function_async")
        argument = PayloadArgument(function, data_keyword_argument)
        engine = engine_for(function, persistence_store, config, key_prefix, output_serializer)

        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            payload = argument.extract(args, kwargs)
            return run_sync(
                engine,
                payload,
                functools.partial(function, *args, **kwargs),
                key_source=function,
                lambda_context=registered_lambda_context(),
            )

        wrapper.engine = engine  # type: ignore[attr-defined]
        return wrapper

    return decorate
