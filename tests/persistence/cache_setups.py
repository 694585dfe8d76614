"""Server setups for the cache adapter tests: a primary with a replica of its own (for
``wait_replicas``) and ACL users (for commands a server refuses)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

from tests.servers.redis import Server, ServerPool

CONNECT_TIMEOUT = 30.0


def primary_with_replica(pool: ServerPool) -> tuple[Server, Server]:
    """A Valkey primary and one replica of it (not shared with other tests), once the
    replica acknowledges writes: connected is not enough, a replica still in its first
    full sync is counted as connected but acknowledges nothing (WAIT gets 0)."""
    primary = pool._start("valkey")
    replica = pool._start("valkey", "--replicaof", primary.host, str(primary.port))
    deadline = time.monotonic() + CONNECT_TIMEOUT
    probe = f"replication-probe-{uuid.uuid4().hex}"
    with primary.admin() as admin:
        while True:
            admin.set(probe, "1")
            if int(admin.execute_command("WAIT", 1, 100)) >= 1:
                break
            assert time.monotonic() < deadline, "the replica never acknowledged a write"
        admin.delete(probe)
    return primary, replica


@contextlib.contextmanager
def acl_user(nodes: list[Server], *rules: str, password: str = "pw") -> Iterator[str]:
    """An ACL user on every node of `nodes` with `password` and `rules` on every key,
    deleted afterwards."""
    user = f"app{uuid.uuid4().hex[:8]}"
    for node in nodes:
        with node.admin() as admin:
            admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", *rules)
    try:
        yield user
    finally:
        for node in nodes:
            with node.admin() as admin:
                admin.execute_command("ACL", "DELUSER", user)


def set_password(nodes: list[Server], user: str, password: str) -> None:
    """Replace `user`'s password on every node and drop the user's connections, as an
    operator rotating a password does."""
    for node in nodes:
        with node.admin() as admin:
            admin.execute_command("ACL", "SETUSER", user, "resetpass", f">{password}")
            admin.execute_command("CLIENT", "KILL", "USER", user)
