"""The fault proxy itself, against a real redis-server through redis-py: each mode and
action does what its docstring says.

Clients here never retry (one attempt, short socket timeout), so every fault is seen
as it is. What reached the server is read on its real port, not through the proxy.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.proxy import FaultProxy
from tests.faults.servers import ManagedServer, free_port

BOUND = 10.0


@pytest.fixture(scope="module")
def server() -> Iterator[ManagedServer]:
    with ManagedServer("redis") as running:
        yield running


@pytest.fixture
def proxy(server: ManagedServer) -> Iterator[FaultProxy]:
    server.admin().flushall()
    with FaultProxy(server.host, server.port) as running:
        yield running


def client(proxy: FaultProxy, timeout: float = 0.3) -> redis.Redis:
    """One attempt per command, no retry, short timeouts."""
    return redis.Redis(
        proxy.host,
        proxy.port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def eventually(check: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    """Poll `check` until it holds (a bound, not a synchronisation stand-in)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never true within {timeout}s: {what}")
        time.sleep(0.01)


def assert_reset(sock: socket.socket) -> None:
    """`sock` was reset by the proxy (RST, not a graceful close)."""
    with sock, pytest.raises(ConnectionResetError):
        sock.recv(100)


def test_pass_through_forwards_and_counts(proxy: FaultProxy, server: ManagedServer) -> None:
    with client(proxy) as c:
        assert c.set("k", "v") is True
        assert c.get("k") == b"v"
    stats = proxy.stats()
    assert stats.accepted == 1
    assert stats.bytes_up > 0
    assert stats.bytes_down > 0
    assert stats.received_up == stats.bytes_up
    assert server.admin().get("k") == b"v"
    assert proxy.mode == "pass_through"


def test_delay_postpones_each_chunk(proxy: FaultProxy) -> None:
    with client(proxy, timeout=2.0) as c:
        c.ping()
        proxy.delay(0.4)
        assert proxy.mode == "delay"
        with client(proxy, timeout=0.2) as impatient, pytest.raises(redis.TimeoutError):
            impatient.set("slow", "1")
        assert c.set("patient", "1") is True  # 2 x 0.4 s < 2 s
    proxy.pass_through()
    with client(proxy) as c:
        assert c.get("patient") == b"1"


def test_stall_holds_bytes_and_releases_them_on_thaw(
    proxy: FaultProxy, server: ManagedServer
) -> None:
    with client(proxy) as c:
        c.ping()
        proxy.stall()
        with pytest.raises(redis.TimeoutError):
            c.set("frozen", "1")
        stats = proxy.stats()
        assert stats.held_up > 0
        assert server.admin().get("frozen") is None  # the request never reached it
        # New connections are accepted but nothing answers either.
        with client(proxy) as other, pytest.raises(redis.TimeoutError):
            other.ping()
        before = proxy.stats().bytes_up
        proxy.pass_through()
    # A frozen server, thawed: the held request is served late.
    proxy.wait_until(lambda s: s.held_up == 0 and s.bytes_up > before)
    eventually(lambda: server.admin().get("frozen") == b"1", "held SET served after thaw")


def test_hold_replies_lets_requests_through_and_holds_replies(
    proxy: FaultProxy, server: ManagedServer
) -> None:
    with socket.create_connection(proxy.address, timeout=BOUND) as raw:
        proxy.hold_replies()
        raw.sendall(b"SET done-but-unknown 1\r\n")
        eventually(lambda: server.admin().get("done-but-unknown") == b"1", "request served")
        proxy.wait_until(lambda s: s.held_down > 0)
        raw.settimeout(0.2)
        with pytest.raises(TimeoutError):
            raw.recv(100)
        proxy.pass_through()
        raw.settimeout(BOUND)
        assert raw.recv(100) == b"+OK\r\n"  # the held reply, delivered late
    assert proxy.stats().held_down == 0


def test_half_open_loses_replies_then_resets_those_connections(
    proxy: FaultProxy, server: ManagedServer
) -> None:
    lossy = socket.create_connection(proxy.address, timeout=BOUND)
    clean = socket.create_connection(proxy.address, timeout=BOUND)
    proxy.wait_until(lambda s: s.open == 2)
    proxy.half_open()
    lossy.sendall(b"SET lost-reply 1\r\n")
    eventually(lambda: server.admin().get("lost-reply") == b"1", "request served")
    proxy.wait_until(lambda s: s.discarded_down > 0)
    resets = proxy.stats().resets
    proxy.pass_through()
    # The connection that lost a reply is reset; the clean one is kept.
    assert proxy.stats().resets == resets + 1
    assert_reset(lossy)
    clean.sendall(b"PING\r\n")
    assert clean.recv(100) == b"+PONG\r\n"
    clean.close()
    with client(proxy) as fresh:
        assert fresh.get("lost-reply") == b"1"


def test_refuse_closes_the_port_and_resets_connections(proxy: FaultProxy) -> None:
    raw = socket.create_connection(proxy.address, timeout=BOUND)
    proxy.wait_until(lambda s: s.open == 1)
    proxy.refuse()
    assert proxy.mode == "refuse"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=BOUND).close()
    assert_reset(raw)
    with client(proxy) as c, pytest.raises(redis.ConnectionError):
        c.ping()
    proxy.pass_through()
    with client(proxy) as c:
        assert c.ping() is True
    assert proxy.stats().open <= 1


def test_drop_resets_open_connections_and_keeps_the_mode(proxy: FaultProxy) -> None:
    raw = socket.create_connection(proxy.address, timeout=BOUND)
    raw.sendall(b"PING\r\n")
    assert raw.recv(100) == b"+PONG\r\n"
    resets = proxy.stats().resets
    proxy.drop()
    assert proxy.stats().resets == resets + 1
    assert proxy.mode == "pass_through"
    assert_reset(raw)
    with client(proxy) as c:
        assert c.ping() is True  # new connections work


@pytest.mark.parametrize("deliver", [True, False])
def test_reset_next_on_a_matching_request(
    proxy: FaultProxy, server: ManagedServer, deliver: bool
) -> None:
    with client(proxy) as c:
        c.ping()
        proxy.reset_next(b"MARK", deliver=deliver)
        assert c.set("other", "1") is True  # does not match: untouched
        with pytest.raises(redis.ConnectionError):
            c.set("marked", "MARK")
        assert proxy.stats().triggers == 1
        assert c.set("after", "MARK") is True  # one-shot (count=1)
    if deliver:
        eventually(lambda: server.admin().get("marked") == b"MARK", "delivered before reset")
    else:
        assert server.admin().get("marked") is None


def test_arm_switches_mode_on_a_matching_request(proxy: FaultProxy, server: ManagedServer) -> None:
    with client(proxy) as c:
        c.ping()
        proxy.arm(b"SWITCH", action="half_open")
        with pytest.raises(redis.TimeoutError):
            c.set("k", "SWITCH")
        assert proxy.mode == "half_open"
        eventually(lambda: server.admin().get("k") == b"SWITCH", "delivered, reply lost")
    proxy.arm(b"NEVER", action="stall")
    proxy.disarm()
    proxy.pass_through()
    with client(proxy) as c:
        assert c.set("k2", "NEVER") is True
    assert proxy.mode == "pass_through"


def test_unreachable_target_resets_clients() -> None:
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        with client(proxy) as c, pytest.raises(redis.ConnectionError):
            c.ping()
        assert proxy.stats().upstream_failures >= 1


def test_close_stops_listening() -> None:
    with ManagedServer("redis") as server:
        proxy = FaultProxy(server.host, server.port)
        address = proxy.address
        proxy.close()
        proxy.close()  # idempotent
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=BOUND).close()
        with pytest.raises(RuntimeError):
            proxy.stall()


async def test_switched_from_another_thread_while_an_async_client_runs(
    proxy: FaultProxy, server: ManagedServer
) -> None:
    c = redis.asyncio.Redis(host=proxy.host, port=proxy.port, socket_timeout=5.0)
    try:
        await c.ping()
        await asyncio.to_thread(proxy.stall)
        pending = asyncio.ensure_future(c.set("async", "1"))
        await proxy.until(lambda s: s.held_up > 0)
        assert not pending.done()
        threading.Thread(target=proxy.pass_through).start()
        assert await asyncio.wait_for(pending, BOUND) is True
    finally:
        await c.aclose()
    assert server.admin().get("async") == b"1"
