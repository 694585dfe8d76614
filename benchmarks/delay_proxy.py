"""A TCP proxy that holds every chunk for half a round-trip time in each direction.

In-process, for the latency check of `benchmarks.latency`: a client pointed at the
proxy sees its server as if it were `rtt` seconds away. Each direction of each
connection has a reader thread (``recv``, stamp, queue) and a writer thread (sleep
until the chunk's due time, ``sendall``), so a chunk never waits behind the delay of
the one before it beyond its own due time, and order is kept. Threads sleep with
`time.sleep` (a few tens of microseconds late on Linux), not on an event loop's
millisecond-rounded timeouts; the delay each chunk actually got is recorded, so that
a result can be compared at the round-trip time that was delivered. A chunk's delay
counts from its arrival as the kernel stamped it (``SO_TIMESTAMPNS``), so the time a
reader thread takes to wake up (a busy machine, this process's GIL) is inside the
delay it gets, not on top of it.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator

__all__ = ["DelayProxy", "delay_proxy"]

_SO_TIMESTAMPNS: int | None = getattr(socket, "SO_TIMESTAMPNS", None)  # Linux


class DelayProxy:
    """Listens on 127.0.0.1 (`port`), forwards to `upstream` with `rtt` / 2 each way."""

    def __init__(self, upstream: tuple[str, int], rtt: float) -> None:
        self.upstream = upstream
        self.one_way = rtt / 2
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(512)
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._delays = 0.0
        self._chunks = 0
        self._closed = False
        self._start(self._accept)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        self._start(self._read, source, chunks)
        self._start(self._write, sink, chunks)

    def _read(self, source: socket.socket, chunks: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        stamped = _SO_TIMESTAMPNS is not None
        if _SO_TIMESTAMPNS is not None:  # the kernel stamps each chunk's arrival
            source.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        while True:
            arrived = None
            try:
                if stamped:
                    data, ancillary, _, _ = source.recvmsg(1 << 16, socket.CMSG_SPACE(16))
                    arrived = _arrival(ancillary)
                else:
                    data = source.recv(1 << 16)
            except OSError:
                data = b""
            chunks.put((time.perf_counter() if arrived is None else arrived, data))
            if not data:
                return

    def _write(self, sink: socket.socket, chunks: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        while True:
            received, data = chunks.get()
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            wait = received + self.one_way - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                sink.sendall(data)
            except OSError:
                return
            delay = time.perf_counter() - received
            with self._lock:
                self._delays += delay
                self._chunks += 1

    def delivered_rtt(self) -> float | None:
        """Twice the mean delay the chunks got so far (seconds), None before any chunk."""
        with self._lock:
            return 2 * self._delays / self._chunks if self._chunks else None

    def reset(self) -> None:
        """Forget the delays recorded so far."""
        with self._lock:
            self._delays, self._chunks = 0.0, 0

    def close(self) -> None:
        """Stop accepting, close every connection, wait (bounded) for the threads."""
        with self._lock:
            self._closed = True
            sockets, threads = list(self._sockets), list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        deadline = time.monotonic() + 5
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """The kernel's arrival stamp of a chunk (wall clock), on the `perf_counter` scale."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return float(seconds + nanoseconds / 1e9 - (time.time() - time.perf_counter()))
    return None


@contextlib.contextmanager
def delay_proxy(upstream: tuple[str, int], rtt: float) -> Iterator[DelayProxy]:
    """A running `DelayProxy`; closed on exit."""
    proxy = DelayProxy(upstream, rtt)
    try:
        yield proxy
    finally:
        proxy.close()
