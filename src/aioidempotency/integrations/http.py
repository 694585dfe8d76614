"""The framework-free core of the ``Idempotency-Key`` middleware.

Both web integrations (`aioidempotency.integrations.starlette` and
`aioidempotency.integrations.aiohttp`) are thin adapters over `HttpIdempotency`: they
turn their request into an `HttpRequest`, let the core run the application through
`IdempotencyEngine.run`, and send the `Outcome` back. Everything that decides
behaviour lives here, once: parsing the key, scoping it, fingerprinting the request,
what is stored, how a reply is rebuilt, and the problem+json errors (RFC 9457).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import string
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from typing_extensions import TypedDict

from aioidempotency.config import IdempotencyConfig
from aioidempotency.engine import IdempotencyEngine
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyError,
    IdempotencyResultTooLargeError,
    IdempotencyValidationError,
)
from aioidempotency.persistence.base import PersistenceLayer

__all__ = [
    "DEFAULT_EXCLUDED_HEADERS",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_PROBLEM_TYPE_BASE",
    "HOP_BY_HOP_HEADERS",
    "NOT_STORED_HEADER",
    "PROBLEM_CONTENT_TYPE",
    "REPLAYED_HEADER",
    "HttpIdempotency",
    "HttpIdempotencyOptions",
    "HttpOptionFields",
    "HttpRequest",
    "InvalidKeyError",
    "Outcome",
    "PassThrough",
    "Reply",
    "fingerprint",
    "is_server_error",
    "parse_idempotency_key",
    "problem",
]

REPLAYED_HEADER = "Idempotent-Replayed"
"""Added (``true``) to every replayed response, as Stripe does."""

NOT_STORED_HEADER = "Idempotency-Not-Stored"
"""Added to a response that ran but was not stored; the value says why:
``status`` (a status that releases the key, 5xx by default), ``streaming``,
``too-large`` or ``store-error``."""

PROBLEM_CONTENT_TYPE = "application/problem+json"
DEFAULT_KEY_PREFIX = "aioidempotency.http"
DEFAULT_PROBLEM_TYPE_BASE = "tag:aioidempotency,2026:problem:"
"""Problem ``type`` URIs are this plus a kind such as ``key-reused``; set
`HttpIdempotencyOptions.problem_type_base` to the URL of your own documentation."""

HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
DEFAULT_EXCLUDED_HEADERS = HOP_BY_HOP_HEADERS | {"content-length", "date", "server", "set-cookie"}
"""Response headers never stored: hop-by-hop ones, those the server sets per
response (``Date``, ``Server``, ``Content-Length`` is recomputed) and ``Set-Cookie``
(a session cookie must not be handed out again)."""

_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~:/")
_STORED_VERSION = 1


def is_server_error(status: int) -> bool:
    """The default release rule: a 5xx response is not stored."""
    return status >= 500


@dataclasses.dataclass(frozen=True)
class HttpIdempotencyOptions:
    """How the middleware treats requests; every knob has the documented default.

    - `header_name`: the request header carrying the key.
    - `methods`: the methods the middleware handles; others pass through untouched.
    - `required`: a handled request without the header is a 400 (else it passes).
    - `max_key_length`: longer keys are a 400 (255, as Stripe).
    - `fingerprint_headers`: request headers hashed with the query and body.
    - `max_request_bytes`: larger request bodies are a 413 (they are buffered).
    - `max_response_bytes`: larger response bodies pass through unstored.
    - `release_when`: statuses that release the key instead of being stored.
    - `excluded_headers`: response headers that are not stored.
    - `retry_after_seconds`: the ``Retry-After`` of a 409 and a 503.
    - `problem_type_base`: prefix of the problem ``type`` URIs (point it at your docs).
    """

    header_name: str = "Idempotency-Key"
    methods: AbstractSet[str] = frozenset({"POST", "PATCH"})
    required: bool = False
    max_key_length: int = 255
    fingerprint_headers: Sequence[str] = ()
    max_request_bytes: int = 1024 * 1024
    max_response_bytes: int = 1024 * 1024
    release_when: Callable[[int], bool] = is_server_error
    excluded_headers: AbstractSet[str] = DEFAULT_EXCLUDED_HEADERS
    retry_after_seconds: int = 1
    problem_type_base: str = DEFAULT_PROBLEM_TYPE_BASE

    def __post_init__(self) -> None:
        if not self.header_name:
            raise ValueError("header_name must not be empty")
        if self.max_key_length < 1:
            raise ValueError("max_key_length must be at least 1")
        if self.max_request_bytes < 0 or self.max_response_bytes < 0:
            raise ValueError("max_request_bytes and max_response_bytes must be >= 0")
        if self.retry_after_seconds < 0:
            raise ValueError("retry_after_seconds must be >= 0")
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        object.__setattr__(
            self, "fingerprint_headers", tuple(h.lower() for h in self.fingerprint_headers)
        )
        object.__setattr__(
            self, "excluded_headers", frozenset(h.lower() for h in self.excluded_headers)
        )


class HttpOptionFields(TypedDict, total=False):
    """The fields of `HttpIdempotencyOptions`, as keyword arguments of the adapters."""

    header_name: str
    methods: AbstractSet[str]
    required: bool
    max_key_length: int
    fingerprint_headers: Sequence[str]
    max_request_bytes: int
    max_response_bytes: int
    release_when: Callable[[int], bool]
    excluded_headers: AbstractSet[str]
    retry_after_seconds: int
    problem_type_base: str


@dataclasses.dataclass(frozen=True)
class Reply:
    """A complete HTTP response: status, headers (in order) and body."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def with_header(self, name: str, value: str) -> Reply:
        """A copy with header `name` set to `value` (replacing earlier values)."""
        lowered = name.lower()
        kept = tuple((n, v) for n, v in self.headers if n.lower() != lowered)
        return dataclasses.replace(self, headers=(*kept, (name, value)))

    def to_stored(self, excluded: Iterable[str] = DEFAULT_EXCLUDED_HEADERS) -> dict[str, Any]:
        """The JSON-able form kept in the store (header names lower-cased)."""
        skip = frozenset(h.lower() for h in excluded)
        return {
            "v": _STORED_VERSION,
            "status": self.status,
            "headers": [[n.lower(), v] for n, v in self.headers if n.lower() not in skip],
            "body": base64.b64encode(self.body).decode("ascii"),
        }

    @classmethod
    def from_stored(cls, data: Any) -> Reply:
        """Rebuild a reply from `to_stored` output; ValueError when it is not one."""
        try:
            if data["v"] != _STORED_VERSION:
                raise ValueError(f"unknown stored response version {data['v']!r}")
            headers = tuple((str(n), str(v)) for n, v in data["headers"])
            body = base64.b64decode(data["body"], validate=True)
            return cls(status=int(data["status"]), headers=headers, body=body)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"not a stored HTTP response: {exc!r}") from exc


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """A response that cannot be stored (streamed, or not buffered).

    `response` is the adapter's own object (or None when it was already sent);
    `reason` becomes the value of the `NOT_STORED_HEADER`.
    """

    reason: str = "streaming"
    response: Any = None


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    """What the core needs to know about a request that carries a key."""

    method: str
    path: str
    key: str
    query: str = ""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    scope: str | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What to answer: `response` is a `Reply` to send, or the adapter's `PassThrough`."""

    response: Reply | PassThrough
    replayed: bool = False
    stored: bool = False


class InvalidKeyError(ValueError):
    """The idempotency key header is present but unusable; `str()` says why."""


def parse_idempotency_key(values: Sequence[str], max_length: int = 255) -> str:
    """The key from the header's values: an sf-string (``"..."``) or a bare token.

    Raises `InvalidKeyError` when the header repeats, is empty, longer than
    `max_length` characters, or neither an sf-string nor a token.
    """
    if len(values) != 1:
        raise InvalidKeyError("the header must appear exactly once")
    raw = values[0].strip(" \t")
    key = _parse_sf_string(raw) if raw.startswith('"') else _parse_token(raw)
    if not key:
        raise InvalidKeyError("the key is empty")
    if len(key) > max_length:
        raise InvalidKeyError(f"the key is longer than {max_length} characters")
    return key


def _parse_sf_string(raw: str) -> str:
    chars: list[str] = []
    i = 1
    while i < len(raw):
        char = raw[i]
        if char == "\\":
            if i + 1 >= len(raw) or raw[i + 1] not in '"\\':
                raise InvalidKeyError("a quoted key may only escape '\"' and '\\'")
            chars.append(raw[i + 1])
            i += 2
            continue
        if char == '"':
            rest = raw[i + 1 :].lstrip(" \t")
            if rest and not rest.startswith(";"):  # sf parameters are ignored
                raise InvalidKeyError("unexpected characters after the quoted key")
            return "".join(chars)
        if not " " <= char <= "~":
            raise InvalidKeyError("a quoted key may only hold printable ASCII characters")
        chars.append(char)
        i += 1
    raise InvalidKeyError("the quoted key is not terminated")


def _parse_token(raw: str) -> str:
    bad = next((c for c in raw if c not in _TOKEN_CHARS), None)
    if bad is not None:
        raise InvalidKeyError(
            f"character {bad!r} is not allowed in a bare key; send it as a quoted string"
        )
    return raw


def fingerprint(
    body: bytes,
    *,
    query: str = "",
    headers: Sequence[tuple[str, str]] = (),
    names: Sequence[str] = (),
) -> str:
    """SHA-256 (hex) of the query string, the chosen headers and the body.

    Each part is length-prefixed so that no two different requests frame the same
    bytes; header names are matched case-insensitively and repeated values joined.
    """
    digest = hashlib.sha256()

    def part(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    part(query.encode("utf-8", "surrogateescape"))
    for name in names:
        lowered = name.lower()
        values = [v for n, v in headers if n.lower() == lowered]
        part(lowered.encode("ascii"))
        part(", ".join(values).encode("utf-8", "surrogateescape"))
    part(body)
    return digest.hexdigest()


def problem(
    status: int,
    kind: str,
    title: str,
    detail: str,
    *,
    type_base: str = DEFAULT_PROBLEM_TYPE_BASE,
    headers: Sequence[tuple[str, str]] = (),
) -> Reply:
    """An ``application/problem+json`` reply (RFC 9457) with type, title, status, detail."""
    body = json.dumps(
        {"type": f"{type_base}{kind}", "title": title, "status": status, "detail": detail}
    ).encode()
    return Reply(status, (("content-type", PROBLEM_CONTENT_TYPE), *headers), body)


class _NotStored(Exception):
    """Raised out of the engine's function so that it releases the key."""

    def __init__(self, response: Reply | PassThrough, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason


class HttpIdempotency:
    """The shared core: runs one request with a key through the engine.

    `store` keeps the records; `config` supplies expiry, lease and the opt-in wait
    (its key and validation expressions and response hook are the middleware's own);
    `key_prefix` starts every stored key.
    """

    def __init__(
        self,
        store: PersistenceLayer,
        config: IdempotencyConfig | None = None,
        *,
        options: HttpIdempotencyOptions | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        self.options = options or HttpIdempotencyOptions()
        config = dataclasses.replace(
            config or IdempotencyConfig(),
            event_key_jmespath="[scope, key]",
            payload_validation_jmespath="fingerprint",
            raise_on_no_idempotency_key=True,
            response_hook=None,  # a replay must stay a stored response
        )
        self.engine = IdempotencyEngine(store, config, key_prefix=key_prefix)

    # -- before the request ----------------------------------------------------------

    def handles(self, method: str) -> bool:
        """True when requests with `method` are handled (POST and PATCH by default)."""
        return method.upper() in self.options.methods

    def parse_key(self, values: Sequence[str]) -> str | Reply | None:
        """The key from the header's values; None when absent and optional; else a 400."""
        opts = self.options
        if not values:
            if not opts.required:
                return None
            return self._problem(
                400,
                "key-missing",
                f"{opts.header_name} is missing",
                f"This operation requires an {opts.header_name} header.",
            )
        try:
            return parse_idempotency_key(values, opts.max_key_length)
        except InvalidKeyError as exc:
            return self._problem(
                400, "key-malformed", f"{opts.header_name} is malformed", f"{exc}."
            )

    def request_too_large(self) -> Reply:
        """The 413 for a request body over `max_request_bytes`."""
        limit = self.options.max_request_bytes
        return self._problem(
            413,
            "request-too-large",
            "Request body too large",
            f"A request with an {self.options.header_name} may carry at most {limit} bytes.",
        )

    def storage_key(self, method: str, path: str, key: str, scope: str | None = None) -> str:
        """The store key of a request (for tools and tests)."""
        return self.engine.idempotency_key(self._payload(method, path, key, scope, ""))

    # -- the request -------------------------------------------------------------------

    async def run(
        self, request: HttpRequest, call_app: Callable[[], Awaitable[Reply | PassThrough]]
    ) -> Outcome:
        """Run `call_app` at most once for the request's scoped key and answer.

        The first call's `Reply` is stored (unless released: see the options) and
        returned as it is; a duplicate gets the stored reply plus `REPLAYED_HEADER`;
        a busy key is a 409, another body under the key a 422, a failing store a 503.
        Exceptions of `call_app` release the key and propagate.
        """
        opts = self.options
        produced: list[Reply | PassThrough] = []

        async def fn() -> dict[str, Any]:
            response = await call_app()
            produced.append(response)
            if isinstance(response, PassThrough):
                raise _NotStored(response, response.reason)
            if opts.release_when(response.status):
                raise _NotStored(response, "status")
            if len(response.body) > opts.max_response_bytes:
                raise _NotStored(response, "too-large")
            return response.to_stored(opts.excluded_headers)

        payload = self._payload(
            request.method,
            request.path,
            request.key,
            request.scope,
            fingerprint(
                request.body,
                query=request.query,
                headers=request.headers,
                names=opts.fingerprint_headers,
            ),
        )
        try:
            stored = await self.engine.run(payload, fn)
        except _NotStored as exc:
            return Outcome(_mark_not_stored(exc.response, exc.reason))
        except IdempotencyAlreadyInProgressError:
            return Outcome(self._in_progress())
        except IdempotencyValidationError:
            return Outcome(self._mismatch())
        except IdempotencyError as exc:
            if not produced:
                return Outcome(self._store_unavailable())
            reason = (
                "too-large" if isinstance(exc, IdempotencyResultTooLargeError) else "store-error"
            )
            if isinstance(exc, IdempotencyClaimLostError):
                reason = "store-error"
            return Outcome(_mark_not_stored(produced[0], reason))
        if produced:
            first = produced[0]
            assert isinstance(first, Reply)
            return Outcome(first, stored=True)
        return Outcome(
            Reply.from_stored(stored).with_header(REPLAYED_HEADER, "true"), replayed=True
        )

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _payload(
        method: str, path: str, key: str, scope: str | None, fingerprint: str
    ) -> dict[str, Any]:
        return {
            "key": key,
            "scope": [method.upper(), path, scope or ""],
            "fingerprint": fingerprint,
        }

    def _problem(
        self, status: int, kind: str, title: str, detail: str, retry: bool = False
    ) -> Reply:
        headers = (("retry-after", str(self.options.retry_after_seconds)),) if retry else ()
        return problem(
            status, kind, title, detail, type_base=self.options.problem_type_base, headers=headers
        )

    def _in_progress(self) -> Reply:
        name = self.options.header_name
        return self._problem(
            409,
            "request-in-progress",
            "A request with this key is in progress",
            f"Another request with the same {name} has not finished yet; retry later.",
            retry=True,
        )

    def _mismatch(self) -> Reply:
        name = self.options.header_name
        return self._problem(
            422,
            "key-reused",
            f"{name} reused with another request",
            f"This {name} was already used with a different request body or parameters.",
        )

    def _store_unavailable(self) -> Reply:
        return self._problem(
            503,
            "store-unavailable",
            "Idempotency store unavailable",
            "The request was not processed because its key could not be checked; retry later.",
            retry=True,
        )


def _mark_not_stored(response: Reply | PassThrough, reason: str) -> Reply | PassThrough:
    if isinstance(response, Reply):
        return response.with_header(NOT_STORED_HEADER, reason)
    return dataclasses.replace(response, reason=reason)
