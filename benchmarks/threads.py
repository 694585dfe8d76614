"""16 threads of first executions through the sync decorator: aioidempotency vs Powertools.

``python -m benchmarks.threads [--calls N] [--rounds R] [--threads T]``

One valkey-server (child process) serves three targets, each a sync
``idempotent_function`` keyed on a fresh id per call, called from `--threads` threads:

- aioidempotency: `store_from_url("redis://...")` (redis-py, the atomic path);
- Powertools: its `CachePersistenceLayer(url=...)` (redis-py);
- the floor: the raw redis-py client sending two bare ``SET``s per call (a claim and a
  completion, with nothing else).

The targets take turns for `--rounds` rounds (the order reversed every other round),
`--calls` calls each per round. It prints each target's median rate with every round,
the ratio of the medians, and the per-round ratios of ours to Powertools with their
median. `benchmarks.run` has the same case at 3 rounds inside the full run; this
script measures that one floor with more rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import redis

from benchmarks.servers import running_valkey

Target = Callable[..., Any]


def ours(url: str) -> Target:
    """aioidempotency's sync decorator on a store built from the URL."""
    from aioidempotency import IdempotencyConfig, idempotent_function
    from aioidempotency.persistence import store_from_url

    @idempotent_function(
        data_keyword_argument="order",
        persistence_store=store_from_url(url),
        config=IdempotencyConfig(event_key_jmespath="id"),
    )
    def charge(order: dict[str, str]) -> dict[str, str]:
        return {"charged": order["id"]}

    return charge


def powertools(url: str) -> Target:
    """Powertools' sync decorator on its cache layer built from the URL."""
    from aws_lambda_powertools.utilities.idempotency import (
        IdempotencyConfig,
        idempotent_function,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.cache import (
        CachePersistenceLayer,
    )

    @idempotent_function(  # type: ignore[untyped-decorator]
        data_keyword_argument="order",
        persistence_store=CachePersistenceLayer(url=url),
        config=IdempotencyConfig(event_key_jmespath="id"),
    )
    def charge(order: dict[str, str]) -> dict[str, str]:
        return {"charged": order["id"]}

    return charge  # type: ignore[no-any-return]


def floor(url: str) -> Target:
    """Two bare SETs per call on the raw client: what the two writes cost alone."""
    client = redis.Redis.from_url(url)
    claimed, completed = "x" * 100, "y" * 100

    def charge(order: dict[str, str]) -> None:
        client.set("floor#" + order["id"], claimed, ex=3600)
        client.set("floor#" + order["id"], completed, ex=3600)

    return charge


def measure(target: Target, calls: int, threads: int) -> tuple[float, float]:
    """Calls per second, and process CPU per call (us), of `calls` new keys."""
    keys = [str(uuid.uuid4()) for _ in range(calls)]

    def work(part: list[str]) -> None:
        for key in part:
            target(order={"id": key})

    workers = [threading.Thread(target=work, args=(keys[i::threads],)) for i in range(threads)]
    start, cpu = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return calls / elapsed, cpu / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # Powertools warns of a missing Lambda context
    with running_valkey() as server:
        targets = {
            "aioidempotency": ours(server.url),
            "powertools": powertools(server.url),
            "floor": floor(server.url),
        }
        for target in targets.values():  # connections open, scripts loaded
            for _ in range(50):
                target(order={"id": str(uuid.uuid4())})
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        names = list(targets)
        for turn in range(args.rounds):
            for name in names if turn % 2 == 0 else names[::-1]:
                results[name].append(measure(targets[name], args.calls, args.threads))
    print(f"{args.threads} threads, {args.calls} first executions per round, {args.rounds} rounds")
    medians = {}
    for name, rows in results.items():
        medians[name] = statistics.median(rate for rate, _ in rows)
        rounds = " / ".join(f"{rate:,.0f}" for rate, _ in rows)
        cpu = statistics.median(cpu for _, cpu in rows)
        print(f"{name:>15} {medians[name]:>8,.0f} calls/s  CPU {cpu:,.0f} us/call", end="")
        print(f"  rounds: {rounds}")
    per_round = [
        o[0] / p[0] for o, p in zip(results["aioidempotency"], results["powertools"], strict=True)
    ]
    print(f"ours / Powertools: {medians['aioidempotency'] / medians['powertools']:.2f}x")
    print(
        "per round: "
        + " / ".join(f"{ratio:.2f}" for ratio in per_round)
        + f" (median {statistics.median(per_round):.2f}x)"
    )
    print(
        f"against the floor: ours {medians['aioidempotency'] / medians['floor']:.2f}, "
        f"Powertools {medians['powertools'] / medians['floor']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
