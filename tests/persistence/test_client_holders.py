"""The holders of the clients a store opens (`OpenedClients`) or is given (`PassedClient`),
on both sides: one client per event loop, closed by `aclose()` and, if the store asks
(DynamoDB does), when its loop shuts down; one per process in sync code; a client
passed in refused in a forked child. The cache and DynamoDB stores hold their clients
with them (their own tests prove what each store does with them)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import warnings
from typing import Any

import pytest

from aioidempotency._async import clients as async_clients
from aioidempotency._sync import clients as sync_clients
from aioidempotency._sync.concurrency import Slots
from aioidempotency.exceptions import IdempotencyPersistenceConfigError


class Client:
    """A client that records being closed, and the loop it was opened in."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None


class Opener:
    """`open_client` and `close_client` of an `OpenedClients`, counting both."""

    def __init__(self, *, fail: int = 0) -> None:
        self.opened: list[Client] = []
        self.closed_in: list[asyncio.AbstractEventLoop | None] = []
        self.fail = fail

    async def open(self) -> Client:
        await asyncio.sleep(0)
        if self.fail:
            self.fail -= 1
            raise OSError("cannot open")
        self.opened.append(Client(len(self.opened)))
        return self.opened[-1]

    async def close(self, client: Client) -> None:
        await asyncio.sleep(0)
        client.closed = True
        self.closed_in.append(asyncio.get_running_loop())

    def holder(
        self, max_concurrency: int | None = None, *, at_shutdown: bool = True
    ) -> async_clients.OpenedClients[Client]:
        return async_clients.OpenedClients(
            self.open,
            self.close,
            max_concurrency=max_concurrency,
            close_at_loop_shutdown=at_shutdown,
        )


async def _client(holder: async_clients.OpenedClients[Client]) -> Client:
    opened = holder.ready()
    if opened is None:
        opened = await holder.open()
    return opened.client


# -- one client per event loop ---------------------------------------------------------------


async def test_one_client_per_loop_opened_once_and_closed_by_aclose() -> None:
    opener = Opener()
    holder = opener.holder()
    clients = await asyncio.gather(*(_client(holder) for _ in range(20)))
    assert {client.number for client in clients} == {0}
    assert holder.current() is clients[0]
    await holder.aclose()
    assert clients[0].closed
    assert opener.closed_in == [asyncio.get_running_loop()]
    assert holder.current() is None
    assert (await _client(holder)).number == 1  # reopened on demand
    await holder.aclose()


def test_asyncio_run_closes_the_client_of_the_loop_it_shuts_down() -> None:
    """A holder used with `asyncio.run` per call (a Lambda handler) leaves no client open
    behind each call, with nobody calling `aclose()`."""
    opener = Opener()
    holder = opener.holder()
    loops: list[asyncio.AbstractEventLoop] = []

    async def invocation() -> Client:
        loops.append(asyncio.get_running_loop())
        client = await _client(holder)
        assert not client.closed
        return client

    clients = [asyncio.run(invocation()) for _ in range(3)]
    assert [client.number for client in clients] == [0, 1, 2]
    assert all(client.closed for client in clients)
    assert opener.closed_in == loops  # each closed in its own loop, as it shut down


def test_without_close_at_loop_shutdown_only_aclose_closes_a_client() -> None:
    opener = Opener()
    holder = opener.holder(at_shutdown=False)

    async def invocation() -> Client:
        return await _client(holder)

    first = asyncio.run(invocation())
    assert not first.closed  # the cache store's way: see `OpenedClients`
    loop = asyncio.new_event_loop()
    try:
        second = loop.run_until_complete(invocation())
        loop.run_until_complete(holder.aclose())
    finally:
        loop.close()
    assert second.closed
    assert not first.closed  # its loop is closed: dropped, as before


def test_a_loop_that_goes_on_after_its_generators_shut_down_opens_a_new_client() -> None:
    opener = Opener()
    holder = opener.holder()
    loop = asyncio.new_event_loop()
    try:
        first = loop.run_until_complete(_client(holder))
        loop.run_until_complete(loop.shutdown_asyncgens())
        assert first.closed
        second = loop.run_until_complete(_client(holder))
        assert second is not first
        loop.run_until_complete(holder.aclose())
        assert second.closed
    finally:
        loop.close()


def test_the_entries_of_closed_loops_are_forgotten() -> None:
    opener = Opener()
    holder = opener.holder(max_concurrency=1)
    for _ in range(3):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(_client(holder))
        loop.close()  # without shutting its generators down: nothing closes the client
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_client(holder))
        assert list(holder._loops) == [loop]
        loop.run_until_complete(holder.aclose())
    finally:
        loop.close()
    assert [client.closed for client in opener.opened] == [False, False, False, True]


async def test_aclose_closes_a_client_of_another_running_loop_in_that_loop() -> None:
    opener = Opener()
    holder = opener.holder()
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    try:
        future = asyncio.run_coroutine_threadsafe(_client(holder), other)
        theirs = await asyncio.wrap_future(future)
        ours = await _client(holder)
        assert theirs is not ours
        await holder.aclose()
        assert theirs.closed
        assert ours.closed
        assert opener.closed_in == [other, asyncio.get_running_loop()]
    finally:
        other.call_soon_threadsafe(other.stop)
        await asyncio.to_thread(thread.join, 10)
        other.close()


async def test_a_client_of_an_idle_loop_is_closed_when_that_loop_runs_again() -> None:
    opener = Opener()
    holder = opener.holder()
    idle = asyncio.new_event_loop()
    try:
        theirs = await asyncio.to_thread(idle.run_until_complete, _client(holder))
        await holder.aclose()  # `idle` is not running: its client cannot be closed now
        assert not theirs.closed
        await asyncio.to_thread(idle.run_until_complete, asyncio.sleep(0.01))
        assert theirs.closed
        assert opener.closed_in == [idle]
    finally:
        idle.close()


async def test_a_failed_opening_is_tried_again_by_the_next_call() -> None:
    opener = Opener(fail=1)
    holder = opener.holder()
    with pytest.raises(OSError, match="cannot open"):
        await holder.open()
    assert holder.ready() is None
    assert (await _client(holder)).number == 0
    await holder.aclose()


async def test_max_concurrency_bounds_the_calls_in_flight_or_nothing_when_none() -> None:
    bounded = await Opener().holder(max_concurrency=2).open()
    unbounded = await Opener().holder().open()
    inside = 0
    most = 0

    async def call(opened: async_clients.Opened[Client]) -> None:
        nonlocal inside, most
        async with opened.limit:
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(call(bounded) for _ in range(6)))
    assert most == 2
    most = 0
    await asyncio.gather(*(call(unbounded) for _ in range(6)))
    assert most == 6


# -- one client per process in sync code -------------------------------------------------------


def test_the_sync_holder_opens_one_client_for_every_thread_and_bounds_it_or_not() -> None:
    opened: list[object] = []

    def open_client() -> object:
        time.sleep(0.01)
        opened.append(object())
        return opened[-1]

    closed: list[object] = []
    holder = sync_clients.OpenedClients(open_client, closed.append)
    assert isinstance(holder.open().limit, contextlib.nullcontext)
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(holder.open().client)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(opened) == 1
    assert seen == opened * 8
    with holder.open().limit, holder.open().limit:  # no bound: entered any number of times
        pass
    holder.close()
    assert closed == opened
    assert holder.current() is None
    bounded = sync_clients.OpenedClients(open_client, closed.append, max_concurrency=1)
    limit = bounded.open().limit
    assert isinstance(limit, Slots)


# -- a client passed in -------------------------------------------------------------------------


@pytest.mark.parametrize("side", [async_clients, sync_clients], ids=["async", "sync"])
def test_a_client_passed_in_from_another_process_is_refused_from_the_start(side: Any) -> None:
    client = object()
    here = side.PassedClient(client, refusal="pass a URL instead")
    assert here.ready().client is client
    parent = os.getpid() + 1  # as if built in a forked child from its parent's settings
    elsewhere = side.PassedClient(client, refusal="pass a URL instead", pid=parent)
    with pytest.raises(IdempotencyPersistenceConfigError) as refused:
        elsewhere.ready()
    assert str(refused.value) == (
        f"this client was created in process {parent}, before os.fork(): pass a URL instead"
    )
    assert elsewhere.current() is client  # held (never closed), but not used


async def test_open_hands_out_the_open_client_without_opening_another() -> None:
    opener = Opener()
    holder = opener.holder(at_shutdown=False)
    first = await holder.open()
    assert await holder.open() is first
    assert len(opener.opened) == 1
    await holder.aclose()


async def test_concurrent_first_calls_of_a_loop_share_one_client() -> None:
    """Calls that arrive together before the loop has a client wait for one opening."""
    opener = Opener()
    holder = opener.holder(at_shutdown=True)
    clients = await asyncio.wait_for(asyncio.gather(*(_client(holder) for _ in range(5))), 10)
    assert len(opener.opened) == 1
    assert clients == [opener.opened[0]] * 5
    await holder.aclose()
    assert opener.opened[0].closed


async def test_a_passed_client_is_handed_out_as_it_is() -> None:
    client = Client(0)
    holder = async_clients.PassedClient(client, refusal="pass a URL instead")
    opened = await holder.open()
    assert opened.client is client
    assert holder.ready() is opened
    assert not client.closed


# -- a forked child ------------------------------------------------------------------------------


def _exit_code_of(pid: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout} s")
        time.sleep(0.02)  # polling interval, not a synchronisation stand-in


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
async def test_a_forked_child_leaves_the_parents_clients_alone_whatever_it_calls_first() -> None:
    """In a forked child the parent's clients are forgotten, never closed (their sockets
    are the parent's), whether the child first closes a holder or opens from it."""
    closing, opening = Opener(), Opener()
    closed_first, opened_first = closing.holder(at_shutdown=False), opening.holder()
    await closed_first.open()
    parents = (await opened_first.open()).client
    sync_closed: list[object] = []
    sync_holder = sync_clients.OpenedClients(object, sync_closed.append)
    sync_parents = sync_holder.open().client

    async def in_child() -> int:  # pragma: no cover - runs in the child
        await closed_first.aclose()  # the child's first call on this holder
        if closing.closed_in or closing.opened[0].closed:
            return 2
        fresh = (await opened_first.open()).client  # and on this one
        if fresh is parents or len(opening.opened) != 2 or parents.closed:
            return 3
        sync_holder.close()
        if sync_closed:
            return 4
        return 0 if sync_holder.open().client is not sync_parents else 5

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # threads of the test process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = asyncio.run(in_child())
        finally:
            os._exit(code)
    assert await asyncio.to_thread(_exit_code_of, pid) == 0
    # The parent's clients are still open and still handed out here.
    assert not parents.closed
    assert closing.closed_in == []
    assert (await opened_first.open()).client is parents
    assert sync_holder.open().client is sync_parents
    await closed_first.aclose()
    await opened_first.aclose()
    sync_holder.close()
    assert sync_closed == [sync_parents]
