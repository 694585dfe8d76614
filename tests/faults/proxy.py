"""A fault-injecting TCP proxy for the fault suite.

`FaultProxy` listens on a free port of 127.0.0.1 and forwards every connection to a
target (a Redis/Valkey server, moto's DynamoDB endpoint). It runs its own event loop in
a daemon thread, so async tests on any loop and plain sync code can use it alike. Every
public method is thread-safe and returns once the change is in effect: the next byte
the proxy handles sees the new mode.

Usage::

    with FaultProxy("127.0.0.1", server.port) as proxy:
        store = store_from_url(f"redis://{proxy.host}:{proxy.port}?timeout=0.5")
        proxy.stall()           # the server looks frozen
        ...
        proxy.pass_through()    # held bytes flow again, as after SIGCONT

Modes (one at a time; each call replaces the previous one):

- `pass_through()`: forward both ways at once (the initial mode).
- `delay(seconds)`: forward every chunk, both ways, `seconds` after it arrived.
- `stall()`: accept connections, forward nothing either way; bytes are held, not lost,
  and flow again when the mode changes (a frozen server, then thawed).
- `hold_replies()`: requests reach the server; replies are held until the mode changes
  (a slow reply: the server did the work, the client does not know yet).
- `half_open()`: requests reach the server; replies are discarded (the lost reply).
  Leaving this mode resets every connection that lost a reply, since its byte stream
  is broken (in real TCP a reply is only lost with its connection).
- `refuse()`: close the listening socket (new connections get ECONNREFUSED) and reset
  every open connection (the server is down). Any other mode listens again.

Actions:

- `drop()`: reset (RST) every open connection now; the mode stays as it is.
- `reset_next(match=b"COMPLETED", deliver=True, count=1)`: the next `count` requests
  (client-to-server chunks) containing `match` (any, when None) reset their connection,
  after reaching the server when `deliver` (the reply is lost) or before (the request
  is lost). `arm(...)` is the general form: a matching request can also switch the
  whole proxy to `stall`, `hold_replies` or `half_open`.

Observation: `stats()` is a `ProxyStats` snapshot (connections, bytes each way, held
and discarded bytes, resets, triggers fired); `wait_until(pred, timeout)` blocks until
`pred(stats)` holds and `await until(pred, timeout)` awaits it from a test's loop
(never call `wait_until` on a loop that the traffic itself needs).

If the target refuses a connection (server down or restarting), the client's
connection is reset at once (`upstream_failures` counts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

__all__ = ["Action", "FaultProxy", "ProxyStats"]

T = TypeVar("T")
Action = Literal["reset", "stall", "hold_replies", "half_open"]
_Flow = Literal["forward", "hold", "discard"]
CALL_TIMEOUT = 10.0
READ_SIZE = 65536
_UP, _DOWN = 0, 1  # client -> server, server -> client


@dataclasses.dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started (a snapshot)."""

    accepted: int = 0
    """Connections accepted from clients."""
    open: int = 0
    """Client connections open now."""
    bytes_up: int = 0
    """Bytes forwarded client -> server."""
    bytes_down: int = 0
    """Bytes forwarded server -> client."""
    held_up: int = 0
    """Bytes waiting in the proxy client -> server right now (stall)."""
    held_down: int = 0
    """Bytes waiting in the proxy server -> client right now (stall, hold_replies)."""
    received_up: int = 0
    """Bytes read from clients (forwarded, held or not)."""
    discarded_down: int = 0
    """Reply bytes thrown away (half_open)."""
    resets: int = 0
    """Connections the proxy reset (drop, refuse, reset_next, leaving half_open)."""
    triggers: int = 0
    """Armed triggers that fired."""
    upstream_failures: int = 0
    """Client connections reset because the target refused to connect."""


@dataclasses.dataclass(frozen=True)
class _Mode:
    name: str
    up: _Flow = "forward"
    down: _Flow = "forward"
    delay: float = 0.0
    listening: bool = True


_MODES = {
    "pass_through": _Mode("pass_through"),
    "stall": _Mode("stall", up="hold", down="hold"),
    "hold_replies": _Mode("hold_replies", down="hold"),
    "half_open": _Mode("half_open", down="discard"),
    "refuse": _Mode("refuse", listening=False),
}


@dataclasses.dataclass
class _Trigger:
    match: bytes | None
    action: Action
    deliver: bool
    remaining: int


class _Connection:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter | None) -> None:
        self.writers = [client] if upstream is None else [client, upstream]
        self.client = client
        self.upstream = upstream
        self.lost_reply = False
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def reset(self, *, flush_upstream: bool = False) -> None:
        """Abort both sides with an RST (SO_LINGER 0), not a graceful FIN.

        With `flush_upstream` the server's side is closed gracefully instead, so a
        request just written still reaches it (an RST could discard it).
        """
        if self.closed:
            return
        self.closed = True
        for writer in self.writers:
            if flush_upstream and writer is self.upstream:
                writer.close()
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class FaultProxy:
    """A TCP proxy to `target_host:target_port` whose faults are switched at run time.

    Starts on construction (listening on `host:port`, a free port of 127.0.0.1 unless
    `port` is given); `close()` (or leaving the `with` block) stops it and resets every
    connection. See the module docstring for the modes.
    """

    def __init__(
        self, target_host: str, target_port: int, *, port: int = 0, name: str = "fault-proxy"
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self._mode = _MODES["pass_through"]
        self._triggers: list[_Trigger] = []
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._counts: dict[str, int] = {f.name: 0 for f in dataclasses.fields(ProxyStats)}
        self._stats_changed = threading.Condition()
        self._server: asyncio.Server | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._mode_changed = asyncio.Event()
        self._thread = threading.Thread(target=self._run_loop, name=name, daemon=True)
        self._thread.start()
        self.port = port
        self._call(self._listen())

    # -- thread plumbing -----------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            # Whatever is still running (a handler stuck connecting upstream) is
            # cancelled and finished here, so no coroutine outlives the loop.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                gathered = asyncio.gather(*pending, return_exceptions=True)
                self._loop.run_until_complete(gathered)
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("FaultProxy methods block: call them from another thread")
        if self._closed:
            coro.close()
            raise RuntimeError("the proxy is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._stats_changed:
            self._counts[name] += amount
            self._stats_changed.notify_all()

    # -- public API ----------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) clients connect to."""
        return (self.host, self.port)

    @property
    def mode(self) -> str:
        """Name of the current mode (``"delay"`` for `delay`)."""
        return self._mode.name

    def pass_through(self) -> None:
        """Forward both ways; held bytes flow on; listen again after `refuse`."""
        self._call(self._set_mode(_MODES["pass_through"]))

    def delay(self, seconds: float) -> None:
        """Forward every chunk both ways `seconds` after it arrived (order kept)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._call(self._set_mode(_Mode("delay", delay=seconds)))

    def stall(self) -> None:
        """Keep connections, accept new ones, forward nothing; hold the bytes."""
        self._call(self._set_mode(_MODES["stall"]))

    def hold_replies(self) -> None:
        """Forward requests; hold replies until the mode changes."""
        self._call(self._set_mode(_MODES["hold_replies"]))

    def half_open(self) -> None:
        """Forward requests; discard replies (the lost reply)."""
        self._call(self._set_mode(_MODES["half_open"]))

    def refuse(self) -> None:
        """Stop listening (ECONNREFUSED) and reset every open connection."""
        self._call(self._set_mode(_MODES["refuse"]))

    def drop(self) -> None:
        """Reset every open connection now; the mode is unchanged."""
        self._call(self._drop_all())

    def arm(
        self,
        match: bytes | None = None,
        *,
        action: Action = "reset",
        deliver: bool = True,
        count: int = 1,
    ) -> None:
        """Fire `action` on the next `count` requests containing `match` (None: any).

        `reset` resets that request's connection; `stall`, `hold_replies` and
        `half_open` switch the proxy to that mode. With `deliver` the request reaches
        the server first (a reset then loses its reply); without, it is held back (and
        lost with a reset, or held under `stall`).
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        self._call(self._arm(_Trigger(match, action, deliver, count)))

    def reset_next(
        self, match: bytes | None = None, *, deliver: bool = True, count: int = 1
    ) -> None:
        """`arm(match, action="reset", ...)`: the next matching request resets its connection."""
        self.arm(match, action="reset", deliver=deliver, count=count)

    def disarm(self) -> None:
        """Forget every armed trigger that has not fired."""
        self._call(self._arm(None))

    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._stats_changed:
            return ProxyStats(**self._counts)

    def wait_until(
        self, predicate: Callable[[ProxyStats], bool], timeout: float = 10.0
    ) -> ProxyStats:
        """Block until `predicate(stats())` holds; `TimeoutError` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._stats_changed:
            while True:
                stats = ProxyStats(**self._counts)
                if predicate(stats):
                    return stats
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"proxy stats never matched within {timeout}s: {stats}")
                self._stats_changed.wait(left)

    async def until(
        self, predicate: Callable[[ProxyStats], bool], timeout: float = 10.0
    ) -> ProxyStats:
        """`wait_until` from an event loop, without blocking it."""
        return await asyncio.to_thread(self.wait_until, predicate, timeout)

    def close(self) -> None:
        """Stop listening, reset every connection and stop the thread."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.host}:{self.port} -> {self.target_host}:{self.target_port}, "
            f"mode={self.mode})"
        )

    # -- inside the proxy's loop ---------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is not None:
            return
        deadline = time.monotonic() + CALL_TIMEOUT / 2
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError:
                sock.close()
                if self.port == 0 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)  # the port is briefly busy after refuse()
                continue
            break
        sock.listen(128)
        self.port = int(sock.getsockname()[1])
        self._server = await asyncio.start_server(self._accept, sock=sock)

    async def _set_mode(self, mode: _Mode) -> None:
        previous = self._mode
        self._mode = mode
        if previous.name == "half_open" and mode.name != "half_open":
            for connection in list(self._connections):
                if connection.lost_reply:
                    self._reset(connection)
        if not mode.listening:
            if self._server is not None:
                self._server.close()
                self._server = None
            await self._drop_all()
        else:
            await self._listen()
        self._mode_changed.set()
        self._mode_changed = asyncio.Event()

    async def _drop_all(self) -> None:
        for connection in list(self._connections):
            self._reset(connection)

    async def _arm(self, trigger: _Trigger | None) -> None:
        if trigger is None:
            self._triggers.clear()
        else:
            self._triggers.append(trigger)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._drop_all()
        handlers = set(self._handlers)
        for handler in handlers:  # also those still connecting upstream
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=CALL_TIMEOUT / 2)

    def _reset(self, connection: _Connection, *, flush_upstream: bool = False) -> None:
        if not connection.closed:
            connection.reset(flush_upstream=flush_upstream)
            self._count("resets")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._count("accepted")
        self._count("open")
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self._count("upstream_failures")
                _Connection(writer, None).reset()
                return
            except asyncio.CancelledError:  # closing while still connecting upstream
                writer.transport.abort()
                raise
            connection = _Connection(writer, up_writer)
            if not self._mode.listening:  # refuse() raced with this accept
                connection.reset()
                return
            self._connections.add(connection)
            try:
                connection.tasks = [
                    asyncio.ensure_future(self._pump(connection, reader, up_writer, _UP)),
                    asyncio.ensure_future(self._pump(connection, up_reader, writer, _DOWN)),
                ]
                await asyncio.gather(*connection.tasks, return_exceptions=True)
            finally:
                self._connections.discard(connection)
                if not connection.closed:
                    connection.closed = True
                    for side in connection.writers:
                        side.transport.abort()
        finally:
            self._count("open", -1)
            self._handlers.discard(handler)

    async def _pump(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: int,
    ) -> None:
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                if direction == _UP:
                    self._count("received_up", len(data))
                    if not await self._fire_triggers(connection, data, writer):
                        continue
                await self._forward(connection, data, writer, direction)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side finished: end the whole connection (both pumps).
            for task in connection.tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def _fire_triggers(
        self, connection: _Connection, data: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Run the first trigger matching `data`; False when `data` must not go on."""
        for trigger in self._triggers:
            if trigger.match is not None and trigger.match not in data:
                continue
            trigger.remaining -= 1
            if trigger.remaining == 0:
                self._triggers.remove(trigger)
            self._count("triggers")
            if trigger.action == "reset":
                if trigger.deliver:
                    writer.write(data)
                    self._count("bytes_up", len(data))
                    with contextlib.suppress(OSError, ConnectionError):
                        await writer.drain()
                self._reset(connection, flush_upstream=trigger.deliver)
                return False
            mode = _MODES[trigger.action]
            if trigger.deliver:
                writer.write(data)
                self._count("bytes_up", len(data))
                await self._set_mode(mode)
                return False
            await self._set_mode(mode)
            return True
        return True

    async def _forward(
        self, connection: _Connection, data: bytes, writer: asyncio.StreamWriter, direction: int
    ) -> None:
        held = "held_up" if direction == _UP else "held_down"
        arrived = asyncio.get_running_loop().time()
        holding = False
        try:
            while True:
                mode = self._mode
                flow = mode.up if direction == _UP else mode.down
                if flow == "discard":
                    connection.lost_reply = True
                    self._count("discarded_down", len(data))
                    return
                if flow == "hold" or not mode.listening:
                    if not holding:
                        holding = True
                        self._count(held, len(data))
                    await self._mode_changed.wait()
                    continue
                due = arrived + mode.delay
                wait = due - asyncio.get_running_loop().time()
                if wait > 0:
                    changed = self._mode_changed
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), wait)
                    continue
                break
        finally:
            if holding:
                self._count(held, -len(data))
        writer.write(data)
        self._count("bytes_up" if direction == _UP else "bytes_down", len(data))
        await writer.drain()
