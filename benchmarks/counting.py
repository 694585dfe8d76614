"""Count the requests each client sends to its store, on the client side.

Every wrapper counts one request per command (or script invocation, or HTTP request)
that leaves the client, so retries and fallbacks are counted too. A wrapper costs a
function call per request (well under 1 us), negligible next to a round trip.
Server-side statistics cannot do this job: Valkey's ``INFO commandstats`` also counts
the commands that a Lua script runs inside the server.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = [
    "RequestCounter",
    "count_botocore",
    "count_glide",
    "count_redis_async",
    "count_redis_sync",
]


class RequestCounter:
    """A thread-safe count of requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    @property
    def value(self) -> int:
        with self._lock:
            return self._value


def count_redis_async(client: Any, counter: RequestCounter) -> Any:
    """Count every command of a `redis.asyncio` client (EVALSHA and its EVAL fallback too),
    and every command of its pipelines (the cache store pipelines ``EVALSHA`` + ``WAIT``
    when it waits for replicas: two commands, one round trip)."""
    original = client.execute_command
    make_pipeline = client.pipeline

    async def execute_command(*args: Any, **options: Any) -> Any:
        counter.add()
        return await original(*args, **options)

    def pipeline(*args: Any, **options: Any) -> Any:
        pipe = make_pipeline(*args, **options)
        execute = pipe.execute

        async def counted(*args: Any, **options: Any) -> Any:
            counter.add(len(pipe.command_stack))
            return await execute(*args, **options)

        pipe.execute = counted
        return pipe

    client.execute_command = execute_command
    client.pipeline = pipeline
    return client


#: Commands a redis-py connection sends for itself when it connects (not requests).
_HANDSHAKE = frozenset({"HELLO", "AUTH", "CLIENT", "SELECT", "READONLY"})


def count_redis_sync(client: Any, counter: RequestCounter) -> Any:
    """Count every command a synchronous `redis.Redis` client's connections send (the
    sync store sends its scripts on pooled connections, not through
    ``execute_command``), less each connection's handshake."""
    pool = client.connection_pool
    make = pool.make_connection

    def make_connection() -> Any:
        connection = make()
        send = connection.send_command

        def send_command(*args: Any, **options: Any) -> Any:
            if str(args[0]).upper() not in _HANDSHAKE:
                counter.add()
            return send(*args, **options)

        connection.send_command = send_command
        return connection

    pool.make_connection = make_connection
    return client


def count_glide(client: Any, counter: RequestCounter) -> Any:
    """Count every command and script invocation of a valkey-glide client, and every
    command of its batches (``exec``).

    glide loads a script the server does not know yet inside its core, invisibly to
    Python; the benchmark warms every script up before it counts.
    """
    command = client._execute_command
    script = client._execute_script
    batch = client._execute_batch

    async def execute_batch(commands: Any, *args: Any, **kwargs: Any) -> Any:
        counter.add(len(commands))
        return await batch(commands, *args, **kwargs)

    async def execute_command(*args: Any, **kwargs: Any) -> Any:
        counter.add()
        return await command(*args, **kwargs)

    async def execute_script(*args: Any, **kwargs: Any) -> Any:
        counter.add()
        return await script(*args, **kwargs)

    client._execute_command = execute_command
    client._execute_script = execute_script
    client._execute_batch = execute_batch
    return client


def count_glide_sync(client: Any, counter: RequestCounter) -> Any:
    """Count every command and script invocation of a `glide_sync` client."""
    command = client._execute_command
    script = client._execute_script

    def execute_command(*args: Any, **kwargs: Any) -> Any:
        counter.add()
        return command(*args, **kwargs)

    def execute_script(*args: Any, **kwargs: Any) -> Any:
        counter.add()
        return script(*args, **kwargs)

    client._execute_command = execute_command
    client._execute_script = execute_script
    return client


def count_botocore(client: Any, counter: RequestCounter) -> Any:
    """Count every HTTP request (retries included) of a boto3 or aiobotocore client."""

    def before_send(**_: Any) -> None:
        counter.add()

    client.meta.events.register("before-send.dynamodb", before_send)
    return client
