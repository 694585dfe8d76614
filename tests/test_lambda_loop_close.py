"""Closing a Lambda handler loop cancels the background work handlers left running,
closes the resources registered with it, and the next invocation starts a new loop.
(On a `HandlerLoop` of the test's own: the process's shared one stays open.)"""

from __future__ import annotations

import asyncio
import threading

from aioidempotency.aws_lambda import HandlerLoop


class Resource:
    """A client registered to be closed with the loop."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def aclose(self) -> None:
        self.closed.set()


def test_close_cancels_background_work_and_closes_resources() -> None:
    loop = HandlerLoop()
    resource = Resource()
    loop.close_at_exit(resource)
    loop.close_at_exit(resource)  # registered once
    outcome: list[str] = []
    started = threading.Event()

    async def background() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    tasks: list[asyncio.Task[None]] = []

    async def handler() -> str:
        tasks.append(asyncio.get_running_loop().create_task(background()))
        return "ok"

    try:
        assert loop.run(handler()) == "ok"
        assert started.wait(10)
        first = loop.loop()
        loop.close(timeout=5)
        assert outcome == ["cancelled"]
        assert tasks[0].cancelled()
        assert resource.closed.is_set()
        assert first.is_closed()

        async def again() -> str:
            return "again"

        assert loop.run(again()) == "again"  # a new loop, started on demand
        assert loop.loop() is not first
        assert loop.created == 2
    finally:
        loop.close(timeout=5)


def test_close_leaves_a_loop_blocked_by_a_handler_to_its_thread() -> None:
    loop = HandlerLoop()
    unblock = threading.Event()
    blocked = threading.Event()
    threads: list[threading.Thread] = []

    def sync_io() -> None:  # blocking work of a handler's, still running on the loop
        blocked.set()
        unblock.wait(30)

    async def handler() -> str:
        threads.append(threading.current_thread())
        return "ok"

    try:
        assert loop.run(handler()) == "ok"
        first = loop.loop()
        first.call_soon_threadsafe(sync_io)
        assert blocked.wait(10)
        loop.close(timeout=0.1)  # gives up on the blocked loop after its timeouts
        assert threads[0].is_alive()
        assert not first.is_closed(), "a loop still running is not closed under its thread"
    finally:
        unblock.set()
    threads[0].join(10)
    assert not threads[0].is_alive(), "the loop stopped once its call returned"
    # The shutdown close() scheduled never ran on the stopped loop: cancel it here.
    leftovers = asyncio.all_tasks(first)
    assert leftovers
    for task in leftovers:
        task.cancel()
    first.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
    first.close()
