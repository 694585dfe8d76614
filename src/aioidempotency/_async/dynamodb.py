"""`DynamoDBPersistenceLayer`: records in a DynamoDB table.

The item layout and the claim condition are those of Powertools for AWS Lambda, so
both libraries can share one table. On top of it, every claim stores an owner token
(`owner_token`) and completion, release and renewal are conditional on it.

Requests per call: first execution 2 (claim, complete), replay 1 (the refused claim
returns the stored item), failure 2 (claim, release).

Every write is safe to repeat for its owner (botocore resends a request whose reply
was lost): a resent claim is refused and returns the caller's own item; the completed
item keeps the owner token, so a resent completion is recognised as done; release and
renewal are conditional on the owner and on the INPROGRESS status.

The async layer is the source of the sync one (tools/unasync.py writes it). What differs
by nature is the kind of client (`aioidempotency._async.dynamodb_client`), held as every
store holds its clients (`aioidempotency._async.clients`); what both share (settings,
items, conditions, errors) comes from `aioidempotency._dynamodb_items`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from typing_extensions import Self

from aioidempotency._async import dynamodb_client
from aioidempotency._async.clients import OpenedClients, PassedClient
from aioidempotency._async.store import ClaimResult, PersistenceLayer
from aioidempotency._check import (
    StoreCheckReport,
    StoreProblem,
    dynamodb_problem,
    key_schema_problem,
    probe_records,
    table_status_problem,
    ttl_problem,
)
from aioidempotency._dynamodb_items import (
    CLAIM_CONDITION,
    CONDITION_FAILED,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_READ_TIMEOUT,
    MAX_ITEM_BYTES,
    OWNED_CONDITION,
    TRANSPORT_ERRORS,
    AttributeValue,
    ClientError,
    ConditionFailed,
    DynamoDBSettings,
    Item,
    attr,
    error_code,
    item_size,
    lost,
    owner_values,
    parse_url,
    plain,
    raise_mapped,
    settings,
)
from aioidempotency._records import DataRecord, RecordAttributes, RecordStatus
from aioidempotency.exceptions import (
    IdempotencyError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceLayerError,
    IdempotencyResultTooLargeError,
)

# begin async-only
if TYPE_CHECKING:
    from aioidempotency._sync.store import SyncPersistenceLayer
# end async-only

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_READ_TIMEOUT",
    "MAX_ITEM_BYTES",
    "DynamoDBPersistenceLayer",
    "create_idempotency_table",
]


class DynamoDBPersistenceLayer(PersistenceLayer):
    """Keeps records in a DynamoDB table, one item per idempotency key.

    The table's partition key is `key_attr` (a string). With `sort_key_attr` the table
    has a composite key: the partition key holds `static_pk_value` (default
    ``idempotency#{AWS_LAMBDA_FUNCTION_NAME}``) and the sort key holds the idempotency
    key, so many functions can share a table. Attribute names default to the
    reference's; `owner_attr` names the owner token that in-progress items carry. Give
    them as the ``*_attr`` keywords or as one `RecordAttributes` (`attributes`), not both.

    Without a client, the layer opens its own lazily (from `session`, `region_name`,
    `endpoint_url` and `boto_config`; the region otherwise comes from the environment)
    and reuses it (one per event loop, closed when the loop shuts down, or one per
    process for sync code; a new one in a forked child); `aclose()` closes them.
    Such clients fail fast: `connect_timeout` and `read_timeout` (seconds) and
    `max_attempts` (per request, "standard" retries) default to the ``DEFAULT_*``
    constants; what `boto_config` sets explicitly wins. At most `max_pool_connections`
    requests (of `boto_config`; botocore's default 10) are in flight on each such
    client, and more wait for one to end: aiobotocore's connection pool waits so, and
    sync code's threads wait for a slot, where urllib3 would open a connection for
    each and discard it. A client given is used as it is (its own timeouts, retries
    and pool), never closed, and refused in a forked child.

    `client` and `session` take either kind (aiobotocore/aioboto3 or boto3/botocore);
    `boto3_client` and `boto3_session` (the reference's names) take boto3's. One layer
    serves async and sync code: each uses the client of its own kind (see
    docs/dynamodb.md).
    """

    def __init__(
        self,
        table_name: str,
        *,
        key_attr: str = "id",
        static_pk_value: str | None = None,
        sort_key_attr: str | None = None,
        expiry_attr: str = "expiration",
        in_progress_expiry_attr: str = "in_progress_expiration",
        status_attr: str = "status",
        data_attr: str = "data",
        validation_key_attr: str = "validation",
        owner_attr: str = "owner_token",
        attributes: RecordAttributes | None = None,
        client: Any = None,
        session: Any = None,
        boto3_client: Any = None,
        boto3_session: Any = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        boto_config: Any = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_attempts: int | None = None,
    ) -> None:
        self._setup(
            settings(
                table_name,
                key_attr=key_attr,
                static_pk_value=static_pk_value,
                sort_key_attr=sort_key_attr,
                attributes=RecordAttributes.either(
                    attributes,
                    RecordAttributes(
                        status_attr=status_attr,
                        expiry_attr=expiry_attr,
                        in_progress_expiry_attr=in_progress_expiry_attr,
                        data_attr=data_attr,
                        validation_key_attr=validation_key_attr,
                        owner_attr=owner_attr,
                    ),
                ),
                client=client,
                session=session,
                boto3_client=boto3_client,
                boto3_session=boto3_session,
                region_name=region_name,
                endpoint_url=endpoint_url,
                boto_config=boto_config,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_attempts=max_attempts,
            )
        )

    def _setup(self, settings: DynamoDBSettings) -> None:
        self.settings = settings
        self.table_name = settings.table_name
        self.key_attr = settings.key_attr
        self.sort_key_attr = settings.sort_key_attr
        self.static_pk_value = settings.static_pk_value
        self.attributes = settings.attributes
        self.region_name = settings.region_name
        self.endpoint_url = settings.endpoint_url
        self.boto_config = settings.boto_config
        self.connect_timeout = settings.connect_timeout
        self.read_timeout = settings.read_timeout
        self.max_attempts = settings.max_attempts
        client, self._session = dynamodb_client.given(settings)
        self._clients: PassedClient[Any] | OpenedClients[Any] = (
            OpenedClients(
                self._open_client,
                dynamodb_client.close_client,
                close_at_loop_shutdown=True,  # async-only
                # sync-only: max_concurrency=dynamodb_client.pool_size(settings),
            )
            if client is None
            else PassedClient(client, refusal=dynamodb_client.in_child(settings), pid=settings.pid)
        )

    @classmethod
    def from_settings(cls, settings: DynamoDBSettings) -> Self:
        """A layer on `settings` (another layer's `settings`: the same table, options and
        clients given, with clients of its own)."""
        layer = cls.__new__(cls)
        layer._setup(settings)
        return layer

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build a layer from ``dynamodb://TABLE?region=..&endpoint_url=..``.

        Other query parameters set the constructor's options by name: the attribute
        names (``key_attr``, ``sort_key_attr``, ``static_pk_value``, ...) and
        ``connect_timeout``, ``read_timeout`` (seconds) and ``max_attempts``.
        """
        table, options = parse_url(url)
        return cls(table, **options)

    # -- the client ------------------------------------------------------------------

    def client_config(self, session: Any = None) -> Any:
        """The config of the clients this layer opens: the bounded timeouts and retries
        under what `boto_config` sets explicitly (its values win). The attempts and
        retry mode of the AWS configuration (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``,
        the profile) of `session` win over the defaults too."""
        return dynamodb_client.config(self.settings, session)

    async def _open_client(self) -> Any:
        """A new client for this loop (or process), from the session given (a new one
        when none was) with `client_config()`; refused, saying what to pass, when the
        layer was given only clients or sessions of the other kind."""
        reason = dynamodb_client.refusal(self.settings)
        if reason is not None:
            raise IdempotencyPersistenceConfigError(reason)
        if self._session is None:
            self._session = dynamodb_client.new_session()
        return await dynamodb_client.open_client(self.settings, self._session)

    async def client(self) -> Any:
        """The DynamoDB client this layer sends its requests with (opened if needed)."""
        opened = self._clients.ready()
        if opened is None:
            opened = await self._clients.open()
        return opened.client

    async def aclose(self) -> None:
        """Close the clients this layer opened (a client given to it stays open)."""
        await self._clients.aclose()

    # begin async-only
    def _async_refusal(self) -> str | None:
        """Why async code cannot use this layer (it was given only boto3 clients), or
        None; async decorators and engines raise it as a `TypeError` when built."""
        return dynamodb_client.refusal(self.settings)

    def _sync_twin(self) -> SyncPersistenceLayer | None:
        """What serves this layer in sync code: a `SyncDynamoDBPersistenceLayer` on the
        same settings (its own boto3 client, or the boto3 client or session this layer
        was given); None (the bridge) when it was given an aioboto3/aiobotocore session
        and no boto3 one (the layer opens its own client from that session on the
        bridge's loop), or is a subclass (its methods are async). An aiobotocore client
        with no boto3 client is refused with a `TypeError` that says what to pass: it
        belongs to the loop it was opened in."""
        from aioidempotency._sync import dynamodb_client as sync_clients
        from aioidempotency._sync.dynamodb import SyncDynamoDBPersistenceLayer

        settings = self.settings
        if settings.sync_client is None and settings.sync_session is None:
            if settings.async_client is not None:
                raise TypeError(sync_clients.refusal(settings))
            if settings.async_session is not None:
                return None
        if type(self) is not DynamoDBPersistenceLayer:
            return None
        return SyncDynamoDBPersistenceLayer.from_settings(settings)

    # end async-only

    # -- requests --------------------------------------------------------------------

    async def _call(self, operation: str, action: str, **params: Any) -> dict[str, Any]:
        """One request; `ConditionFailed` on a refused condition, typed errors otherwise."""
        try:
            opened = self._clients.ready()
            if opened is None:
                opened = await self._clients.open()
            method = getattr(opened.client, operation)
            async with opened.limit:
                response: dict[str, Any] = await method(TableName=self.table_name, **params)
        except ClientError as exc:
            if error_code(exc) == CONDITION_FAILED:
                raise ConditionFailed(exc.response.get("Item")) from exc
            raise_mapped(exc, action, self.table_name)
        except IdempotencyError:
            raise
        except TRANSPORT_ERRORS as exc:
            raise_mapped(exc, action, self.table_name)
        return response

    def _key(self, idempotency_key: str) -> Item:
        if self.sort_key_attr is None:
            return {self.key_attr: {"S": idempotency_key}}
        return {
            self.key_attr: {"S": self.static_pk_value},
            self.sort_key_attr: {"S": idempotency_key},
        }

    def _item(self, record: DataRecord) -> Item:
        item = self._key(record.idempotency_key)
        for name, value in self.attributes.to_mapping(record).items():
            if value is not None:
                item[name] = attr(value)
        return item

    def _record(self, key: str, item: Mapping[str, AttributeValue]) -> DataRecord:
        return self.attributes.from_mapping(
            key,
            {name: plain(value) for name, value in item.items()},
            sort_key=None if self.sort_key_attr is None else key,
        )

    async def claim(self, record: DataRecord, *, now: float) -> ClaimResult:
        """One conditional PutItem; a refused claim returns the stored item (ALL_OLD)."""
        attrs = self.attributes
        try:
            await self._call(
                "put_item",
                "claim",
                Item=self._item(record),
                ConditionExpression=CLAIM_CONDITION,
                ExpressionAttributeNames={
                    "#id": self.key_attr,
                    "#expiry": attrs.expiry_attr,
                    "#in_progress_expiry": attrs.in_progress_expiry_attr,
                    "#status": attrs.status_attr,
                    "#data": attrs.data_attr,
                },
                ExpressionAttributeValues={
                    ":now": {"N": str(int(now))},
                    ":now_in_millis": {"N": str(int(now * 1000))},
                    ":inprogress": {"S": RecordStatus.INPROGRESS.value},
                    ":completed": {"S": RecordStatus.COMPLETED.value},
                    ":number": {"S": "N"},
                    ":string": {"S": "S"},
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ConditionFailed as refused:
            if refused.old is None:
                return ClaimResult(claimed=False)
            return ClaimResult(
                claimed=False, existing=self._record(record.idempotency_key, refused.old)
            )
        return ClaimResult(claimed=True)

    async def get(self, key: str, *, now: float | None = None) -> DataRecord | None:
        """A strongly consistent GetItem; None when absent or expired at `now`."""
        response = await self._call("get_item", "get", Key=self._key(key), ConsistentRead=True)
        item = response.get("Item")
        if item is None:
            return None
        record = self._record(key, item)
        return None if record.is_expired(time.time() if now is None else now) else record

    async def complete(self, record: DataRecord, *, owner: str) -> None:
        """One UpdateItem conditional on `owner`; checks the 400 KB limit first.

        The completed item keeps the owner token, so a completion resent after a lost
        reply finds its own COMPLETED item and succeeds.
        """
        attrs = self.attributes
        final = self._item(record)
        final[attrs.owner_attr] = {"S": owner}
        size = item_size(final)
        if size > MAX_ITEM_BYTES:
            raise IdempotencyResultTooLargeError(
                f"the record of {record.idempotency_key!r} would be {size} bytes, over "
                f"DynamoDB's item limit of {MAX_ITEM_BYTES} bytes",
                size=size,
                limit=MAX_ITEM_BYTES,
            )
        names = {"#owner": attrs.owner_attr, "#status": attrs.status_attr}
        values = owner_values(owner)
        # The key and the owner token stay as they are (the condition proves the token):
        # every name and value less is less for botocore to validate and serialise.
        unchanged = {self.key_attr, self.sort_key_attr, attrs.owner_attr, attrs.status_attr}
        sets: list[str] = []
        for index, name in enumerate(n for n in final if n not in unchanged):
            names[f"#a{index}"] = name
            values[f":a{index}"] = final[name]
            sets.append(f"#a{index} = :a{index}")
        values[":status"] = final[attrs.status_attr]
        update = f"SET {', '.join(sets)}, #status = :status"
        if attrs.in_progress_expiry_attr not in final:
            names["#in_progress_expiry"] = attrs.in_progress_expiry_attr
            update += " REMOVE #in_progress_expiry"
        try:
            await self._call(
                "update_item",
                "complete",
                Key=self._key(record.idempotency_key),
                UpdateExpression=update,
                ConditionExpression=OWNED_CONDITION,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ConditionFailed as refused:
            if self._completed_by(refused.old, owner):
                return  # our own completion, resent after its reply was lost
            raise lost(record.idempotency_key, refused.old) from None
        except IdempotencyPersistenceLayerError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and "size" in str(cause).lower():
                raise IdempotencyResultTooLargeError(
                    f"DynamoDB refused the record of {record.idempotency_key!r} as too large",
                    cause,
                    size=size,
                    limit=MAX_ITEM_BYTES,
                ) from cause
            raise

    def _completed_by(self, old: Mapping[str, AttributeValue] | None, owner: str) -> bool:
        attrs = self.attributes
        return (
            old is not None
            and old.get(attrs.owner_attr) == {"S": owner}
            and old.get(attrs.status_attr) == {"S": RecordStatus.COMPLETED.value}
        )

    async def release(self, key: str, *, owner: str) -> None:
        """One DeleteItem of `owner`'s in-progress item; anything else is left alone
        (another owner's claim, a completed item even of this owner, no item)."""
        try:
            await self._call(
                "delete_item",
                "release",
                Key=self._key(key),
                ConditionExpression=OWNED_CONDITION,
                ExpressionAttributeNames={
                    "#owner": self.attributes.owner_attr,
                    "#status": self.attributes.status_attr,
                },
                ExpressionAttributeValues=owner_values(owner),
            )
        except ConditionFailed:
            return

    async def renew(self, record: DataRecord) -> None:
        """One UpdateItem of the in-progress expiry to `record`'s, conditional on
        `record.owner` still holding the item in progress."""
        key, owner = record.idempotency_key, record.owner
        in_progress_expiry_ms = record.in_progress_expiry_timestamp
        if owner is None or in_progress_expiry_ms is None:
            raise ValueError(f"renew needs an owner and an in-progress expiry: {record!r}")
        attrs = self.attributes
        values = owner_values(owner)
        values[":until"] = {"N": str(in_progress_expiry_ms)}
        try:
            await self._call(
                "update_item",
                "renew",
                Key=self._key(key),
                UpdateExpression="SET #in_progress_expiry = :until",
                ConditionExpression=OWNED_CONDITION,
                ExpressionAttributeNames={
                    "#owner": attrs.owner_attr,
                    "#status": attrs.status_attr,
                    "#in_progress_expiry": attrs.in_progress_expiry_attr,
                },
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ConditionFailed as refused:
            raise lost(key, refused.old) from None

    async def delete(self, key: str) -> bool:
        """An unconditional DeleteItem; True when an item was deleted."""
        response = await self._call(
            "delete_item", "delete", Key=self._key(key), ReturnValues="ALL_OLD"
        )
        return bool(response.get("Attributes"))

    # -- checking the setup ------------------------------------------------------------

    async def check(
        self, *, raise_on_problem: bool = False, probe: bool = True
    ) -> StoreCheckReport:
        """Check that this layer can work with its table, before a call needs it.

        Reads the table (``DescribeTable``: it exists, is active, and its key is the
        layer's `key_attr` and `sort_key_attr`, strings) and its TTL
        (``DescribeTimeToLive``: enabled on the layer's expiry attribute); then, with
        `probe`, runs every operation of the store on a probe item (key
        ``aioidempotency-check#...``, deleted at the end, expiring within a minute in
        any case), which shows credentials or IAM permissions that are missing. A
        refused ``Describe*`` is reported as not checked, not as a problem: the store
        itself does not need those permissions. Returns a `StoreCheckReport` listing
        each problem with its fix; `raise_on_problem` raises them instead
        (`IdempotencyStoreCheckError`).
        """
        problems: list[StoreProblem] = []
        facts: list[tuple[str, str]] = []
        region = await self._check_into(problems, facts, probe)
        report = StoreCheckReport(self._description(region), tuple(problems), tuple(facts))
        if raise_on_problem:
            report.raise_for_problems()
        return report

    def _description(self, region: str | None = None) -> str:
        return f"DynamoDB table {self.table_name!r} in {self._where(region)}"

    def _where(self, region: str | None = None) -> str:
        region = region or self.region_name
        where = f"region {region}" if region else "the default region"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    async def _check_into(
        self, problems: list[StoreProblem], facts: list[tuple[str, str]], probe: bool
    ) -> str | None:
        """Append what `check` finds; the client's region (None if no client opened)."""
        table = self.table_name
        where = self._where()

        def judge(exc: BaseException, step: str = "") -> StoreProblem:
            return dynamodb_problem(exc, table=table, where=where, step=step)

        try:
            client = await self.client()
        except TRANSPORT_ERRORS as exc:  # as a request reports it (no region, ...)
            try:
                raise_mapped(exc, "opening a client", table)
            except IdempotencyError as mapped:
                problems.append(judge(mapped, "opening a client"))
            return None
        except Exception as exc:
            problems.append(judge(exc, "opening a client"))
            return None
        region: str | None = getattr(getattr(client, "meta", None), "region_name", None)
        where = self._where(region)
        described = await self._describe("describe_table", "DescribeTable", client)
        if isinstance(described, BaseException):
            found = judge(described, "DescribeTable")
            if found.kind != "permission":
                problems.append(found)
                return region
            facts.append(("table", "not checked (DescribeTable refused, and not needed)"))
        else:
            description = described.get("Table", {})
            key = ", ".join(
                f"{part.get('AttributeName')} ({part.get('KeyType')})"
                for part in description.get("KeySchema", [])
            )
            facts.append(("table", f"{description.get('TableStatus')}, key {key}"))
            for problem in (
                table_status_problem(description, table=table),
                key_schema_problem(
                    description,
                    table=table,
                    key_attr=self.key_attr,
                    sort_key_attr=self.sort_key_attr,
                ),
            ):
                if problem is not None:
                    problems.append(problem)
        ttl = await self._describe("describe_time_to_live", "DescribeTimeToLive", client)
        if isinstance(ttl, BaseException):
            found = judge(ttl, "DescribeTimeToLive")
            if found.kind != "permission":
                problems.append(found)
                return region
            facts.append(("ttl", "not checked (DescribeTimeToLive refused)"))
        else:
            description = ttl.get("TimeToLiveDescription", {})
            status = description.get("TimeToLiveStatus", "DISABLED")
            facts.append(("ttl", f"{status} on {description.get('AttributeName')!r}"))
            problem = ttl_problem(description, table=table, expiry_attr=self.attributes.expiry_attr)
            if problem is not None:
                problems.append(problem)
        if not probe or any(p.kind in {"key-schema", "table-status"} for p in problems):
            return region
        failed = await self._probe(*probe_records())
        if failed is not None:
            problems.append(judge(failed[1], failed[0]))
            return region
        facts.append(("probe", "claim, get, renew, release, complete, delete: ok"))
        return region

    async def _describe(self, operation: str, action: str, client: Any) -> Any:
        """The reply of a ``Describe*`` request on the table, or the error it raised
        (mapped, with the botocore error as its cause)."""
        try:
            try:
                response: dict[str, Any] = await getattr(client, operation)(
                    TableName=self.table_name
                )
            except (ClientError, *TRANSPORT_ERRORS) as exc:
                raise_mapped(exc, action, self.table_name)
        except IdempotencyError as exc:
            return exc
        return response

    async def create_table(self, *, exist_ok: bool = True) -> bool:
        """Create this layer's table (key schema, on-demand, TTL on the expiry attribute).

        For development and tests; the layer never creates tables by itself. Returns
        False when the table already existed (and `exist_ok`).
        """
        try:
            return await create_idempotency_table(
                await self.client(),
                self.table_name,
                key_attr=self.key_attr,
                sort_key_attr=self.sort_key_attr,
                ttl_attr=self.attributes.expiry_attr,
                exist_ok=exist_ok,
            )
        except IdempotencyError:
            raise
        except TRANSPORT_ERRORS as exc:
            raise_mapped(exc, "create table", self.table_name)


async def create_idempotency_table(
    client: Any,
    table_name: str,
    *,
    key_attr: str = "id",
    sort_key_attr: str | None = None,
    ttl_attr: str = "expiration",
    exist_ok: bool = True,
) -> bool:
    """Create an on-demand idempotency table with TTL on `ttl_attr`; wait until active.

    `client` is a DynamoDB client of the kind a layer opens (see
    `aioidempotency._async.dynamodb_client`). Returns False (and changes nothing) when
    the table exists and `exist_ok`; raises `IdempotencyPersistenceLayerError` for any
    other failure.
    """
    schema = [{"AttributeName": key_attr, "KeyType": "HASH"}]
    definitions = [{"AttributeName": key_attr, "AttributeType": "S"}]
    if sort_key_attr is not None:
        schema.append({"AttributeName": sort_key_attr, "KeyType": "RANGE"})
        definitions.append({"AttributeName": sort_key_attr, "AttributeType": "S"})
    try:
        await client.create_table(
            TableName=table_name,
            KeySchema=schema,
            AttributeDefinitions=definitions,
            BillingMode="PAY_PER_REQUEST",
        )
    except ClientError as exc:
        if exist_ok and error_code(exc) == "ResourceInUseException":
            return False
        raise_mapped(exc, "create table", table_name)
    try:
        waiter = client.get_waiter("table_exists")
        await waiter.wait(TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 300})
        await client.update_time_to_live(
            TableName=table_name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl_attr},
        )
    except (ClientError, *TRANSPORT_ERRORS) as exc:
        raise_mapped(exc, "create table", table_name)
    return True
