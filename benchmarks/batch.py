"""Records per second of an idempotent SQS batch: aioidempotency vs Powertools.

``python -m benchmarks.batch [--batches N] [--work-ms MS]``

One valkey-server (child process) serves both sides. Each batch is 100 new SQS
records (fresh message ids, so every record claims and completes its key):

- aioidempotency: `process_batch_sync` (the classic-handler entry point, on the loop
  `lambda_handler` uses) with glide, concurrency 10, an ``async def`` record handler;
  the same with ``claim_ahead=0`` (a record claims only once a handler slot is free,
  the behaviour before claims ran ahead); and with a plain ``def`` record handler
  (worker threads).
- Powertools: `BatchProcessor` + `process_partial_response`, the record handler
  wrapped in `idempotent_function` on `RedisCachePersistenceLayer` (redis-py, sync).

``--work-ms`` adds that much I/O wait per record (asyncio.sleep / time.sleep): the
records' own work, which a concurrent batch overlaps. The ratio that must hold
(>= 3x) is at 0 ms: idempotency overhead alone. Targets take turns, a few batches each
(`--rounds`, the order reversed every other round), and the medians are over all
their batches.

``python -m benchmarks.run`` measures the same batches as cases of its ``batch`` group
(`batch_target`: one call is one batch; interleaved rounds, medians), with the store
requests counted; this script stays as the quick stand-alone comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.counting import RequestCounter
from benchmarks.servers import running_valkey
from benchmarks.targets import Target

BATCH_SIZE = 100
CONCURRENCY = 10
FLOOR = 3.0


class Context:
    """A Lambda context with 30 s left: both sides bound their claims by it."""

    function_name = "bench"
    aws_request_id = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


CONTEXT: Any = Context()  # duck-typed: Powertools annotates its own LambdaContext


def sqs_event(prefix: str | None = None) -> dict[str, Any]:
    """A batch of new SQS records, as Lambda delivers them; with `prefix`, the message
    ids (the records' keys) are ``prefix-0`` ... ``prefix-99``, else random."""
    arn = "arn:aws:sqs:eu-west-1:123456789012:orders"

    def message_id(n: int) -> str:
        return f"{prefix}-{n}" if prefix is not None else str(uuid.uuid4())

    return {
        "Records": [
            {
                "messageId": message_id(n),
                "receiptHandle": uuid.uuid4().hex,
                "body": json.dumps({"order_id": uuid.uuid4().hex, "amount": n}),
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": "eu-west-1",
            }
            for n in range(BATCH_SIZE)
        ]
    }


def ours(
    store: Any,
    work_ms: float,
    plain: bool,
    ran: RequestCounter | None = None,
    claim_ahead: int = 100,
) -> Callable[[dict[str, Any]], Any]:
    """A batch through `process_batch_sync` on `store`; `ran` counts the records run."""
    from aioidempotency import process_batch_sync

    async def handle_async(record: Any) -> dict[str, Any]:
        if ran is not None:
            ran.add()
        if work_ms:
            await asyncio.sleep(work_ms / 1000)
        return {"order_id": record.json()["order_id"]}

    def handle_plain(record: Any) -> dict[str, Any]:
        if ran is not None:
            ran.add()
        if work_ms:
            time.sleep(work_ms / 1000)
        return {"order_id": record.json()["order_id"]}

    handler = handle_plain if plain else handle_async

    def run(event: dict[str, Any]) -> Any:
        return process_batch_sync(
            event,
            handler,
            persistence_store=store,
            context=CONTEXT,
            concurrency=CONCURRENCY,
            key_prefix="bench-ours",
            claim_ahead=claim_ahead,
        )

    return run


def powertools(
    layer: Any, work_ms: float, ran: RequestCounter | None = None
) -> Callable[[dict[str, Any]], Any]:
    """A batch through Powertools' `BatchProcessor` with the record handler wrapped in
    `idempotent_function` on `layer` (a `RedisCachePersistenceLayer`); `ran` counts the
    records run."""
    from aws_lambda_powertools.utilities.batch import (
        BatchProcessor,
        EventType,
        process_partial_response,
    )
    from aws_lambda_powertools.utilities.idempotency import (
        IdempotencyConfig,
        idempotent_function,
    )

    processor = BatchProcessor(event_type=EventType.SQS)
    config = IdempotencyConfig(event_key_jmespath="messageId")

    @idempotent_function(  # type: ignore[untyped-decorator]
        data_keyword_argument="record", persistence_store=layer, config=config
    )
    def charge(record: dict[str, Any]) -> dict[str, Any]:
        if ran is not None:
            ran.add()
        if work_ms:
            time.sleep(work_ms / 1000)
        return {"order_id": json.loads(record["body"])["order_id"]}

    def record_handler(record: Any) -> dict[str, Any]:
        return charge(record=record.raw_event)  # type: ignore[no-any-return]

    def run(event: dict[str, Any]) -> Any:
        config.register_lambda_context(CONTEXT)
        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=CONTEXT
        )

    return run


def batch_target(
    run: Callable[[dict[str, Any]], Any], ran: RequestCounter, requests: Callable[[], int]
) -> Target:
    """One call = one batch of `BATCH_SIZE` records keyed by the call's key (`run` from
    `ours` or `powertools`, counting its records in `ran`). A batch counts as executed
    when every record ran, as replayed when none did; anything else (a failed record, a
    partly run batch) raises, and the runner counts an error."""
    executed = RequestCounter()

    def call(key: str) -> None:
        before = ran.value
        response = run(sqs_event(key))
        if response != {"batchItemFailures": []}:
            raise RuntimeError(f"batch {key!r}: {response}")
        count = ran.value - before
        if count == BATCH_SIZE:
            executed.add()
        elif count:
            raise RuntimeError(f"batch {key!r}: {count} of {BATCH_SIZE} records ran")

    return Target(call, False, requests, executed)


def measure(
    targets: dict[str, Callable[[dict[str, Any]], Any]], batches: int, rounds: int
) -> dict[str, tuple[list[float], float]]:
    """Per target: records per second of each batch, and the process's CPU time per
    record (all its threads) in microseconds. Each target runs one warm-up batch, then
    the targets take `rounds` turns of about `batches` / `rounds` batches each."""
    for name, run in targets.items():
        response = run(sqs_event())
        assert response == {"batchItemFailures": []}, (name, response)
    rates: dict[str, list[float]] = {name: [] for name in targets}
    cpu = dict.fromkeys(targets, 0.0)
    per_round = max(1, -(-batches // rounds))
    names = list(targets)
    for turn in range(rounds):
        for name in names if turn % 2 == 0 else names[::-1]:
            for _ in range(per_round):
                event = sqs_event()
                start, cpu_start = time.perf_counter(), time.process_time()
                response = targets[name](event)
                elapsed = time.perf_counter() - start
                cpu[name] += time.process_time() - cpu_start
                assert response == {"batchItemFailures": []}, (name, response)
                rates[name].append(BATCH_SIZE / elapsed)
    return {
        name: (rates[name], cpu[name] / (len(rates[name]) * BATCH_SIZE) * 1e6) for name in targets
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--work-ms", type=float, nargs="*", default=[0.0, 1.0, 5.0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
        RedisCachePersistenceLayer,
    )

    from aioidempotency import store_from_url
    from aioidempotency.aws_lambda import handler_loop

    failed = False
    with running_valkey() as server:
        print(f"valkey {server.version}")
        print(f"{BATCH_SIZE} SQS records per batch, {args.batches} batches")
        print(
            f"{'work/record':>11} {'target':<50} {'records/s (median)':>19} "
            f"{'ratio':>6} {'CPU us/record':>14}"
        )
        for work_ms in args.work_ms:
            stores = [store_from_url(f"{server.url}?client=glide&timeout=5") for _ in range(3)]
            results = measure(
                {
                    f"aioidempotency process_batch, async def, c={CONCURRENCY}": ours(
                        stores[0], work_ms, plain=False
                    ),
                    f"  the same, claim_ahead=0, c={CONCURRENCY}": ours(
                        stores[1], work_ms, plain=False, claim_ahead=0
                    ),
                    f"aioidempotency process_batch, plain def, c={CONCURRENCY}": ours(
                        stores[2], work_ms, plain=True
                    ),
                    "Powertools BatchProcessor + idempotent_function": powertools(
                        RedisCachePersistenceLayer(url=server.url), work_ms
                    ),
                },
                args.batches,
                args.rounds,
            )
            for store in stores:
                handler_loop.run(store.aclose())
            baseline = statistics.median(
                results["Powertools BatchProcessor + idempotent_function"][0]
            )
            for name, (rates, cpu) in results.items():
                rate = statistics.median(rates)
                print(
                    f"{work_ms:>9g}ms {name:<50} {rate:>19,.0f} "
                    f"{rate / baseline:>5.2f}x {cpu:>14,.0f}"
                )
            ratio = statistics.median(next(iter(results.values()))[0]) / baseline
            if work_ms == 0 and ratio < FLOOR:
                print(f"FLOOR MISSED: {ratio:.2f}x < {FLOOR}x at 0 ms of work per record")
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
