"""What a benchmark calls: aioidempotency, Powertools, or the raw client (the floor).

A `Target` makes one call per key: the payload is the event ``{"id": key, "blob": ...}``
(hashed whole, no JMESPath, as both libraries do by default) and the function returns
``{"id": key, "blob": ...}``; each is about `payload` bytes of JSON. The floor does
only the store operations such a call needs, with the same client: a claim that
returns the stored value when it is refused (``SET NX GET`` / conditional ``PutItem``
with ``ALL_OLD``), then, for a won claim, one write of the completed record.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer

from aioidempotency import (
    ClaimResult,
    DataRecord,
    IdempotencyConfig,
    InMemoryPersistenceLayer,
    PersistenceLayer,
    idempotent_function,
    idempotent_function_async,
)
from aioidempotency._async.pipelining import Batcher
from aioidempotency._memory_table import MemoryTable
from benchmarks.counting import RequestCounter
from benchmarks.runner import Refused

__all__ = [
    "TTL_SECONDS",
    "PowertoolsMemoryLayer",
    "Target",
    "blob",
    "floor_dynamodb",
    "floor_glide",
    "floor_glide_pipelined",
    "floor_glide_scripts",
    "floor_redis_async",
    "floor_redis_pipelined",
    "floor_redis_sync",
    "ours_async",
    "ours_sync",
    "powertools",
]

TTL_SECONDS = 3600
_ID_OVERHEAD = 60  # the JSON around the blob: braces, the two names, a key


def blob(payload: int, fill: str) -> str:
    """The filler that makes an event or a result about `payload` bytes of JSON."""
    return fill * max(1, payload - _ID_OVERHEAD)


@dataclasses.dataclass
class Target:
    """One call per key. `call` is async when `is_async`; `requests()` counts store requests."""

    call: Callable[[str], Any]
    is_async: bool
    requests: Callable[[], int]
    executed: RequestCounter


def _completed_value(payload: int) -> str:
    data = json.dumps({"blob": blob(payload, "y"), "id": "k" * 40}, sort_keys=True)
    expiry = int(time.time()) + TTL_SECONDS
    return json.dumps({"status": "COMPLETED", "expiration": expiry, "data": data})


def _in_progress_value() -> str:
    now = time.time()
    return json.dumps(
        {
            "status": "INPROGRESS",
            "expiration": int(now) + TTL_SECONDS,
            "in_progress_expiration": int(now * 1000) + 60_000,
            "owner_token": "0" * 32,
        }
    )


# --- aioidempotency ----------------------------------------------------------------------


def ours_async(store: PersistenceLayer, config: IdempotencyConfig, payload: int) -> Target:
    """`@idempotent_function_async` on `store`."""
    executed = RequestCounter()
    event_blob, result_blob = blob(payload, "x"), blob(payload, "y")

    @idempotent_function_async(
        data_keyword_argument="event", persistence_store=store, config=config
    )
    async def handler(event: dict[str, Any]) -> dict[str, Any]:
        executed.add()
        return {"id": event["id"], "blob": result_blob}

    async def call(key: str) -> None:
        await handler(event={"id": key, "blob": event_blob})

    return Target(call, True, _requests_of(store), executed)


def ours_sync(store: PersistenceLayer, config: IdempotencyConfig, payload: int) -> Target:
    """The sync shim `@idempotent_function` on `store`."""
    executed = RequestCounter()
    event_blob, result_blob = blob(payload, "x"), blob(payload, "y")

    @idempotent_function(data_keyword_argument="event", persistence_store=store, config=config)
    def handler(event: dict[str, Any]) -> dict[str, Any]:
        executed.add()
        return {"id": event["id"], "blob": result_blob}

    def call(key: str) -> None:
        handler(event={"id": key, "blob": event_blob})

    return Target(call, False, _requests_of(store), executed)


_STORE_COUNTERS: dict[int, RequestCounter] = {}


def attach_counter(store: PersistenceLayer, counter: RequestCounter) -> PersistenceLayer:
    """Remember which counter counts the requests of `store`'s client."""
    _STORE_COUNTERS[id(store)] = counter
    return store


class _CountingTable(MemoryTable):
    """A memory table counting each request, whichever engine (async or sync) sends it."""

    def __init__(self, requests: RequestCounter, **options: Any) -> None:
        super().__init__(**options)
        self.requests = requests

    def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        self.requests.add()
        return super().claim(record, now=now)

    def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        self.requests.add()
        return super().get(key, now=now)

    def complete(self, record: DataRecord, *, owner: str) -> None:
        self.requests.add()
        super().complete(record, owner=owner)

    def release(self, key: str, *, owner: str) -> None:
        self.requests.add()
        super().release(key, owner=owner)

    def renew(self, record: DataRecord) -> None:
        self.requests.add()
        super().renew(record)


def counting_memory_store(**options: Any) -> InMemoryPersistenceLayer:
    """The in-memory store, counting each request as a network store's client does
    (its sync twin shares the table, so sync calls are counted too)."""
    requests = RequestCounter()
    store = InMemoryPersistenceLayer(table=_CountingTable(requests, **options))
    attach_counter(store, requests)
    return store


def _requests_of(store: PersistenceLayer) -> Callable[[], int]:
    counter = _STORE_COUNTERS[id(store)]
    return lambda: counter.value


# --- Powertools ----------------------------------------------------------------------------


def powertools(
    layer: Any, requests: Callable[[], int], *, local_cache: bool, payload: int
) -> Target:
    """Powertools' `@idempotent_function` on `layer` (one layer per target)."""
    from aws_lambda_powertools.utilities.idempotency import (
        IdempotencyConfig as PowertoolsConfig,
    )
    from aws_lambda_powertools.utilities.idempotency import (
        idempotent_function as powertools_idempotent_function,
    )

    executed = RequestCounter()
    event_blob, result_blob = blob(payload, "x"), blob(payload, "y")
    config = PowertoolsConfig(use_local_cache=local_cache)

    @powertools_idempotent_function(  # type: ignore[untyped-decorator]
        data_keyword_argument="event", persistence_store=layer, config=config
    )
    def handler(event: dict[str, Any]) -> dict[str, Any]:
        executed.add()
        return {"id": event["id"], "blob": result_blob}

    def call(key: str) -> None:
        handler(event={"id": key, "blob": event_blob})

    return Target(call, False, requests, executed)


class PowertoolsMemoryLayer(BasePersistenceLayer):
    """A Powertools persistence layer in a dict, to measure Powertools' own CPU per call.

    Like its DynamoDB layer, a refused put hands the stored record over
    (`old_data_record`), so a replay does not read it again.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.records: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.operations = RequestCounter()

    def _get_record(self, idempotency_key: str) -> Any:
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyItemNotFoundError,
        )

        self.operations.add()
        with self.lock:
            record = self.records.get(idempotency_key)
        if record is None:
            raise IdempotencyItemNotFoundError
        return record

    def _put_record(self, data_record: Any) -> None:
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyItemAlreadyExistsError,
        )

        self.operations.add()
        now_ms = int(time.time() * 1000)
        with self.lock:
            old = self.records.get(data_record.idempotency_key)
            if old is not None and not old.is_expired:
                orphan = (
                    old.status == "INPROGRESS"
                    and old.in_progress_expiry_timestamp is not None
                    and old.in_progress_expiry_timestamp < now_ms
                )
                if not orphan:
                    raise IdempotencyItemAlreadyExistsError(old_data_record=old)
            self.records[data_record.idempotency_key] = data_record

    def _update_record(self, data_record: Any) -> None:
        self.operations.add()
        with self.lock:
            self.records[data_record.idempotency_key] = data_record

    def _delete_record(self, data_record: Any) -> None:
        self.operations.add()
        with self.lock:
            self.records.pop(data_record.idempotency_key, None)


# --- the floor -------------------------------------------------------------------------------


def floor_redis_async(client: Any, counter: RequestCounter, payload: int) -> Target:
    """redis.asyncio: ``SET NX GET EX``, then ``SET EX`` of the completed record if won."""
    executed = RequestCounter()
    claim, done = _in_progress_value(), _completed_value(payload)

    async def call(key: str) -> None:
        old = await client.set(key, claim, nx=True, get=True, ex=TTL_SECONDS)
        if old is None:
            await client.set(key, done, ex=TTL_SECONDS)
            executed.add()
        elif old.startswith(b'{"status": "INPROGRESS"'):
            raise Refused

    return Target(call, True, lambda: counter.value, executed)


def _closed() -> Exception:
    return RuntimeError("the pipelined floor is closed")


def floor_redis_pipelined(client: Any, counter: RequestCounter, payload: int) -> Target:
    """redis.asyncio, pipelined: `floor_redis_async`'s two commands, those of all calls
    in one loop turn sent as one ``pipeline(transaction=False)`` (queued per turn by the
    store's own `Batcher`, the least machinery that batches a turn's calls)."""
    executed = RequestCounter()
    claim, done = _in_progress_value(), _completed_value(payload)

    async def send(commands: list[tuple[dict[str, Any], str]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for options, value in commands:
            pipe.set(options.pop("key"), value, **options)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    batcher: Batcher[tuple[dict[str, Any], str]] = Batcher(send, closed=_closed)

    async def call(key: str) -> None:
        claimed = {"key": key, "nx": True, "get": True, "ex": TTL_SECONDS}
        old = await batcher.submit((claimed, claim))
        if old is None:
            await batcher.submit(({"key": key, "ex": TTL_SECONDS}, done))
            executed.add()
        elif old.startswith(b'{"status": "INPROGRESS"'):
            raise Refused

    return Target(call, True, lambda: counter.value, executed)


def floor_redis_sync(client: Any, counter: RequestCounter, payload: int) -> Target:
    """redis-py (sync, Powertools' client): the same two commands."""
    executed = RequestCounter()
    claim, done = _in_progress_value(), _completed_value(payload)

    def call(key: str) -> None:
        old = client.set(key, claim, nx=True, get=True, ex=TTL_SECONDS)
        if old is None:
            client.set(key, done, ex=TTL_SECONDS)
            executed.add()
        elif old.startswith(b'{"status": "INPROGRESS"'):
            raise Refused

    return Target(call, False, lambda: counter.value, executed)


def floor_glide(client: Any, counter: RequestCounter, payload: int) -> Target:
    """valkey-glide: the same two commands through glide's own NX/EX/GET options."""
    from glide import ConditionalChange, ExpirySet, ExpiryType

    executed = RequestCounter()
    claim, done = _in_progress_value(), _completed_value(payload)
    nx = ConditionalChange.ONLY_IF_DOES_NOT_EXIST
    expiry = ExpirySet(ExpiryType.SEC, TTL_SECONDS)

    async def call(key: str) -> None:
        old = await client.set(key, claim, conditional_set=nx, expiry=expiry, return_old_value=True)
        if old is None:
            await client.set(key, done, expiry=expiry)
            executed.add()
        elif old.startswith(b'{"status": "INPROGRESS"'):
            raise Refused

    return Target(call, True, lambda: counter.value, executed)


def floor_glide_pipelined(client: Any, counter: RequestCounter, payload: int) -> Target:
    """valkey-glide, pipelined: `floor_glide`'s two commands, those of all calls in one
    loop turn sent as one non-atomic `Batch` (queued per turn by the store's own
    `Batcher`, the least machinery that batches a turn's calls)."""
    from glide import Batch

    executed = RequestCounter()
    claim, done = _in_progress_value(), _completed_value(payload)
    ttl = str(TTL_SECONDS)

    async def send(commands: list[list[str]]) -> list[Any]:
        batch = Batch(is_atomic=False)
        for command in commands:
            words: list[Any] = command  # glide takes str or bytes
            batch.custom_command(words)
        replies: list[Any] = await client.exec(batch, raise_on_error=False)
        return replies

    batcher: Batcher[list[str]] = Batcher(send, closed=_closed)

    async def call(key: str) -> None:
        old = await batcher.submit(["SET", key, claim, "NX", "GET", "EX", ttl])
        if old is None:
            await batcher.submit(["SET", key, done, "EX", ttl])
            executed.add()
        elif old.startswith(b'{"status": "INPROGRESS"'):
            raise Refused

    return Target(call, True, lambda: counter.value, executed)


def floor_glide_scripts(client: Any, counter: RequestCounter, payload: int) -> Target:
    """A diagnostic floor: raw glide sending the atomic path's own two commands.

    The claim (``SET NX GET EX``) and the completion script of `aioidempotency._lua`,
    with the arguments the store sends; what is left between this and the store is the
    library's own cost.
    """
    from glide import ConditionalChange, ExpirySet, ExpiryType, Script

    from aioidempotency import _lua

    executed = RequestCounter()
    complete_script = Script(_lua.COMPLETE.code)  # type: ignore[no-untyped-call]
    claim, done = _in_progress_value(), _completed_value(payload)
    free_only = ConditionalChange.ONLY_IF_DOES_NOT_EXIST
    ttl = ExpirySet(ExpiryType.SEC, TTL_SECONDS)
    # The completion script takes the absolute expiry (EXAT, epoch seconds).
    expiry = str(int(time.time()) + TTL_SECONDS)
    # What the store sends: the owner token as a JSON string, the completed record and
    # its fingerprint (a resent completion is recognised by it).
    complete_args = [json.dumps("0" * 32), done, expiry, _lua.fingerprint(done)]

    async def call(key: str) -> None:
        old = await client.set(
            key, claim, conditional_set=free_only, expiry=ttl, return_old_value=True
        )
        if old is not None:  # refused: the record came back with the claim
            if old.startswith(b'{"status": "INPROGRESS"'):
                raise Refused
            return
        await client.invoke_script(complete_script, keys=[key], args=complete_args)
        executed.add()

    return Target(call, True, lambda: counter.value, executed)


def floor_dynamodb(client: Any, counter: RequestCounter, table: str, payload: int) -> Target:
    """aiobotocore: a conditional ``PutItem`` (``ALL_OLD``), then a ``PutItem`` if won."""
    from botocore.exceptions import ClientError

    executed = RequestCounter()
    done = json.loads(_completed_value(payload))

    async def call(key: str) -> None:
        now = time.time()
        item = {
            "id": {"S": key},
            "status": {"S": "INPROGRESS"},
            "expiration": {"N": str(int(now) + TTL_SECONDS)},
            "in_progress_expiration": {"N": str(int(now * 1000) + 60_000)},
        }
        try:
            await client.put_item(
                TableName=table,
                Item=item,
                ConditionExpression="attribute_not_exists(#id) OR #expiry < :now",
                ExpressionAttributeNames={"#id": "id", "#expiry": "expiration"},
                ExpressionAttributeValues={":now": {"N": str(int(now))}},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            old = exc.response.get("Item") or {}
            if old.get("status", {}).get("S") == "INPROGRESS":
                raise Refused from None
            return
        completed = {
            "id": {"S": key},
            "status": {"S": "COMPLETED"},
            "expiration": {"N": str(done["expiration"])},
            "data": {"S": done["data"]},
        }
        await client.put_item(TableName=table, Item=completed)
        executed.add()

    return Target(call, True, lambda: counter.value, executed)
