"""The two ways the cache store keeps records, chosen by what its client can do.

- `AtomicPath`, for clients that run Lua scripts (redis-py, valkey-py, valkey-glide):
  claim-or-return-existing, orphan takeover, completion, release and renewal each
  conditional on the server, in one round trip (a takeover in two). A claim is the
  plain command ``SET key value NX GET EX ttl`` where the client offers it and the
  server knows it (Redis/Valkey >= 7.0; the server runs it several times faster than
  a script), the claim script otherwise and for takeovers. The scripts
  (``aioidempotency._lua``) never parse a record: a takeover replaces a value only if
  it still has the fingerprint of the one Python classified, and the owner checks look
  for the caller's owner token.
- `ProtocolPath`, for any `CacheClient` (get/set/delete): Powertools' own algorithm,
  with its orphan lock key ``"{key}:lock"``; completion, release and
  renewal read the record first and write only over the caller's own claim, but a
  takeover landing between that read and the write is not seen (docs/redis-valkey.md
  says what this path guarantees).

Each operation takes the client first, so the store runs it on whichever client the
running loop (or process) has; every operation is safe to repeat. Expiries are
absolute (epoch seconds): the paths need no clock. (The protocol path writes a
completion or renewal with the record's own expiry: one that has already passed is
gone at once, which readers could not tell from an expired record.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, cast

from aioidempotency._async.cache_clients import CacheClient, ScriptingCacheClient
from aioidempotency._async.concurrency import outcomes  # async-only
from aioidempotency._async.store import ClaimResult
from aioidempotency._cache_errors import (
    SYNTAX,
    WRONG_TYPE,
    NotReplicated,
    classify,
    wrong_type,
)
from aioidempotency._lua import (
    CLAIM,
    CLAIM_FREE,
    CLAIM_REFUSED,
    CLAIM_TAKEOVER,
    CLAIM_WRONG_TYPE,
    COMPLETE,
    DONE,
    GONE,
    ORPHAN_LOCK_SECONDS,
    RELEASE,
    RENEW,
    TAKEN_OVER,
    LuaScript,
    as_bytes,
    fingerprint,
    owner_needle,
)
from aioidempotency._records import RecordAttributes, RecordStatus
from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
)

__all__ = ["AtomicPath", "ProtocolPath", "delete_key", "read"]


# Plain functions handing back the client's awaitable, so that the simplest operations
# cost no coroutine frame of their own.
def _script(
    client: CacheClient, script: LuaScript, key: str, args: Sequence[str | int]
) -> Awaitable[Any]:
    # The atomic path only runs on clients checked once, when the layer adopted them.
    return cast(ScriptingCacheClient, client).run_script(script, key, args)


async def read(client: CacheClient, key: str) -> bytes | str | None:
    """GET `key`; a key holding another Redis type raises `IdempotencyInvalidStatusError`."""
    try:
        return await client.get(key)
    except Exception as exc:
        if classify(exc) == WRONG_TYPE:
            raise wrong_type(key) from exc
        raise


def delete_key(client: CacheClient, key: str) -> Awaitable[Any]:
    """DEL `key`."""
    return client.delete(key)


def _set(client: CacheClient, key: str, value: str, *, exat: int, nx: bool = False) -> Any:
    # The layer adopted the client through `adapt`: its `set` takes `exat`.
    return cast(Any, client).set(key, value, exat=exat, nx=nx)


class AtomicPath:
    """The atomic path: one Lua script per operation (see the module).

    With `wait_replicas`, claims and completions are followed by ``WAIT`` on their own
    connection; a claim short of replicas is released and refused (transient).
    """

    atomic = True

    def __init__(
        self, attributes: RecordAttributes, *, wait_replicas: int = 0, wait_timeout: float = 1.0
    ) -> None:
        self.attributes = attributes
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        #: Whether a claim starts with ``SET NX GET`` (on a client that offers
        #: `set_nx_get`); cleared when the server refuses that form.
        self.plain_claims = True

    async def _durably(
        self, client: CacheClient, script: LuaScript, key: str, args: Sequence[str | int]
    ) -> tuple[Any, int]:
        """Run `script` followed by ``WAIT``; the reply and the replicas that acked."""
        durable = getattr(client, "run_script_durably", None)
        if durable is None:
            raise IdempotencyPersistenceConfigError(
                f"{type(client).__name__} cannot wait for replicas; wait_replicas needs "
                "a redis-py or valkey-glide client"
            )
        reply, acked = await durable(
            script,
            key,
            args,
            replicas=self.wait_replicas,
            timeout_ms=max(1, int(self.wait_timeout * 1000)),
        )
        return reply, int(acked)

    async def _plain_claim(
        self, client: CacheClient, key: str, text: str, expiry: int, now: float
    ) -> tuple[bool, bytes | str | None]:
        """``SET NX GET``: (True, None) when it claimed `key`, (True, value) when `key`
        holds `value`, (False, None) when the server does not know the command's form
        (then the layer claims with the script from now on)."""
        try:
            # The record's lifetime by the engine's clock, as the scripts' EXAT floor
            # makes it: at least a second.
            raw = await cast(Any, client).set_nx_get(key, text, ex=max(1, expiry - int(now)))
        except Exception as exc:
            error = self._plain_error(key, exc)
            if error is None:
                return False, None
            if error is exc:
                raise
            raise error from exc
        return True, raw

    def _plain_error(self, key: str, exc: Exception) -> Exception | None:
        """What a failed ``SET NX GET`` on `key` reports (`exc`, or the record's wrong
        type with `exc` as its cause), or None when the server does not know the
        command's form (the layer then claims with the script from now on)."""
        kind = classify(exc)
        if kind == WRONG_TYPE:
            error = wrong_type(key)
            error.__cause__ = exc
            return error
        if kind == SYNTAX:
            self.plain_claims = False  # a server before 7.0: NX and GET do not combine
            return None
        return exc

    async def claim(
        self, client: CacheClient, key: str, text: str, expiry: int, now: float, owner: str
    ) -> ClaimResult:
        """Claim `key` with `text` unless a live record holds it (then return that)."""
        # 1 round trip for a free key or a live record; an expired or orphaned one is
        # classified here, then replaced only if it is still the same value (2 in all).
        expected = ""
        plain = self.plain_claims and not self.wait_replicas and hasattr(client, "set_nx_get")
        while True:
            if plain:
                plain = False
                answered, raw = await self._plain_claim(client, key, text, expiry, now)
                if answered:
                    if raw is None:
                        return ClaimResult(claimed=True)
                    existing = self.attributes.from_json(key, raw)
                    if not existing.is_claimable(now):
                        return ClaimResult(claimed=False, existing=existing)
                    expected = fingerprint(raw)
                continue
            args = (text, expiry, expected)
            if self.wait_replicas:
                reply, acked = await self._durably(client, CLAIM, key, args)
            else:
                reply, acked = await _script(client, CLAIM, key, args), 0
            code = int(reply[0])
            if code in (CLAIM_FREE, CLAIM_TAKEOVER):
                if acked < self.wait_replicas:
                    # Not on enough replicas: a failover could lose it, so give it up.
                    await _script(client, RELEASE, key, (owner_needle(owner),))
                    raise NotReplicated(
                        f"the claim on {key!r} reached {acked} of {self.wait_replicas} "
                        f"replicas within {self.wait_timeout:g}s; it was released"
                    )
                return ClaimResult(claimed=True)
            if code == CLAIM_WRONG_TYPE:
                kind = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
                raise IdempotencyInvalidStatusError(
                    f"record {key!r} holds a Redis {kind}, not a record"
                )
            raw = reply[1] if code == CLAIM_REFUSED else await read(client, key)
            if raw is None:
                return ClaimResult(claimed=False)  # gone since: the engine claims again
            existing = self.attributes.from_json(key, raw)
            if expected or not existing.is_claimable(now):
                return ClaimResult(claimed=False, existing=existing)
            expected = fingerprint(raw)

    # begin async-only
    async def claim_each(
        self, client: CacheClient, claims: Sequence[tuple[str, str, int, str]], now: float
    ) -> list[ClaimResult | Exception]:
        """`claim` of each ``(key, text, expiry, owner)``, a claim's own failure in its
        place. The plain claims go together (`set_nx_get_each`: one round trip on a
        pipelining client); a claim that needs more (a record to take over, a server
        without the plain form) then goes through `claim` on its own."""
        results: list[ClaimResult | Exception | None] = [None] * len(claims)
        if self.plain_claims and not self.wait_replicas and hasattr(client, "set_nx_get_each"):
            replies = await cast(Any, client).set_nx_get_each(
                [(key, text, max(1, expiry - int(now))) for key, text, expiry, _ in claims]
            )
            for index, ((key, *_), reply) in enumerate(zip(claims, replies, strict=True)):
                results[index] = self._plain_outcome(key, reply, now)
        rest = [index for index, result in enumerate(results) if result is None]
        done = await outcomes(
            self.claim(client, *claims[index][:3], now, claims[index][3]) for index in rest
        )
        for index, result in zip(rest, done, strict=True):
            results[index] = result
        return cast(list[ClaimResult | Exception], results)

    def _plain_outcome(
        self, key: str, reply: bytes | str | Exception | None, now: float
    ) -> ClaimResult | Exception | None:
        """What one ``SET NX GET`` of `claim_each` decided, or None when `claim` must
        finish it (a record to take over; a server that refused the form)."""
        if reply is None:
            return ClaimResult(claimed=True)
        if isinstance(reply, Exception):
            return self._plain_error(key, reply)
        try:
            existing = self.attributes.from_json(key, reply)
        except IdempotencyInvalidStatusError as exc:
            return exc
        return None if existing.is_claimable(now) else ClaimResult(False, existing)

    # end async-only
    def complete(
        self, client: CacheClient, key: str, owner: str, text: str, expiry: int
    ) -> Awaitable[Any]:
        """Write the completed record over `owner`'s claim; a `_lua` outcome code."""
        args = (owner_needle(owner), text, expiry, fingerprint(text))
        if self.wait_replicas:
            return self._durable_complete(client, key, args)
        return _script(client, COMPLETE, key, args)

    async def _durable_complete(
        self, client: CacheClient, key: str, args: Sequence[str | int]
    ) -> int:
        reply, acked = await self._durably(client, COMPLETE, key, args)
        code = int(reply)
        if code == DONE and acked < self.wait_replicas:
            raise NotReplicated(
                f"the result of {key!r} reached {acked} of {self.wait_replicas} replicas "
                f"within {self.wait_timeout:g}s"
            )
        return code

    def release(self, client: CacheClient, key: str, owner: str) -> Awaitable[Any]:
        """Delete `owner`'s claim on `key`, if it still holds it."""
        return _script(client, RELEASE, key, (owner_needle(owner),))

    def renew(
        self, client: CacheClient, key: str, owner: str, text: str, expiry: int
    ) -> Awaitable[Any]:
        """Write the renewed claim over `owner`'s (TTL kept); a `_lua` outcome code."""
        return _script(client, RENEW, key, (owner_needle(owner), text))


class ProtocolPath:
    """The protocol path: GET, SET and DEL only (see the module)."""

    atomic = False
    wait_replicas = 0

    def __init__(self, attributes: RecordAttributes) -> None:
        self.attributes = attributes

    def _is_our_claim(self, key: str, raw: bytes | str, owner: str) -> bool:
        """True when `raw` parses as an in-progress record holding `owner`'s claim."""
        try:
            record = self.attributes.from_json(key, raw)
        except IdempotencyInvalidStatusError:
            return False
        return record.status is RecordStatus.INPROGRESS and record.owner == owner

    async def claim(
        self, client: CacheClient, key: str, text: str, expiry: int, now: float, owner: str
    ) -> ClaimResult:
        """Claim `key` with `text` unless a live record holds it (then return that)."""
        # A record whose expiry has passed lives a second, as the scripts make it.
        expiry = max(expiry, int(now) + 1)
        if await _set(client, key, text, exat=expiry, nx=True):
            return ClaimResult(claimed=True)
        raw = await read(client, key)
        if raw is None:
            return ClaimResult(claimed=False)
        existing = self.attributes.from_json(key, raw)
        if not existing.is_claimable(now):
            return ClaimResult(claimed=False, existing=existing)
        lock_expiry = min(int(now) + ORPHAN_LOCK_SECONDS, expiry)
        if not await _set(client, f"{key}:lock", "True", exat=lock_expiry, nx=True):
            return ClaimResult(claimed=False, busy=True)  # another call is taking it over
        await _set(client, key, text, exat=expiry)
        return ClaimResult(claimed=True)

    async def complete(
        self, client: CacheClient, key: str, owner: str, text: str, expiry: int
    ) -> int:
        """Write `text` (a completion or a renewal) over `owner`'s in-progress claim:
        read, check, write. A takeover landing between the GET and the SET is
        overwritten (docs/redis-valkey.md says what this path guarantees)."""
        try:
            raw = await read(client, key)
        except IdempotencyInvalidStatusError:
            return TAKEN_OVER
        if raw is None:
            return GONE
        if as_bytes(raw) == text.encode():
            return DONE  # this very write, resent after a lost reply
        if not self._is_our_claim(key, raw, owner):
            return TAKEN_OVER
        await _set(client, key, text, exat=expiry)
        return DONE

    renew = complete

    async def release(self, client: CacheClient, key: str, owner: str) -> None:
        """Delete `owner`'s claim on `key`, if it still holds it."""
        try:
            raw = await read(client, key)
        except IdempotencyInvalidStatusError:
            return
        if raw is not None and self._is_our_claim(key, raw, owner):
            # A takeover landing between this GET and DEL is deleted (docs/redis-valkey.md).
            await client.delete(key)
