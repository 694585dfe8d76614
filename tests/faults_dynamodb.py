"""Network faults for the DynamoDB tests, all on 127.0.0.1.

- `frozen_server()`: a TCP listener that accepts connections and never answers (a
  server stopped with SIGSTOP, or a half-open connection, looks the same to a client).
- `ReplyDroppingProxy`: an HTTP proxy in front of moto that forwards every request and,
  for the operations it is told to, lets the server execute the request and then drops
  the reply (closes the client's connection). botocore sees a closed connection and
  resends the request: the "lost reply" every store write must be safe to repeat for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Iterator

__all__ = ["FrozenServer", "ReplyDroppingProxy", "frozen_server"]

_TARGET = b"x-amz-target:"
_IO_TIMEOUT = 30.0


class FrozenServer:
    """What `frozen_server()` yields: its URL and the connections it accepted."""

    def __init__(self, url: str) -> None:
        self.endpoint_url = url
        self.connections = 0


@contextlib.contextmanager
def frozen_server() -> Iterator[FrozenServer]:
    """A server that accepts connections and never sends a byte."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(connection)
            server.connections += 1

    server = FrozenServer(f"http://127.0.0.1:{listener.getsockname()[1]}")
    thread = threading.Thread(target=accept, name="frozen-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for connection in held:
            connection.close()


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 message framed by Content-Length (botocore and moto both send it)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IO_TIMEOUT)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await asyncio.wait_for(reader.readexactly(length), _IO_TIMEOUT) if length else b""
    return head + body


def _operation(request: bytes) -> str:
    for line in request.split(b"\r\n"):
        if line.lower().startswith(_TARGET):
            return line[len(_TARGET) :].strip().decode().rsplit(".", 1)[-1]
    return ""


class ReplyDroppingProxy:
    """Forwards HTTP requests to `upstream`; drops the next replies of chosen operations.

    `drop("UpdateItem", 1)` makes the next UpdateItem reach the server, execute, and
    lose its reply. `seen` counts the requests that reached the server per operation.
    Runs in the event loop of the test (start with `async with`).
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.seen: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._to_drop: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def drop(self, operation: str, count: int = 1) -> None:
        """Lose the replies of the next `count` requests of `operation`."""
        self._to_drop[operation] += count

    async def __aenter__(self) -> ReplyDroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.wait_for(self._server.wait_closed(), 10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.add(up_writer)
        try:
            while True:
                request = await _read_message(reader)
                if request is None:
                    return
                operation = _operation(request)
                up_writer.write(request)
                await up_writer.drain()
                reply = await _read_message(up_reader)
                self.seen[operation] += 1
                if reply is None:
                    return
                if self._to_drop[operation] > 0:
                    self._to_drop[operation] -= 1
                    self.dropped[operation] += 1
                    return  # executed by the server, reply lost: close the connection
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return
        finally:
            for stream in (writer, up_writer):
                stream.close()
                self._writers.discard(stream)
