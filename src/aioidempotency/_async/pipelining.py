"""Automatic pipelining for the asyncio cache adapters (async only: no sync twin).

A `Batcher` collects the commands an adapter is asked for in one turn of the event
loop and sends them as one non-atomic batch (one write and one read on the socket
instead of one per command). A command issued while none is queued or awaiting its
reply goes on its own, at once, as without pipelining (`alone`): a lone caller pays
nothing for batching. The others are queued: the first queued schedules the flush as
a task of its own, and the commands queued before that task starts travel with it, at
most `max_batch` per batch (a longer queue goes as several batches at once). Each caller
waits on a future of its own, which the flush resolves with that command's reply or
error: a command's error reply (a wrong type, NOSCRIPT) fails that command only, and a
failure of the whole batch (the connection) fails each of its commands with that error.

A caller cancelled before the flush has its command dropped (never sent); one cancelled
after it only stops waiting. The flush task catches everything its batch raises, so it
never ends with an unretrieved exception; `aclose` fails the queued commands and waits
for the batches in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["DEFAULT_MAX_BATCH", "Batcher"]

_C = TypeVar("_C")
_T = TypeVar("_T")

#: The most commands one batch carries (a longer queue is split).
DEFAULT_MAX_BATCH = 256

Send = Callable[[list[_C]], Awaitable[list[Any]]]


class Batcher(Generic[_C]):
    """Commands queued in one turn of one event loop, sent as batches by `send`.

    `send(commands)` returns one reply per command, an error reply as an exception
    instance in its place; what it raises fails every command of the batch. `closed()`
    makes the error that fails commands still queued when the batcher is closed.
    """

    def __init__(
        self,
        send: Send[_C],
        *,
        closed: Callable[[], Exception],
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1: {max_batch!r}")
        self._send = send
        self._closed_error = closed
        self.max_batch = max_batch
        self._queue: list[tuple[_C, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self._in_flight = 0  # commands sent (alone or in a batch) and not answered yet
        #: Batches sent (one per `send`), and the commands they carried.
        self.batches = 0
        self.commands = 0

    @property
    def idle(self) -> bool:
        """True when no command is queued or awaiting its reply: the next may go alone."""
        return not self._in_flight and not self._queue and not self.closed

    async def alone(self, call: Awaitable[_T]) -> _T:
        """Await `call`, a command sent on its own, counted as in flight meanwhile."""
        self._in_flight += 1
        try:
            return await call
        finally:
            self._in_flight -= 1

    async def send_now(self, commands: list[_C]) -> list[Any]:
        """Send `commands` as one batch at once (not queued, counted like a flush): one
        reply per command, an error reply as an exception instance in its place."""
        self.batches += 1
        self.commands += len(commands)
        return await self.alone(self._send(commands))

    @property
    def queued(self) -> int:
        """Commands waiting for the next flush."""
        return len(self._queue)

    async def flushed(self) -> None:
        """Return once the batches queued or in flight now (in this loop) have ended."""
        loop = asyncio.get_running_loop()
        pending = [task for task in self._tasks if task.get_loop() is loop]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def submit(self, command: _C) -> asyncio.Future[Any]:
        """Queue `command` for the next flush; the future its reply resolves."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed:
            future.set_exception(self._closed_error())
            return future
        if not self._queue:  # the first of this turn: schedule the flush
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._queue.append((command, future))
        return future

    async def _flush(self) -> None:
        queue, self._queue = self._queue, []
        live = [entry for entry in queue if not entry[1].done()]  # cancelled: never sent
        self._in_flight += len(live)  # `_run` counts them off
        if len(live) <= self.max_batch:
            if live:
                await self._run(live)
            return
        step = self.max_batch
        await asyncio.gather(*(self._run(live[i : i + step]) for i in range(0, len(live), step)))

    async def _run(self, batch: list[tuple[_C, asyncio.Future[Any]]]) -> None:
        self.batches += 1
        self.commands += len(batch)
        try:
            replies = await self._send([command for command, _ in batch])
            if len(replies) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(replies)} replies")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except BaseException as exc:  # the whole batch failed: every command with it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._in_flight -= len(batch)
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def aclose(self) -> None:
        """Fail the commands still queued (never sent), then wait for the batches in
        flight (bounded by the client's own timeout)."""
        self.closed = True
        queue, self._queue = self._queue, []
        for _, future in queue:
            if not future.done():
                future.set_exception(self._closed_error())
        await self.flushed()
