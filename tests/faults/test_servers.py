"""`ManagedServer`: kill, freeze, thaw and restart do what they say, and cleanup
always works (also on a frozen server)."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.servers import ManagedServer, managed_server
from tests.servers.redis import Kind


def one_shot(server: ManagedServer, timeout: float = 0.3) -> redis.Redis:
    return redis.Redis(
        server.host,
        server.port,
        password=server.password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_restart_without_persistence_loses_data(kind: Kind) -> None:
    with managed_server(kind) as server:
        server.admin().set("k", "v")
        port = server.port
        server.kill()
        assert not server.running
        with one_shot(server) as c, pytest.raises(redis.ConnectionError):
            c.ping()
        server.restart()
        assert server.port == port
        assert server.starts == 2
        assert server.admin().get("k") is None


def test_restart_with_aof_keeps_acknowledged_writes() -> None:
    with managed_server("redis", aof=True) as server:
        server.admin().set("k", "v")
        server.kill()  # SIGKILL: only appendfsync always makes this safe
        server.restart()
        assert server.admin().get("k") == b"v"


def test_freeze_and_thaw() -> None:
    with managed_server("redis") as server:
        with one_shot(server) as c:
            c.ping()
            server.freeze()
            assert server.frozen
            assert server.running
            with pytest.raises(redis.TimeoutError):
                c.set("k", "v")
            server.thaw()
        assert not server.frozen
        with one_shot(server, timeout=5) as c:
            assert c.ping() is True


def test_stop_a_frozen_server() -> None:
    server = ManagedServer("redis")
    server.freeze()
    server.stop()
    assert not server.running
    assert not server.directory.exists()


def test_password_then_restart_clears_it() -> None:
    with managed_server("redis") as server:
        server.set_password("s3cret")
        assert server.url.startswith("redis://:s3cret@")
        anonymous = redis.Redis(server.host, server.port, socket_timeout=1)
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        assert server.admin().ping() is True
        server.restart()
        assert server.password is None
        assert server.admin().ping() is True
