"""Web integrations: the ``Idempotency-Key`` header for Starlette/FastAPI and aiohttp.

`aioidempotency.integrations._http` is the framework-free core both share;
`aioidempotency.integrations.starlette` and `aioidempotency.integrations.aiohttp`
import their framework and are only importable when it is installed.
"""

from aioidempotency.integrations._http import (
    DEFAULT_SCOPE_HEADERS,
    NOT_STORED_HEADER,
    REPLAYED_HEADER,
    HttpIdempotency,
    HttpIdempotencyOptions,
    IdempotencyStoredReplyError,
    Reply,
    credential_scope,
)

__all__ = [
    "DEFAULT_SCOPE_HEADERS",
    "NOT_STORED_HEADER",
    "REPLAYED_HEADER",
    "HttpIdempotency",
    "HttpIdempotencyOptions",
    "IdempotencyStoredReplyError",
    "Reply",
    "credential_scope",
]
