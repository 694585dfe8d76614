"""``python -m aioidempotency``: demo, key, get and delete."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from aioidempotency._calls import idempotency_key
from aioidempotency._config import IdempotencyConfig
from aioidempotency._demo import run_demo
from aioidempotency._encoding import dumps_key_data
from aioidempotency._keys import (
    function_key_prefix,
    hash_data,
    is_missing_idempotency_key,
    prepare_payload,
    select_key_data,
    select_validation_data,
)
from aioidempotency._records import DataRecord
from aioidempotency._urls import store_from_url
from aioidempotency.exceptions import IdempotencyError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aioidempotency",
        description="Idempotency for asyncio: demo, key debugging and record inspection.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="a payment API under a retry storm")
    demo.add_argument("--store", default="memory://", help="store URL (default: memory://)")
    demo.add_argument("-n", "--payments", type=int, default=1000, help="unique payments (N)")
    demo.add_argument("-k", "--copies", type=int, default=5, help="times each is sent (K)")
    demo.add_argument("-c", "--concurrency", type=int, default=100, help="requests in flight")
    demo.add_argument(
        "--work-ms", type=float, default=2.0, help="simulated payment provider latency (ms)"
    )
    demo.add_argument(
        "--wait", type=float, default=0.0, help="seconds a duplicate waits for a result"
    )
    demo.add_argument("--seed", type=int, default=None, help="shuffle seed")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    key = commands.add_parser("key", help="print the idempotency key of a payload")
    key.add_argument("payload", help="JSON payload file ('-' for standard input)")
    key.add_argument("--jmespath", default="", help="event_key_jmespath")
    key.add_argument("--validation", default="", help="payload_validation_jmespath")
    key.add_argument("--hash", default="md5", help="hash function (default md5)")
    prefix = key.add_mutually_exclusive_group()
    prefix.add_argument("--prefix", default=None, help="key prefix, as key_prefix=")
    prefix.add_argument(
        "--function",
        default=None,
        help="module.qualname of the decorated function, to derive the prefix as Powertools "
        "does (with AWS_LAMBDA_FUNCTION_NAME, default 'test-func')",
    )

    for name, text in (("get", "show the record under KEY"), ("delete", "delete KEY")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--store", required=True, help="store URL")
        sub.add_argument("key", help="the idempotency key")
    return parser


def _read_payload(path: str) -> Any:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    return json.loads(text)


def _key_command(args: argparse.Namespace) -> int:
    config = IdempotencyConfig(
        event_key_jmespath=args.jmespath,
        payload_validation_jmespath=args.validation,
        hash_function=args.hash,
    )
    data = prepare_payload(_read_payload(args.payload))
    selected = select_key_data(data, config)
    if args.prefix is not None:
        prefix = args.prefix
    else:
        prefix = function_key_prefix(args.function or "<module>.<function>")
    print(f"selected:   {json.dumps(selected)}")
    if is_missing_idempotency_key(selected):
        print("key:        none (the selection is empty: the call would run without persistence)")
        return 1
    print(f"serialised: {dumps_key_data(selected)}")
    print(f"key:        {idempotency_key(prefix, data, config)}")
    if config.payload_validation_enabled:
        validation = select_validation_data(data, config)
        print(f"validation: {hash_data(validation, args.hash)}  (of {dumps_key_data(validation)})")
    return 0


def _describe(record: DataRecord) -> dict[str, Any]:
    def when(seconds: float) -> str:
        return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).isoformat()

    shown: dict[str, Any] = {
        "key": record.idempotency_key,
        "status": record.status.value,
        "expiration": record.expiry_timestamp,
        "expires_at": when(record.expiry_timestamp),
    }
    if record.in_progress_expiry_timestamp is not None:
        shown["in_progress_expiration"] = record.in_progress_expiry_timestamp
        shown["in_progress_expires_at"] = when(record.in_progress_expiry_timestamp / 1000)
    if record.payload_hash is not None:
        shown["validation"] = record.payload_hash
    if record.owner is not None:
        shown["owner_token"] = record.owner
    if record.response_data is not None:
        shown["data"] = record.response_data
    return shown


async def _record_command(args: argparse.Namespace) -> int:
    async with store_from_url(args.store) as store:
        if args.command == "get":
            record = await store.get(args.key)
            if record is None:
                print(f"no record under {args.key!r}", file=sys.stderr)
                return 1
            print(json.dumps(_describe(record), indent=2))
            return 0
        deleted = await store.delete(args.key)
        print(f"deleted {args.key!r}" if deleted else f"no record under {args.key!r}")
        return 0 if deleted else 1


def _progress_bar(total: int, enabled: bool) -> tuple[Callable[[int], None] | None, Any]:
    if not enabled:
        return None, None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is optional: pip install "aioidempotency[cli]"
        return None, None
    bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
    return bar.update, bar


async def _demo_command(args: argparse.Namespace) -> int:
    async with store_from_url(args.store) as store:
        on_progress, bar = _progress_bar(
            args.payments * args.copies, not args.no_progress and sys.stderr.isatty()
        )
        try:
            report = await run_demo(
                store,
                payments=args.payments,
                copies=args.copies,
                concurrency=args.concurrency,
                work_seconds=args.work_ms / 1000,
                wait_seconds=args.wait,
                store_name=args.store,
                seed=args.seed,
                on_progress=on_progress,
            )
        finally:
            if bar is not None:
                bar.close()
    print(report.table())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "key":
            return _key_command(args)
        if args.command == "demo":
            return asyncio.run(_demo_command(args))
        return asyncio.run(_record_command(args))
    except (IdempotencyError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
