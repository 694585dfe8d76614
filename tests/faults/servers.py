"""Redis/Valkey servers a test may kill, freeze and restart.

`ManagedServer` is one standalone redis-server or valkey-server on a free port of
127.0.0.1, in a temp directory of its own, for one test (or one module)::

    with managed_server("redis") as server:
        store = store_from_url(server.url + "?timeout=0.5")
        server.freeze()      # SIGSTOP: connections stay open, nothing answers
        server.thaw()        # SIGCONT
        server.kill()        # SIGKILL: connections reset, port refuses
        server.restart()     # same port, same directory; returns once PING answers

Persistence is OFF by default: a restart starts EMPTY (every record is lost), which is
the point of the data-loss scenarios. `aof=True` turns on ``appendonly yes`` with
``appendfsync always``, so every acknowledged write survives a kill and a restart.

Cleanup always happens on exit (also after `freeze()`: SIGCONT before SIGTERM, then
SIGKILL past a bound) and the directory is removed. `password` (set with
`set_password`) is used by `admin()` and `url`, and by the readiness check of
`restart()`. Every wait is bounded (`START_TIMEOUT`, `STOP_TIMEOUT`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import redis

from tests.servers.redis import Kind, server_binary

__all__ = ["START_TIMEOUT", "STOP_TIMEOUT", "ManagedServer", "free_port", "managed_server"]

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManagedServer:
    """One server process under the test's control. Starts on construction."""

    host = "127.0.0.1"

    def __init__(
        self,
        kind: Kind = "redis",
        *,
        aof: bool = False,
        extra: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.kind: Kind = kind
        self.aof = aof
        self.extra = tuple(extra)
        self.password: str | None = None
        self.directory = Path(tempfile.mkdtemp(prefix=f"aioidem-fault-{kind}-"))
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.starts = 0
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    # -- addresses and clients -----------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://`` (or ``valkey://``) URL of the real port, with the password if set."""
        scheme = "valkey" if self.kind == "valkey" else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}"

    def admin(self, *, timeout: float = 5.0) -> redis.Redis:
        """A synchronous redis-py client on the real port (not through any proxy)."""
        return redis.Redis(self.host, self.port, password=self.password, socket_timeout=timeout)

    def log(self) -> str:
        """The tail of the server's log."""
        path = self.directory / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    @property
    def running(self) -> bool:
        """The process is alive (possibly frozen)."""
        return self.process is not None and self.process.poll() is None

    # -- faults --------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the server and reap it; with persistence off its data is gone."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(STOP_TIMEOUT)
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections (kernel backlog), nothing answers."""
        if not self.running:
            raise RuntimeError("cannot freeze a server that is not running")
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT after `freeze`; queued requests are then served."""
        if self.running and self.frozen:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)
        self.frozen = False

    def restart(self, *, timeout: float = START_TIMEOUT) -> None:
        """Stop the server if it runs, start it again on the same port and directory.

        Returns once PING answers (bounded by `timeout`). Without `aof` it starts empty.
        The password set by `set_password` is not kept (CONFIG SET is not persisted).
        """
        self._terminate()
        self.password = None
        self._start(timeout=timeout)

    def stop(self) -> None:
        """Stop for good and remove the directory (idempotent)."""
        self._terminate()
        shutil.rmtree(self.directory, ignore_errors=True)

    def set_password(self, password: str | None) -> None:
        """``CONFIG SET requirepass``: new connections must authenticate (None: clear it)."""
        with self.admin() as client:
            client.config_set("requirepass", password or "")
        self.password = password

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "frozen" if self.frozen else ("running" if self.running else "stopped")
        return f"ManagedServer({self.kind}, port={self.port}, aof={self.aof}, {state})"

    # -- internals -----------------------------------------------------------------------

    def _args(self) -> list[str]:
        args = [server_binary(self.kind), "--port", str(self.port), "--bind", self.host]
        args += ["--save", "", "--dir", str(self.directory), "--protected-mode", "no"]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return [*args, "--shutdown-on-sigterm", "nosave", *self.extra]

    def _start(self, *, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            return
        with open(self.directory / "server.log", "ab") as log:
            self.process = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        self.frozen = False
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind}-server on port {self.port} exited:\n{self.log()}")
            with (
                contextlib.suppress(redis.ConnectionError, redis.TimeoutError, redis.ResponseError),
                self.admin(timeout=1.0) as client,
            ):
                if client.ping():
                    return
            if time.monotonic() > deadline:
                self._terminate()
                raise RuntimeError(
                    f"{self.kind}-server on port {self.port} not ready after {timeout}s:\n"
                    f"{self.log()}"
                )
            time.sleep(delay)  # readiness polling, bounded by the deadline
            delay = min(delay * 2, 0.1)

    def _terminate(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            self.frozen = False
            return
        with contextlib.suppress(ProcessLookupError):
            if self.frozen:
                os.kill(process.pid, signal.SIGCONT)
            process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
        self.frozen = False


@contextlib.contextmanager
def managed_server(
    kind: Kind = "redis", *, aof: bool = False, extra: Sequence[str] = ()
) -> Iterator[ManagedServer]:
    """A `ManagedServer` stopped (and its directory removed) on exit, whatever happened."""
    server = ManagedServer(kind, aof=aof, extra=extra)
    try:
        yield server
    finally:
        server.stop()
