"""The cache store's Lua scripts and the pure helpers that go with them.

Shared by the async store and its sync twin. The scripts never parse a record:
`RecordAttributes.from_json` is the one classifier (every reader must classify a
record the same way). A script only moves bytes, compares them and looks
for an owner token, so it costs the same whatever the record's shape and (past a
bounded prefix and suffix) whatever its size. They do not depend on attribute names:
one set serves every layer. Every script touches one key (cluster-safe), and writes
take the record's absolute expiry (``EXAT``, Redis >= 6.2), so the caller needs no
clock; a write whose expiry has passed lives one second by the server's clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from aioidempotency.exceptions import IdempotencyClaimLostError, IdempotencyPersistenceConfigError

__all__ = [
    "CLAIM",
    "CLAIM_FREE",
    "CLAIM_REFUSED",
    "CLAIM_TAKEOVER",
    "CLAIM_TOO_LARGE",
    "CLAIM_WRONG_TYPE",
    "COMPLETE",
    "DONE",
    "GONE",
    "ORPHAN_LOCK_SECONDS",
    "RELEASE",
    "RENEW",
    "TAKEN_OVER",
    "LuaScript",
    "as_bytes",
    "fingerprint",
    "owner_needle",
    "raise_if_lost",
]

#: How long the reference's orphan lock lives at most (seconds).
ORPHAN_LOCK_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class LuaScript:
    """A Lua script and its SHA1, for EVALSHA."""

    code: str
    sha: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.code.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", digest)


#: Values up to this size are fingerprinted whole; larger ones through their first and
#: last `_FINGERPRINT_EDGE` bytes (see `fingerprint`).
_FINGERPRINT_WHOLE = 4096
_FINGERPRINT_EDGE = 2048
#: The most a script ever copies out of a value (GET): an owner token is only looked for
#: in values up to this size (an in-progress record is a few hundred bytes), and a
#: refused claim returns values up to this size itself; a larger one is read with a
#: plain GET (one more round trip, and no script copies megabytes while the server waits).
_MAX_SCRIPT_VALUE = 65536
#: The shortest owner token the owner checks accept (the engine's are 32 hex chars): a
#: short token could be found by chance in someone else's record.
_MIN_OWNER_CHARS = 16

# KEYS[1] is the only key; `n` its STRLEN, -1 when it holds another Redis type.
_PRELUDE = f"""
local key = KEYS[1]
local n = redis.pcall('STRLEN', key)
if type(n) ~= 'number' then n = -1 end
local function fingerprint()
  local sample
  if n <= {_FINGERPRINT_WHOLE} then
    sample = redis.call('GET', key)
  else
    sample = redis.call('GETRANGE', key, 0, {_FINGERPRINT_EDGE - 1})
      .. redis.call('GETRANGE', key, -{_FINGERPRINT_EDGE}, -1)
  end
  return string.format('%d', n) .. ':' .. redis.sha1hex(sample)
end
"""

# The expiry a write sets: the record's (epoch seconds), or one second from the server's
# now if that has passed, so that a record written late lives a moment, as with EX 1.
_EXPIRY = """
local function expiry(at)
  return math.max(tonumber(at), tonumber(redis.call('TIME')[1]) + 1)
end
"""

# ARGV: record text, expiry (epoch seconds), expected fingerprint or ''.
# {1}: claimed a free key. {3}: the value still had the expected fingerprint and was
# replaced (takeover). {4, type}: the key holds another Redis type. {0, value}:
# refused, with the value for the caller to classify. {5}: refused, the value is too
# large to copy here (the caller GETs it).
_CLAIM_CODE = (
    _EXPIRY
    + """
local at = expiry(ARGV[2])
if redis.call('SET', KEYS[1], ARGV[1], 'EXAT', at, 'NX') then return {1} end
"""
    + _PRELUDE
    + f"""
if n < 0 then return {{4, redis.call('TYPE', key)['ok']}} end
if ARGV[3] ~= '' and fingerprint() == ARGV[3] then
  redis.call('SET', key, ARGV[1], 'EXAT', at)
  return {{3}}
end
if n > {_MAX_SCRIPT_VALUE} then return {{5}} end
return {{0, redis.call('GET', key)}}
"""
)

# The value is ours when it is a string of at most _MAX_SCRIPT_VALUE bytes containing
# our owner token as a JSON string (ARGV[1], quotes included). Only our own in-progress
# records carry it; a completed record carries no token.
_OWNED = (
    _PRELUDE
    + f"""
local function missing()
  return n == 0 and redis.call('EXISTS', key) == 0
end
local function ours()
  return n > 0 and n <= {_MAX_SCRIPT_VALUE}
    and string.find(redis.call('GET', key), ARGV[1], 1, true) ~= nil
end
"""
)

# ARGV: quoted owner token, completed record text, expiry (epoch seconds), fingerprint
# of that text. 1: stored, or already stored by this very completion (resent after a
# lost reply); 0: gone; 2: taken over.
_COMPLETE_CODE = (
    _EXPIRY
    + _OWNED
    + """
if missing() then return 0 end
if n == #ARGV[2] and fingerprint() == ARGV[4] then return 1 end
if not ours() then return 2 end
redis.call('SET', key, ARGV[2], 'EXAT', expiry(ARGV[3]))
return 1
"""
)

# ARGV: quoted owner token. 1: deleted our claim, 0: nothing of ours to delete.
_RELEASE_CODE = (
    _OWNED
    + """
if not ours() then return 0 end
redis.call('DEL', key)
return 1
"""
)

# ARGV: quoted owner token, renewed in-progress record text. 1: renewed (TTL kept),
# 0: gone, 2: taken over.
_RENEW_CODE = (
    _OWNED
    + """
if missing() then return 0 end
if not ours() then return 2 end
redis.call('SET', key, ARGV[2], 'KEEPTTL')
return 1
"""
)

CLAIM = LuaScript(_CLAIM_CODE)
COMPLETE = LuaScript(_COMPLETE_CODE)
RELEASE = LuaScript(_RELEASE_CODE)
RENEW = LuaScript(_RENEW_CODE)

CLAIM_REFUSED, CLAIM_FREE, CLAIM_TAKEOVER, CLAIM_WRONG_TYPE, CLAIM_TOO_LARGE = 0, 1, 3, 4, 5
DONE, GONE, TAKEN_OVER = 1, 0, 2


def fingerprint(value: bytes | str) -> str:
    """``"<byte length>:<sha1 hex>"`` of a stored value, as the claim script computes it.

    The SHA1 covers the whole value up to 4 KiB, else its first and last 2 KiB, so the
    script's cost is bounded whatever the size. A takeover compares fingerprints: the
    value must not have changed since the caller classified it. Residual risk: a rewrite
    of a value over 4 KiB that keeps its length and both 2 KiB ends goes unseen.
    """
    data = as_bytes(value)
    n = len(data)
    sample = (
        data if n <= _FINGERPRINT_WHOLE else data[:_FINGERPRINT_EDGE] + data[-_FINGERPRINT_EDGE:]
    )
    return f"{n}:{hashlib.sha1(sample, usedforsecurity=False).hexdigest()}"


def owner_needle(owner: str) -> str:
    """What the owner checks look for: the token as a JSON string, quotes included
    (inside a stored result, a quote is escaped, so the needle cannot match there)."""
    if len(owner) < _MIN_OWNER_CHARS:
        raise IdempotencyPersistenceConfigError(
            f"owner token {owner!r} is too short for an owner check (at least "
            f"{_MIN_OWNER_CHARS} characters; the engine uses 32 random hex digits)"
        )
    return json.dumps(owner)


def as_bytes(value: bytes | str) -> bytes:
    """`value` as bytes (clients return either, by their configuration)."""
    return value.encode() if isinstance(value, str) else value


def raise_if_lost(key: str, code: int) -> None:
    """Raise `IdempotencyClaimLostError` for a `GONE` or `TAKEN_OVER` outcome."""
    if code == GONE:
        raise IdempotencyClaimLostError(f"the claim on {key!r} is gone", key=key)
    if code == TAKEN_OVER:
        raise IdempotencyClaimLostError(f"the claim on {key!r} was taken over", key=key)
