"""Stores under test behind a fault proxy, with an admin view of what they hold.

A `Rig` is one store kind wired for fault injection: `store` talks to its server
through `proxy` (short client timeouts, so a fault shows within a second or two),
while `records()` reads what is really stored through the server's own port. Kinds
(`RIG_KINDS`): ``valkey_glide`` (Valkey + glide, atomic scripts), ``redis_atomic``
(Redis + redis-py, scripts), ``redis_protocol`` (Redis + redis-py, get/set/delete
path, ``atomic=false``) and ``dynamodb`` (moto, in-process, behind the proxy).

`FaultTable` collects one row per scenario (fault, store, calls, executions, keys
left locked, errors by type, seconds to error and to recovery); the suite prints it
at the end of the run (see conftest's terminal summary).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aioidempotency import IdempotencyConfig, IdempotencyEngine
from aioidempotency.exceptions import IdempotencyError
from aioidempotency.persistence import PersistenceLayer, store_from_url
from tests.faults.proxy import FaultProxy
from tests.faults.servers import ManagedServer

__all__ = [
    "CACHE_QUERY",
    "CACHE_RIGS",
    "CLIENT_TIMEOUT",
    "RIG_KINDS",
    "FaultRow",
    "FaultTable",
    "Rig",
    "StoredRecord",
    "client_cause",
    "error_name",
]

CLIENT_TIMEOUT = 0.5
"""Socket/request timeout of every store under test (seconds)."""
RIG_KINDS = ["valkey_glide", "redis_atomic", "redis_protocol", "dynamodb"]
CACHE_RIGS = RIG_KINDS[:3]
CACHE_QUERY = {
    "valkey_glide": "client=glide&atomic=true",
    "redis_atomic": "client=redis&atomic=true",
    "redis_protocol": "client=redis&atomic=false",
}


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    """What the server holds under a key, read on its real port."""

    key: str
    status: str
    in_progress_expiration: int | None  # epoch ms
    owner: str | None
    data: str | None

    def live_in_progress(self, now: float) -> bool:
        """An INPROGRESS record whose lease has not run out at `now` (epoch s)."""
        return self.status == "INPROGRESS" and (
            self.in_progress_expiration is None or self.in_progress_expiration >= now * 1000
        )


@dataclasses.dataclass
class Rig:
    """A store behind `proxy`, plus an admin view on the server's real port."""

    kind: str
    store: PersistenceLayer
    via: FaultProxy | None  # None: the store talks to the server's real port
    server: ManagedServer | None = None  # None for DynamoDB (moto is in-process)
    admin_layer: Any = None  # DynamoDB: a layer on moto's real port
    url: str = ""
    engines: list[IdempotencyEngine] = dataclasses.field(default_factory=list)

    @property
    def proxy(self) -> FaultProxy:
        """The proxy between the store and its server."""
        assert self.via is not None, "this rig has no proxy"
        return self.via

    def engine(self, *, lease: float | None = 1.0, **config: Any) -> IdempotencyEngine:
        """An engine on this store with a short in-progress lease."""
        config.setdefault("expires_after_seconds", 120)
        return self.track(
            IdempotencyEngine(
                self.store,
                IdempotencyConfig(in_progress_lease_seconds=lease, **config),
                key_prefix=f"faults-{uuid.uuid4().hex[:8]}",
            )
        )

    def track(self, engine: IdempotencyEngine) -> IdempotencyEngine:
        """Have `aclose` drain `engine`'s background work first."""
        self.engines.append(engine)
        return engine

    async def records(self) -> dict[str, StoredRecord]:
        """Every idempotency record the server holds (helper keys left out)."""
        if self.server is not None:
            with self.server.admin() as admin:
                found: dict[str, StoredRecord] = {}
                for raw_key in admin.scan_iter(match="*", count=1000):
                    key = raw_key.decode()
                    if key.endswith(":lock"):
                        continue  # the protocol path's takeover lock
                    value = admin.get(key)
                    if value is None:
                        continue
                    attrs = json.loads(value)
                    found[key] = StoredRecord(
                        key,
                        str(attrs.get("status")),
                        attrs.get("in_progress_expiration"),
                        attrs.get("owner_token"),
                        attrs.get("data"),
                    )
                return found
        client = await self.admin_layer.client()
        found = {}
        pages = client.get_paginator("scan").paginate(
            TableName=self.admin_layer.table_name, ConsistentRead=True
        )
        async for page in pages:
            for item in page["Items"]:
                lease = item.get("in_progress_expiration", {}).get("N")
                key = item["id"]["S"]
                found[key] = StoredRecord(
                    key,
                    item["status"]["S"],
                    None if lease is None else int(lease),
                    item.get("owner_token", {}).get("S"),
                    item.get("data", {}).get("S"),
                )
        return found

    async def locked_keys(self) -> list[str]:
        """Keys held by a live in-progress claim right now."""
        now = time.time()
        return sorted(k for k, r in (await self.records()).items() if r.live_in_progress(now))

    async def aclose(self, *, drain: float = 15.0) -> None:
        """Heal every fault, let the engines' background releases and completions
        finish (so none outlives the test and reopens a client later), close."""
        if self.via is not None:
            self.via.disarm()
            self.via.pass_through()
        if self.server is not None:
            self.server.thaw()
            if not self.server.running:
                self.server.restart()
            if self.server.password is not None:
                self.server.set_password(None)
        for engine in self.engines:
            await engine.drain(drain)
        await self.store.aclose()


async def make_cache_rig(kind: str, server: ManagedServer, proxy: FaultProxy) -> Rig:
    scheme = "valkey" if server.kind == "valkey" else "redis"
    url = f"{scheme}://{proxy.host}:{proxy.port}?{CACHE_QUERY[kind]}&timeout={CLIENT_TIMEOUT}"
    return Rig(kind, store_from_url(url), proxy, server=server, url=url)


async def make_dynamodb_rig(endpoint: str, proxy: FaultProxy, session: Any) -> Rig:
    from aioidempotency._async.dynamodb import DynamoDBPersistenceLayer

    table = f"faults-{uuid.uuid4().hex[:12]}"
    admin = DynamoDBPersistenceLayer(table, endpoint_url=endpoint, session=session)
    await admin.create_table(exist_ok=False)
    url = (
        f"dynamodb://{table}?endpoint_url=http://{proxy.host}:{proxy.port}"
        f"&connect_timeout={CLIENT_TIMEOUT}&read_timeout={CLIENT_TIMEOUT}&max_attempts=1"
    )
    return Rig("dynamodb", store_from_url(url), proxy, admin_layer=admin, url=url)


async def drop_dynamodb_rig(rig: Rig) -> None:
    client = await rig.admin_layer.client()
    await client.delete_table(TableName=rig.admin_layer.table_name)
    await rig.admin_layer.aclose()


def client_cause(exc: BaseException) -> BaseException | None:
    """The first exception down the `__cause__` chain that is not ours (the client's)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not isinstance(current, IdempotencyError):
            return current
        current = current.__cause__
    return None


def error_name(exc: BaseException) -> str:
    """``OurError(transient)`` or ``OurError`` or the raw type, for the fault table."""
    name = type(exc).__name__
    if getattr(exc, "transient", False):
        name += "(transient)"
    return name


@dataclasses.dataclass
class FaultRow:
    """One scenario's outcome."""

    fault: str
    store: str
    calls: int = 0
    executions: int = 0
    locked_after: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    to_error: float | None = None
    to_recovery: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        def secs(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        errors = ", ".join(f"{n} x{c}" for n, c in sorted(self.errors.items())) or "-"
        return [
            self.fault,
            self.store,
            str(self.calls),
            str(self.executions),
            str(self.locked_after),
            errors,
            secs(self.to_error),
            secs(self.to_recovery),
            self.note,
        ]


class FaultTable:
    """Rows collected during the run, printed as a Markdown table at the end."""

    HEADER = [
        "fault",
        "store",
        "calls",
        "executions",
        "keys locked after",
        "errors by type",
        "s to error",
        "s to recovery",
        "note",
    ]

    def __init__(self) -> None:
        self.rows: list[FaultRow] = []

    def add(self, row: FaultRow) -> FaultRow:
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)


TABLE = FaultTable()


class Counted:
    """An idempotent function's body that counts its executions per payload."""

    def __init__(self) -> None:
        self.executions: collections.Counter[str] = collections.Counter()

    def __call__(
        self, payload: str, body: Callable[[], Awaitable[None]] | None = None
    ) -> Callable[[], Awaitable[dict[str, str]]]:
        async def fn() -> dict[str, str]:
            self.executions[payload] += 1
            if body is not None:
                await body()
            return {"result": payload}

        return fn

    @property
    def total(self) -> int:
        return sum(self.executions.values())
