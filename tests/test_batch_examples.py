"""The Lambda examples run as deployed: imported once, called synchronously."""

from __future__ import annotations

import importlib.util
import json
import types
import uuid
from pathlib import Path

import pytest

from aioidempotency import InMemoryPersistenceLayer, RecordStatus
from aioidempotency.aws_lambda import handler_loop
from tests.aws_helpers import FakeLambdaContext
from tests.batch_events import batch, failed_ids, sqs_record

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def completed_records(store: InMemoryPersistenceLayer) -> int:
    """How many completed records the example's in-memory store holds."""
    return sum(r.status is RecordStatus.COMPLETED for r in store.table._records.values())


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.setenv("IDEMPOTENCY_STORE_URL", "memory://")
    module_name = f"{name}_{uuid.uuid4().hex[:6]}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lambda_payments_example(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load("lambda_payments", monkeypatch)
    event = {"body": json.dumps({"payment_id": "p-1", "amount": 10})}
    first = app.handler(event, FakeLambdaContext())
    assert json.loads(json.dumps(first)) == app.handler(event, FakeLambdaContext())
    assert json.loads(first["body"]) == {"payment_id": "p-1", "status": "captured"}
    assert completed_records(app.store) == 1
    handler_loop.run(app.store.aclose())


def test_sqs_orders_example(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load("sqs_orders", monkeypatch)
    same = [sqs_record({"order_id": "o-1", "items": ["a", "b"]}) for _ in range(2)]
    changed = sqs_record({"order_id": "o-1", "items": ["c"]})
    response = app.handler(batch([same[0]]), FakeLambdaContext())
    assert response == {"batchItemFailures": []}
    response = app.handler(batch([same[1], changed]), FakeLambdaContext())
    # the copy replays; the message whose items differ fails validation
    assert failed_ids(json.loads(json.dumps(response))) == [changed["messageId"]]
    assert completed_records(app.store) == 1
    handler_loop.run(app.store.aclose())
