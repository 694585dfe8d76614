"""The connections the sync redis-py adapter sends its commands on, taken from the
client's own pool (hand-written; see `SyncRedisPyCacheClient`).

redis-py's pool checkout and return (its lock, a poll of the socket for unread data,
its metrics and event hooks) cost about 27 µs of client CPU per command, more than
sending the command and reading its reply (docs/redis-valkey.md, Sync code).
`PoolConnections` keeps the connections it borrowed between commands, so taking one is
a list pop: about one per thread that ran a call at the same time, and at most a
quarter of the pool's `max_connections` (redis-py's default is 100) and `KEEP_IDLE`, so
that the application's own commands on the same client keep most of the pool. From a
``BlockingConnectionPool`` it borrows and returns one per command, as the client does:
a thread may be waiting there for a connection to come back.

Only a connection whose reply was read whole is kept; one that failed, timed out or
was interrupted is disconnected before it goes back to the pool, so no command can
read a reply meant for another (the pool's poll for unread data is what this replaces).
A forked child drops the parent's connections (the pool starts afresh there too).
"""

from __future__ import annotations

from typing import Any

from aioidempotency._forks import fork_generation

__all__ = ["KEEP_IDLE", "PoolConnections", "idle_bound"]

KEEP_IDLE = 32
"""The most connections kept idle between commands, whatever the pool's bound."""


def idle_bound(pool: Any) -> int:
    """How many connections to keep idle from `pool` (see the module)."""
    if type(pool).__name__ == "BlockingConnectionPool":
        return 0
    limit = getattr(pool, "max_connections", None)
    if not isinstance(limit, int) or limit < 1:
        return 0
    return min(KEEP_IDLE, limit // 4)


class PoolConnections:
    """Takes connections from a redis-py `pool` and gives them back, keeping up to
    `keep` of them idle between commands (0: each goes back to the pool at once).
    Thread-safe: a list's pop and append are atomic."""

    def __init__(self, pool: Any, *, keep: int, pool_args: tuple[str, ...] = ()) -> None:
        self.pool = pool
        self.keep = keep
        self._pool_args = pool_args
        self._idle: list[Any] = []
        self._generation = fork_generation()

    def take(self) -> Any:
        """A connection ready for a command: one kept idle, else one from the pool."""
        if self._generation != fork_generation():
            # A forked child: the parent's connections are its own (never closed here).
            self._idle, self._generation = [], fork_generation()
        try:
            return self._idle.pop()
        except IndexError:
            return self.pool.get_connection(*self._pool_args)

    def give_back(self, connection: Any) -> None:
        """Give back a connection whose last reply was read whole."""
        reconnect = getattr(connection, "should_reconnect", None)
        if reconnect is not None and reconnect():  # the server announced maintenance
            connection.disconnect()
        if len(self._idle) < self.keep and self._generation == fork_generation():
            self._idle.append(connection)
        else:
            self.pool.release(connection)

    def discard(self, connection: Any) -> None:
        """Give back a connection whose reply may still be on its way: disconnected, so
        that no later command reads it."""
        connection.disconnect()
        self.pool.release(connection)

    def idle(self) -> int:
        """How many connections are kept idle now."""
        return len(self._idle)
