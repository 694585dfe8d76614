"""aioidempotency: asyncio-native idempotency for Python.

A call is keyed by a hash of (part of) its payload; the first call claims the key,
runs and stores its result; repeats within the expiry window get the stored result
back without running. Keys, records and knobs are those of Powertools for AWS Lambda
(Python), so a team can switch without losing the records in its table.
"""

from typing import TYPE_CHECKING, Any

from aioidempotency.aws_lambda import lambda_handler
from aioidempotency.batch import process_batch, process_batch_sync
from aioidempotency.config import IdempotencyConfig
from aioidempotency.decorators import idempotent_async, idempotent_function_async
from aioidempotency.engine import IdempotencyDisabledWarning, IdempotencyEngine
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyCompletionError,
    IdempotencyError,
    IdempotencyInconsistentStateError,
    IdempotencyInvalidRecordError,
    IdempotencyInvalidStatusError,
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyKeyError,
    IdempotencyModelTypeError,
    IdempotencyNoSerializationModelError,
    IdempotencyPayloadError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceConsistencyError,
    IdempotencyPersistenceLayerError,
    IdempotencyResultTooLargeError,
    IdempotencySerializationError,
    IdempotencyValidationError,
)
from aioidempotency.persistence import (
    CacheClient,
    CachePersistenceLayer,
    ClaimResult,
    InMemoryPersistenceLayer,
    PersistenceLayer,
    store_from_url,
)
from aioidempotency.records import DataRecord, RecordStatus
from aioidempotency.serialization import (
    BaseIdempotencyModelSerializer,
    BaseIdempotencySerializer,
    CustomDictSerializer,
    DataclassSerializer,
    NoOpSerializer,
    PydanticSerializer,
)
from aioidempotency.sync import idempotent, idempotent_function

if TYPE_CHECKING:
    from aioidempotency.persistence.dynamodb import DynamoDBPersistenceLayer

__version__ = "0.1.0"

__all__ = [
    "BaseIdempotencyModelSerializer",
    "BaseIdempotencySerializer",
    "CacheClient",
    "CachePersistenceLayer",
    "ClaimResult",
    "CustomDictSerializer",
    "DataRecord",
    "DataclassSerializer",
    "DynamoDBPersistenceLayer",
    "IdempotencyAlreadyInProgressError",
    "IdempotencyClaimLostError",
    "IdempotencyCompletionError",
    "IdempotencyConfig",
    "IdempotencyDisabledWarning",
    "IdempotencyEngine",
    "IdempotencyError",
    "IdempotencyInconsistentStateError",
    "IdempotencyInvalidRecordError",
    "IdempotencyInvalidStatusError",
    "IdempotencyItemAlreadyExistsError",
    "IdempotencyItemNotFoundError",
    "IdempotencyKeyError",
    "IdempotencyModelTypeError",
    "IdempotencyNoSerializationModelError",
    "IdempotencyPayloadError",
    "IdempotencyPersistenceConfigError",
    "IdempotencyPersistenceConnectionError",
    "IdempotencyPersistenceConsistencyError",
    "IdempotencyPersistenceLayerError",
    "IdempotencyResultTooLargeError",
    "IdempotencySerializationError",
    "IdempotencyValidationError",
    "InMemoryPersistenceLayer",
    "NoOpSerializer",
    "PersistenceLayer",
    "PydanticSerializer",
    "RecordStatus",
    "__version__",
    "idempotent",
    "idempotent_async",
    "idempotent_function",
    "idempotent_function_async",
    "lambda_handler",
    "process_batch",
    "process_batch_sync",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    # The DynamoDB store needs the optional aioboto3 extra: import it on first use.
    if name == "DynamoDBPersistenceLayer":
        from aioidempotency.persistence.dynamodb import DynamoDBPersistenceLayer

        return DynamoDBPersistenceLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
