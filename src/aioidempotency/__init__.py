"""aioidempotency: asyncio-native idempotency for Python.

A call is keyed by a hash of (part of) its payload; the first call claims the key,
runs and stores its result; repeats within the expiry window get the stored result
back without running. Keys, records and knobs are those of Powertools for AWS Lambda
(Python), so a team can switch without losing the records in its table.
"""

from aioidempotency._async.decorators import idempotent_async, idempotent_function_async
from aioidempotency._async.engine import IdempotencyDisabledWarning, IdempotencyEngine
from aioidempotency._config import IdempotencyConfig, IdempotentHookFunction
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._sync.decorators import idempotent, idempotent_function
from aioidempotency._sync.engine import SyncIdempotencyEngine
from aioidempotency.aws_lambda import lambda_handler
from aioidempotency.batch import process_batch, process_batch_sync
from aioidempotency.events import (
    CallOutcome,
    EventKind,
    EventListener,
    IdempotencyEvent,
    listen,
)
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
    IdempotencyPersistenceAccessDeniedError,
    IdempotencyPersistenceConfigError,
    IdempotencyPersistenceConnectionError,
    IdempotencyPersistenceConsistencyError,
    IdempotencyPersistenceLayerError,
    IdempotencyPersistenceMisconfiguredError,
    IdempotencyResultTooLargeError,
    IdempotencySerializationError,
    IdempotencyStoreCheckError,
    IdempotencyValidationError,
)
from aioidempotency.persistence import (
    CacheClient,
    CachePersistenceLayer,
    ClaimResult,
    DynamoDBPersistenceLayer,
    InMemoryPersistenceLayer,
    PersistenceLayer,
    RedisCachePersistenceLayer,
    StoreCheckReport,
    StoreProblem,
    SyncCachePersistenceLayer,
    SyncDynamoDBPersistenceLayer,
    SyncInMemoryPersistenceLayer,
    SyncPersistenceLayer,
    store_from_url,
)
from aioidempotency.serialization import (
    BaseIdempotencyModelSerializer,
    BaseIdempotencySerializer,
    CustomDictSerializer,
    DataclassSerializer,
    NoOpSerializer,
    PydanticSerializer,
)

__version__ = "0.1.0"
"""The package version: the only place it is written (pyproject.toml reads it)."""

__all__ = [
    "__version__",
    # making calls idempotent
    "IdempotencyConfig",
    "IdempotencyEngine",
    "IdempotentHookFunction",
    "SyncIdempotencyEngine",
    "idempotent",
    "idempotent_async",
    "idempotent_function",
    "idempotent_function_async",
    "lambda_handler",
    "process_batch",
    "process_batch_sync",
    # stores
    "CachePersistenceLayer",
    "DynamoDBPersistenceLayer",
    "InMemoryPersistenceLayer",
    "RedisCachePersistenceLayer",
    "SyncCachePersistenceLayer",
    "SyncDynamoDBPersistenceLayer",
    "SyncInMemoryPersistenceLayer",
    "store_from_url",
    # checking a store
    "StoreCheckReport",
    "StoreProblem",
    # writing a store
    "CacheClient",
    "ClaimResult",
    "DataRecord",
    "PersistenceLayer",
    "RecordStatus",
    "SyncPersistenceLayer",
    # seeing what happened (see also aioidempotency.events)
    "CallOutcome",
    "EventKind",
    "EventListener",
    "IdempotencyEvent",
    "listen",
    # results that are not plain JSON
    "BaseIdempotencyModelSerializer",
    "BaseIdempotencySerializer",
    "CustomDictSerializer",
    "DataclassSerializer",
    "NoOpSerializer",
    "PydanticSerializer",
    # errors and warnings
    "IdempotencyAlreadyInProgressError",
    "IdempotencyClaimLostError",
    "IdempotencyCompletionError",
    "IdempotencyDisabledWarning",
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
    "IdempotencyPersistenceAccessDeniedError",
    "IdempotencyPersistenceConfigError",
    "IdempotencyPersistenceConnectionError",
    "IdempotencyPersistenceConsistencyError",
    "IdempotencyPersistenceLayerError",
    "IdempotencyPersistenceMisconfiguredError",
    "IdempotencyResultTooLargeError",
    "IdempotencySerializationError",
    "IdempotencyStoreCheckError",
    "IdempotencyValidationError",
]
