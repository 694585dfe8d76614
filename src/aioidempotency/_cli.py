"""``python -m aioidempotency``: demo, key, check, get and delete.

A user's mistake (a file that is not JSON, an unknown hash, a bad option or store URL,
a store that refuses the credentials) ends with one ``error:`` line and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jmespath
import jmespath.exceptions

from aioidempotency._calls import idempotency_key
from aioidempotency._config import IdempotencyConfig, usable_hash_functions
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
from aioidempotency._records import DataRecord, RecordStatus
from aioidempotency._urls import redacted, store_from_url
from aioidempotency.exceptions import (
    IdempotencyError,
    IdempotencyInvalidRecordError,
    IdempotencyInvalidStatusError,
)

__all__ = ["main", "usable_hash_functions"]


class UsageError(Exception):
    """A mistake in what the user asked for: printed as ``error: ...``, exit status 2."""


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aioidempotency",
        description="Idempotency for asyncio: demo, key debugging, store checks and record "
        "inspection.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="a payment API under a retry storm; prints calls by outcome and store round-trip "
        "latencies from the engine's events",
    )
    demo.add_argument(
        "--store",
        default="memory://",
        help="store URL (default: memory://); the demo writes under a key prefix of its own, "
        "demo.payments.<run id>, and deletes its records at the end",
    )
    demo.add_argument(
        "-n", "--payments", type=_at_least(1), default=1000, help="unique payments (N)"
    )
    demo.add_argument("-k", "--copies", type=_at_least(1), default=5, help="times each is sent")
    demo.add_argument(
        "-c", "--concurrency", type=_at_least(1), default=100, help="requests in flight"
    )
    demo.add_argument(
        "--work-ms", type=_seconds, default=2.0, help="simulated payment provider latency (ms)"
    )
    demo.add_argument(
        "--wait", type=_seconds, default=0.0, help="seconds a duplicate waits for a result"
    )
    demo.add_argument("--seed", type=int, default=None, help="shuffle seed")
    demo.add_argument(
        "--keep", action="store_true", help="keep the demo's records (they expire in an hour)"
    )
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

    check = commands.add_parser(
        "check",
        help="check that a store can work: connection, credentials, permissions, server "
        "version and mode, table key schema and TTL",
    )
    check.add_argument("--store", required=True, help="store URL")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument(
        "--no-probe",
        action="store_true",
        help="only read (do not write and delete a probe record)",
    )

    get = commands.add_parser("get", help="show the record under KEY")
    get.add_argument("--store", required=True, help="store URL")
    get.add_argument("--json", action="store_true", help="print the record as JSON")
    get.add_argument("key", help="the idempotency key")

    delete = commands.add_parser("delete", help="delete the record under KEY")
    delete.add_argument("--store", required=True, help="store URL")
    delete.add_argument(
        "--yes", "-y", action="store_true", help="delete a COMPLETED record without asking"
    )
    delete.add_argument("key", help="the idempotency key")
    return parser


# -- key -------------------------------------------------------------------------------------


def _read_payload(path: str) -> Any:
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{name} is not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{name} is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


def _key_command(args: argparse.Namespace) -> int:
    usable = usable_hash_functions()
    if args.hash not in usable:
        raise UsageError(
            f"--hash {args.hash!r} is not a hash function this Python can use; choose one "
            f"of: {', '.join(usable)}"
        )
    for option, expression in (("--jmespath", args.jmespath), ("--validation", args.validation)):
        if expression:
            try:
                jmespath.compile(expression)
            except jmespath.exceptions.JMESPathError as exc:
                reason = " ".join(str(exc).split())
                raise UsageError(
                    f"{option} {expression!r} is not a JMESPath expression: {reason}"
                ) from None
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


# -- get and delete ----------------------------------------------------------------------------


def _describe(record: DataRecord) -> dict[str, Any]:
    """The record as plain data (what ``get --json`` prints)."""

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


def _duration(seconds: float) -> str:
    """``3 h 2 min``, ``5 min 7 s``, ``12 s``: two units at most."""
    seconds = round(abs(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
    return " ".join(parts[:2])


def _moment(epoch: float, now: float) -> str:
    at = dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    left = epoch - now
    return f"{at} (in {_duration(left)})" if left >= 0 else f"{at} ({_duration(left)} ago)"


def _human(record: DataRecord, now: float) -> str:
    """The record in human terms (what ``get`` prints)."""
    rows = [
        ("key", record.idempotency_key),
        ("status", record.status.value),
        ("expires", _moment(record.expiry_timestamp, now)),
    ]
    lease = record.in_progress_expiry_timestamp
    if record.status is RecordStatus.INPROGRESS:
        if lease is None:
            rows.append(("in progress until", "the record expires (no lease)"))
        elif lease / 1000 >= now:
            rows.append(("in progress until", _moment(lease / 1000, now)))
        else:
            rows.append(
                (
                    "in progress until",
                    f"{_moment(lease / 1000, now)}: orphaned, the next call takes it over",
                )
            )
    rows.append(("owner", record.owner or "none"))
    rows.append(("validation", record.payload_hash or "none (no payload validation)"))
    if record.response_data is None:
        rows.append(("data", "none"))
    else:
        size = len(record.response_data.encode())
        rows.append(("data", f"{size} byte{'s' if size != 1 else ''} of JSON"))
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in rows)


async def _get_command(args: argparse.Namespace) -> int:
    async with store_from_url(args.store) as store:
        record = await store.get(args.key)
    if record is None:
        print(f"no record under {args.key!r}", file=sys.stderr)
        return 1
    print(json.dumps(_describe(record), indent=2) if args.json else _human(record, time.time()))
    return 0


def _confirmed(key: str) -> bool:
    """Ask on the terminal whether to delete the completed record under `key`."""
    question = (
        f"{key!r} holds a COMPLETED record: deleting it lets the next call with this key "
        "run again. Delete it? [y/N] "
    )
    try:
        answer = input(question)
    except EOFError:
        return False
    return answer.strip().lower() in {"y", "yes"}


async def _delete_command(args: argparse.Namespace) -> int:
    async with store_from_url(args.store) as store:
        if not args.yes:
            try:
                record = await store.get(args.key)
            except (IdempotencyInvalidRecordError, IdempotencyInvalidStatusError):
                record = None  # not a usable record: freeing the key is what delete is for
            if record is not None and record.status is RecordStatus.COMPLETED:
                if not sys.stdin.isatty():
                    print(
                        f"error: {args.key!r} holds a COMPLETED record (a stored result): "
                        "deleting it lets the next call with this key run again; pass --yes "
                        "to delete it",
                        file=sys.stderr,
                    )
                    return 1
                if not _confirmed(args.key):
                    print(f"not deleted: {args.key!r}")
                    return 1
        deleted = await store.delete(args.key)
    print(f"deleted {args.key!r}" if deleted else f"no record under {args.key!r}")
    return 0 if deleted else 1


# -- check and demo ----------------------------------------------------------------------------


async def _check_command(args: argparse.Namespace) -> int:
    async with store_from_url(args.store) as store:
        report = await store.check(probe=not args.no_probe)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1


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
                store_name=redacted(args.store),
                seed=args.seed,
                keep=args.keep,
                on_progress=on_progress,
            )
        finally:
            if bar is not None:
                bar.close()
    print(report.table())
    return 0 if report.ok else 1


_COMMANDS = {
    "demo": _demo_command,
    "check": _check_command,
    "get": _get_command,
    "delete": _delete_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a usage or store error)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "key":
            return _key_command(args)
        return asyncio.run(_COMMANDS[args.command](args))
    except (UsageError, IdempotencyError, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
