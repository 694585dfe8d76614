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
import logging
import string
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from typing_extensions import TypedDict

if TYPE_CHECKING:
    import http_sf

from aioidempotency._async.engine import IdempotencyEngine
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._config import IdempotencyConfig
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyError,
    IdempotencyInconsistentStateError,
    IdempotencyInvalidRecordError,
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceLayerError,
    IdempotencyResultTooLargeError,
    IdempotencyValidationError,
)

__all__ = [
    "DEFAULT_EXCLUDED_HEADERS",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_PROBLEM_TYPE_BASE",
    "DEFAULT_SCOPE_HEADERS",
    "HOP_BY_HOP_HEADERS",
    "NOT_STORED_HEADER",
    "PROBLEM_CONTENT_TYPE",
    "REPLAYED_HEADER",
    "HttpIdempotency",
    "HttpIdempotencyOptions",
    "HttpOptionFields",
    "HttpRequest",
    "IdempotencyStoredReplyError",
    "InvalidKeyError",
    "Outcome",
    "PassThrough",
    "Reply",
    "credential_scope",
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

DEFAULT_SCOPE_HEADERS = ("authorization", "cookie")
"""The credential headers, in order, whose first one present (hashed) scopes keys
when the application passes no ``scope_by``: two callers with different
credentials never share a key."""

_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~:/")
_HEADER_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_STORED_VERSION = 1

logger = logging.getLogger("aioidempotency.web")
"""Every problem the middleware answers is logged here: 4xx at INFO, 5xx at WARNING,
with its kind, the reason and, once known, the storage key (never bodies or
credentials); the fields are also the record's ``extra`` attributes (`_log_fields`)."""


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
    - `scope_headers`: without ``scope_by``, keys are scoped by a SHA-256 of the
      first of these request headers that a request carries (its credential);
      ``()`` turns that off (every caller shares the key).
    - `scope_cookies`: when set, only these cookies of the ``Cookie`` header count
      as a credential (else the whole header does).
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
    scope_headers: Sequence[str] = DEFAULT_SCOPE_HEADERS
    scope_cookies: Sequence[str] | None = None

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
        if isinstance(self.scope_headers, str) or isinstance(self.scope_cookies, str):
            raise ValueError("scope_headers and scope_cookies must be sequences of names")
        object.__setattr__(self, "scope_headers", tuple(h.lower() for h in self.scope_headers))
        if self.scope_cookies is not None:
            object.__setattr__(self, "scope_cookies", tuple(self.scope_cookies))


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
    scope_headers: Sequence[str]
    scope_cookies: Sequence[str] | None


class IdempotencyStoredReplyError(IdempotencyError, ValueError):
    """The result stored under an HTTP key is not a reply this middleware stored.

    Another writer's data, or a hand-written record, under the key. It is never
    replayed or overwritten; `key` names it (when known) and ``python -m
    aioidempotency delete --store URL KEY`` frees it.
    """

    def __init__(self, *args: object, key: str | None = None) -> None:
        super().__init__(*args)
        self.key = key


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
        """Rebuild a reply from `to_stored` output.

        Raises `IdempotencyStoredReplyError` (a ValueError) when `data` is not one: a
        wrong shape or version, a status outside 200-599, a header that could not be
        sent (a bad name, a line break in a value), or a body that is not base64.
        """
        if not isinstance(data, dict):
            raise IdempotencyStoredReplyError(
                f"not a stored HTTP response: a JSON {type(data).__name__}, not an object"
            )
        version = data.get("v")
        if type(version) is not int or version != _STORED_VERSION:
            raise IdempotencyStoredReplyError(
                f"not a stored HTTP response: unknown version {version!r}"
            )
        status = data.get("status")
        if type(status) is not int or not 200 <= status <= 599:
            raise IdempotencyStoredReplyError(
                f"not a stored HTTP response: status {status!r} is not 200-599"
            )
        raw_headers = data.get("headers")
        if not isinstance(raw_headers, list):
            raise IdempotencyStoredReplyError("not a stored HTTP response: headers not a list")
        headers = tuple(_stored_header(item) for item in raw_headers)
        body = data.get("body")
        if not isinstance(body, str):
            raise IdempotencyStoredReplyError("not a stored HTTP response: body is not text")
        try:
            decoded = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise IdempotencyStoredReplyError(
                "not a stored HTTP response: body is not base64"
            ) from exc
        return cls(status=status, headers=headers, body=decoded)


def _stored_header(item: Any) -> tuple[str, str]:
    if (
        not isinstance(item, list)
        or len(item) != 2
        or not all(isinstance(part, str) for part in item)
    ):
        raise IdempotencyStoredReplyError(
            "not a stored HTTP response: a header is not a [name, value] pair of strings"
        )
    name, value = item
    if not name or not set(name) <= _HEADER_NAME_CHARS:
        raise IdempotencyStoredReplyError(
            f"not a stored HTTP response: invalid header name {name!r}"
        )
    if any(c in value for c in "\r\n\0") or not _latin1(value):
        raise IdempotencyStoredReplyError(
            f"not a stored HTTP response: header {name!r} has a value that cannot be sent"
        )
    return name, value


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


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
    """What the core needs to know about a request that carries a key.

    `scope` is the caller's scope as the application's ``scope_by`` returned it; None
    (no ``scope_by``) scopes the key by the request's credentials instead (see
    `credential_scope`).
    """

    method: str
    path: str
    key: str
    query: str = ""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    scope: str | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What to answer: `response` is a `Reply` to send, or the adapter's `PassThrough`.

    `error` is the exception behind a problem answer (a 409, 422, 500 or 503), if any.
    """

    response: Reply | PassThrough
    replayed: bool = False
    stored: bool = False
    error: Exception | None = None


class InvalidKeyError(ValueError):
    """The idempotency key header is present but unusable; `str()` says why."""


def parse_idempotency_key(values: Sequence[str], max_length: int = 255) -> str:
    """The key from the header's values: an sf-string (``"..."``) or a bare token.

    A quoted key is an RFC 9651 Item holding a String, parsed by the ``http-sf``
    package (its parameters are ignored); a bare key, which many clients send (a UUID
    is not an sf-token), is accepted when it holds token characters only.
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
    # Imported here: the framework-free core imports without the web extra; the
    # middlewares import http-sf when they are imported.
    import http_sf

    try:
        parsed = http_sf.parse(raw.encode("utf-8", "replace"), tltype="item")
    except http_sf.StructuredFieldError as exc:
        raise InvalidKeyError(_why_not_sf_string(raw, exc)) from exc
    value = parsed[0] if isinstance(parsed, tuple) else parsed
    assert isinstance(value, str)  # an Item opening with a quote is a String
    return value


def _why_not_sf_string(raw: str, error: http_sf.StructuredFieldError) -> str:
    """What is wrong with `raw`, a value http-sf refused, said so a client can fix it:
    http-sf says where it stopped (`position`, a byte offset: the same as the
    character offset up to the first character outside ASCII, where it stops)."""
    end = 1  # the closing quote, escapes skipped
    while end < len(raw) and raw[end] != '"':
        end += 2 if raw[end] == "\\" else 1
    if end >= len(raw):
        return "the quoted key is not terminated"
    at = error.position if error.position is not None else len(raw)
    if at > end:
        return "unexpected characters after the quoted key"
    if " " <= raw[at] <= "~":  # a printable character refused: it follows a backslash
        return "a quoted key may only escape '\"' and '\\'"
    return "a quoted key may only hold printable ASCII characters"


def _parse_token(raw: str) -> str:
    bad = next((c for c in raw if c not in _TOKEN_CHARS), None)
    if bad is not None:
        raise InvalidKeyError(
            f"character {bad!r} is not allowed in a bare key; send it as a quoted string"
        )
    return raw


def credential_scope(
    headers: Sequence[tuple[str, str]],
    names: Sequence[str] = DEFAULT_SCOPE_HEADERS,
    cookies: Sequence[str] | None = None,
) -> str:
    """The default scope of a request: SHA-256 (hex) of its caller's credentials.

    The first header of `names` (case-insensitive) that the request carries is the
    credential; later ones are ignored, so cookies that a load balancer or the
    service sets on a client that sends ``Authorization`` do not change its scope.
    With `cookies` set, the ``Cookie`` header counts only through those cookies.
    A request carrying none of them gets the anonymous scope, ``""``. The raw values
    never leave this function.
    """
    for name in names:
        lowered = name.lower()
        values = [v for n, v in headers if n.lower() == lowered]
        if lowered == "cookie" and cookies is not None:
            values = _named_cookies(values, cookies)
        if values:
            digest = hashlib.sha256()
            for data in (
                lowered.encode("ascii"),
                "\n".join(values).encode("utf-8", "surrogateescape"),
            ):
                digest.update(len(data).to_bytes(8, "big"))
                digest.update(data)
            return digest.hexdigest()
    return ""


def _named_cookies(values: Sequence[str], names: Sequence[str]) -> list[str]:
    """The ``name=value`` pairs of the cookies called `names`, in a stable order."""
    wanted = frozenset(names)
    pairs = []
    for value in values:
        for pair in value.split(";"):
            name, _, cookie = pair.strip().partition("=")
            if name in wanted:
                pairs.append(f"{name}={cookie}")
    return sorted(pairs)


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
            return self._answer(
                400,
                "key-missing",
                f"{opts.header_name} is missing",
                f"This operation requires an {opts.header_name} header.",
            )
        try:
            return parse_idempotency_key(values, opts.max_key_length)
        except InvalidKeyError as exc:
            return self._answer(
                400, "key-malformed", f"{opts.header_name} is malformed", f"{exc}.", reason=exc
            )

    def request_too_large(self) -> Reply:
        """The 413 for a request body over `max_request_bytes`.

        It asks for the connection to be closed (``Connection: close``), since the
        rest of the body is never read.
        """
        limit = self.options.max_request_bytes
        return self._answer(
            413,
            "request-too-large",
            "Request body too large",
            f"A request with an {self.options.header_name} may carry at most {limit} bytes.",
            headers=(("connection", "close"),),
        )

    def scope_missing(self) -> Reply:
        """The 400 for a request whose ``scope_by`` returned None: nothing runs."""
        return self._answer(
            400,
            "scope-missing",
            "Caller could not be identified",
            f"A request with an {self.options.header_name} must identify its caller "
            "(for example with an API key or credentials) so that its key is not shared "
            "with other callers.",
        )

    def credential_scope(self, headers: Sequence[tuple[str, str]]) -> str:
        """The default scope of a request: `credential_scope` with the options' headers."""
        opts = self.options
        return credential_scope(headers, opts.scope_headers, opts.scope_cookies)

    def storage_key(self, method: str, path: str, key: str, scope: str | None = None) -> str:
        """The store key of a request in `scope` (``""``, the anonymous scope, if None).

        `scope` is what ``scope_by`` returned, else `credential_scope` of the request.
        """
        return self.engine.idempotency_key(self._payload(method, path, key, scope or "", ""))

    # -- the request -------------------------------------------------------------------

    async def run(
        self, request: HttpRequest, call_app: Callable[[], Awaitable[Reply | PassThrough]]
    ) -> Outcome:
        """Run `call_app` at most once for the request's scoped key and answer.

        The first call's `Reply` is stored (unless released: see the options) and
        returned as it is; a duplicate gets the stored reply plus `REPLAYED_HEADER`;
        a busy key is a 409, another body under the key a 422, a store that cannot be
        reached (or timed out) a 503, a store refusing the credentials or set up wrongly
        a 500 ``store-misconfigured``, and other store failures and unusable stored data
        a 500 (see `Outcome.error`). Exceptions of `call_app` release the key and propagate.
        """
        opts = self.options
        started = time.monotonic()
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

        scope = request.scope
        if scope is None:
            scope = self.credential_scope(request.headers)
        payload = self._payload(
            request.method,
            request.path,
            request.key,
            scope,
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
        except IdempotencyAlreadyInProgressError as exc:
            return Outcome(self._in_progress(self._key_of(payload), started), error=exc)
        except IdempotencyValidationError as exc:
            return Outcome(self._mismatch(self._key_of(payload), started), error=exc)
        except IdempotencyError as exc:
            if not produced:
                return Outcome(self._failure(exc, self._key_of(payload), started), error=exc)
            reason = (
                "too-large" if isinstance(exc, IdempotencyResultTooLargeError) else "store-error"
            )
            if isinstance(exc, IdempotencyClaimLostError):
                reason = "store-error"
            key = self._key_of(payload)
            logger.warning(
                "response not stored (%s) for %s: %s",
                reason,
                key,
                _describe(exc),
                extra=self._log_fields(f"not-stored:{reason}", key, started, exc),
            )
            return Outcome(_mark_not_stored(produced[0], reason), error=exc)
        if produced:
            first = produced[0]
            assert isinstance(first, Reply)
            return Outcome(first, stored=True)
        try:
            replay = Reply.from_stored(stored)
        except IdempotencyStoredReplyError as exc:
            exc.key = self._key_of(payload)
            return Outcome(self._stored_reply_invalid(exc, started), error=exc)
        return Outcome(replay.with_header(REPLAYED_HEADER, "true"), replayed=True)

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _payload(method: str, path: str, key: str, scope: str, fingerprint: str) -> dict[str, Any]:
        return {"key": key, "scope": [method.upper(), path, scope], "fingerprint": fingerprint}

    def _key_of(self, payload: dict[str, Any]) -> str:
        return self.engine.idempotency_key(payload)

    def _answer(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        *,
        retry: bool = False,
        key: str | None = None,
        reason: BaseException | str | None = None,
        started: float | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        """A problem reply, logged with its kind, the storage key and the reason (an
        exception, described by its type and message, or a sentence)."""
        level = logging.WARNING if status >= 500 else logging.INFO
        if logger.isEnabledFor(level):
            error = reason if isinstance(reason, BaseException) else None
            why = reason if error is None else _describe(error)
            fields = self._log_fields(kind, key, started, error)
            fields["http_status"] = status
            fields["idempotency_reason"] = why
            logger.log(
                level,
                "answered %d %s for %s%s",
                status,
                kind,
                key or "a request with no storage key yet",
                "" if why is None else f": {why}",
                exc_info=error if kind == "store-error" else None,
                extra=fields,
            )
        if retry:
            headers = (*headers, ("retry-after", str(self.options.retry_after_seconds)))
        return problem(
            status, kind, title, detail, type_base=self.options.problem_type_base, headers=headers
        )

    def _log_fields(
        self, decision: str, key: str | None, started: float | None, error: BaseException | None
    ) -> dict[str, Any]:
        """The ``extra`` attributes of a log record: those of the engine's decisions
        (`aioidempotency.events.LOG_FIELDS`) that the middleware knows."""
        return {
            "idempotency_decision": decision,
            "idempotency_key": key,
            "idempotency_prefix": self.engine.key_prefix,
            "duration_ms": (
                None if started is None else round((time.monotonic() - started) * 1000, 3)
            ),
            "idempotency_error": None if error is None else type(error).__name__,
        }

    def _in_progress(self, key: str, started: float | None = None) -> Reply:
        name = self.options.header_name
        return self._answer(
            409,
            "request-in-progress",
            "A request with this key is in progress",
            f"Another request with the same {name} has not finished yet; retry later.",
            retry=True,
            key=key,
            reason="another request with this key has not finished",
            started=started,
        )

    def _mismatch(self, key: str, started: float | None = None) -> Reply:
        name = self.options.header_name
        return self._answer(
            422,
            "key-reused",
            f"{name} reused with another request",
            f"This {name} was already used with a different request body or parameters.",
            key=key,
            reason="the key was used with a different request body or parameters",
            started=started,
        )

    def _failure(self, exc: IdempotencyError, key: str, started: float | None = None) -> Reply:
        """The answer when the store failed or holds something unusable (nothing ran)."""
        if isinstance(exc, (IdempotencyInvalidRecordError, IdempotencyInvalidStatusError)):
            return self._answer(
                500,
                "stored-record-invalid",
                "Unusable idempotency record",
                "The idempotency store holds a record under this key that cannot be used, "
                "so the request was not processed. Retrying will not help until an "
                "operator removes the record (its storage key is in the server's log).",
                key=key,
                reason=exc,
                started=started,
            )
        if isinstance(exc, IdempotencyPersistenceConfigError):
            # Credentials, permissions, a missing table, a cluster mode that is not the
            # server's: no retry will clear it, so no 503 and no Retry-After.
            return self._answer(
                500,
                "store-misconfigured",
                "Idempotency store misconfigured",
                "The request was not processed because the idempotency store is not set up "
                "as this service expects (credentials, permissions or the store itself). "
                "Retrying will not help until an operator fixes it (see the server's log).",
                key=key,
                reason=exc,
                started=started,
            )
        transient = isinstance(exc, IdempotencyInconsistentStateError) or (
            isinstance(exc, IdempotencyPersistenceLayerError) and exc.transient
        )
        if transient:
            return self._answer(
                503,
                "store-unavailable",
                "Idempotency store unavailable",
                "The request was not processed because its key could not be checked; retry later.",
                retry=True,
                key=key,
                reason=exc,
                started=started,
            )
        return self._answer(
            500,
            "store-error",
            "Idempotency store error",
            "The request was not processed because the idempotency store failed in a way "
            "that a retry is not expected to fix (see the server's log).",
            key=key,
            reason=exc,
            started=started,
        )

    def _stored_reply_invalid(
        self, exc: IdempotencyStoredReplyError, started: float | None = None
    ) -> Reply:
        return self._answer(
            500,
            "stored-reply-invalid",
            "Stored response is not usable",
            "The result stored under this key is not a response this service stored, so "
            "it cannot be replayed and the request was not processed. Retrying will not "
            "help until an operator removes it (its storage key is in the server's log).",
            key=exc.key,
            reason=exc,
            started=started,
        )


def _describe(exc: BaseException) -> str:
    """An error as one bounded log line: its type and message."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 1000 else text[:997] + "..."


def _mark_not_stored(response: Reply | PassThrough, reason: str) -> Reply | PassThrough:
    if isinstance(response, Reply):
        return response.with_header(NOT_STORED_HEADER, reason)
    return dataclasses.replace(response, reason=reason)
