"""``python -m aioidempotency`` as an operator uses it: a mistake ends with one
``error:`` line naming what is wrong (the file and position, the option, the valid
hashes), never a traceback; ``check`` prints the store's problems and exits 1 when
there are any; ``get`` shows a record in human terms (or ``--json``); ``delete`` asks
before deleting a completed record unless ``--yes``. Run in subprocesses, against a
real Redis server where a store is needed."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from aioidempotency._async.cache import CachePersistenceLayer
from aioidempotency._cli import _duration, main, usable_hash_functions
from aioidempotency._records import DataRecord, RecordStatus
from tests.servers.redis import ServerPool

BOUND = 120


def cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``python -m aioidempotency ARGV`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "aioidempotency", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
    )


def error_of(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a run that failed on a user's mistake."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    return lines[-1]


# -- mistakes ----------------------------------------------------------------------------------


def test_a_file_that_is_not_json_names_the_file_and_the_position(tmp_path: Path) -> None:
    path = tmp_path / "event.json"
    path.write_text('{"id": 1,\n  "amount": }\n')
    assert error_of(cli("key", str(path))) == (
        f"error: {path} is not JSON: Expecting value at line 2, column 13"
    )
    assert error_of(cli("key", "-", stdin="{nope")) == (
        "error: standard input is not JSON: Expecting property name enclosed in double quotes "
        "at line 1, column 2"
    )


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    assert error_of(cli("key", str(path))) == (
        f"error: cannot read {path}: No such file or directory"
    )


def test_an_unusable_hash_names_the_usable_ones(tmp_path: Path) -> None:
    path = tmp_path / "event.json"
    path.write_text('{"id": 1}')
    usable = usable_hash_functions()
    assert "shake_128" not in usable  # needs a digest length: hexdigest() fails
    assert {"md5", "sha256"} <= set(usable)
    for name in ("shake_128", "whirlpool-9000"):
        assert error_of(cli("key", str(path), "--hash", name)) == (
            f"error: --hash {name!r} is not a hash function this Python can use; choose one "
            f"of: {', '.join(usable)}"
        )


def test_a_bad_jmespath_names_its_option(tmp_path: Path) -> None:
    path = tmp_path / "event.json"
    path.write_text('{"id": 1}')
    assert error_of(cli("key", str(path), "--validation", "body.[")).startswith(
        "error: --validation 'body.[' is not a JMESPath expression: "
    )
    assert error_of(cli("key", str(path), "--jmespath", "[[")).startswith(
        "error: --jmespath '[[' is not a JMESPath expression: "
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "-n", "0"], "argument -n/--payments: must be at least 1: 0"),
        (["demo", "-c", "many"], "argument -c/--concurrency: not a whole number: 'many'"),
        (["demo", "--work-ms", "-2"], "argument --work-ms: must be 0 or more: -2"),
        (["demo", "--wait", "soon"], "argument --wait: not a number: 'soon'"),
    ],
)
def test_a_bad_option_value_names_the_option(argv: list[str], message: str) -> None:
    assert error_of(cli(*argv)).endswith(f"error: {message}")


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("redis://localhost?client=glide&max_connections=5", "option 'max_connections' is redis"),
        ("redis://localhost?timeout=never", "option timeout='never' is not a number"),
        ("dynamodb://table?colour=red", "unknown option 'colour'"),
        ("memory://?max_items=-1", "option max_items=-1 must be at least 1"),
    ],
)
def test_a_bad_store_url_names_the_option(store: str, message: str) -> None:
    assert error_of(cli("get", "--store", store, "k")).startswith(f"error: {message}")


def test_a_store_that_cannot_be_reached_is_an_error_line() -> None:
    line = error_of(cli("get", "--store", "redis://127.0.0.1:1?timeout=1", "k"))
    assert line.startswith("error: cache store unreachable or failing over during get of 'k'")


def test_durations_are_short() -> None:
    assert _duration(0) == "0 s"
    assert _duration(59.6) == "1 min"
    assert _duration(-3723) == "1 h 2 min"
    assert _duration(90061) == "1 d 1 h"


# -- a real store ------------------------------------------------------------------------------


@pytest.fixture
def redis_url(cache_servers: ServerPool) -> str:
    node = cache_servers.standalone("redis")
    return f"redis://{node.host}:{node.port}?timeout=5"


async def test_check_prints_the_report_and_exits_1_on_problems(
    cache_servers: ServerPool, redis_url: str
) -> None:
    healthy = await asyncio.to_thread(cli, "check", "--store", redis_url)
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.endswith("no problems found\n")
    assert "  server: Redis 7.0.15 (standalone)\n" in healthy.stdout

    node = cache_servers.standalone("redis")
    user = f"cli{uuid.uuid4().hex[:8]}"
    with node.admin() as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-evalsha")
    try:
        url = f"redis://{user}:pw@{node.host}:{node.port}?timeout=5"
        done = await asyncio.to_thread(cli, "check", "--store", url)
        as_json = await asyncio.to_thread(cli, "check", "--json", "--store", url)
    finally:
        with node.admin() as admin:
            admin.execute_command("ACL", "DELUSER", user)
    assert done.returncode == 1, done.stderr
    assert "1 problem(s):\n  1. [permission] " in done.stdout
    assert f"    fix: ACL SETUSER {user} +evalsha" in done.stdout
    assert "pw@" not in done.stdout
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 1
    assert report["ok"] is False
    assert [problem["kind"] for problem in report["problems"]] == ["permission"]
    assert report["facts"] == {"server": "Redis 7.0.15 (standalone)"}


async def test_check_without_probe_only_reads(redis_url: str) -> None:
    done = await asyncio.to_thread(cli, "check", "--no-probe", "--json", "--store", redis_url)
    assert done.returncode == 0, done.stderr
    assert "probe" not in json.loads(done.stdout)["facts"]


WHEN = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


def fields(text: str) -> dict[str, str]:
    """``name: value`` lines as a mapping, in order."""
    return {
        name.strip(): value.strip()
        for name, _, value in (line.partition(": ") for line in text.splitlines())
    }


def claim_of(key: str, now: int) -> DataRecord:
    return DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=now + 3600,
        in_progress_expiry_timestamp=(now + 90) * 1000,
        payload_hash="5d41402abc4b2a76b9719d911017c592",
        owner="owner-0123456789abcdef",
    )


async def test_get_shows_a_record_in_human_terms(redis_url: str) -> None:
    key = f"cli#{uuid.uuid4().hex}"
    now = int(time.time())
    async with CachePersistenceLayer.from_url(redis_url) as store:
        assert (await store.claim(claim_of(key, now), now=now)).claimed
        shown = await asyncio.to_thread(cli, "get", "--store", redis_url, key)
        assert shown.returncode == 0, shown.stderr
        lines = fields(shown.stdout)
        assert list(lines) == [
            "key",
            "status",
            "expires",
            "in progress until",
            "owner",
            "validation",
            "data",
        ]
        assert lines["key"] == key
        assert lines["status"] == "INPROGRESS"
        assert re.fullmatch(rf"{WHEN} \(in (1 h|59 min \d+ s)\)", lines["expires"])
        assert re.fullmatch(rf"{WHEN} \(in (1 min 30 s|1 min 2\d s)\)", lines["in progress until"])
        assert lines["owner"] == "owner-0123456789abcdef"
        assert lines["validation"] == "5d41402abc4b2a76b9719d911017c592"
        assert lines["data"] == "none"

        done = DataRecord(
            idempotency_key=key,
            status=RecordStatus.COMPLETED,
            expiry_timestamp=now + 3600,
            response_data=json.dumps({"paid": 12}),
        )
        await store.complete(done, owner="owner-0123456789abcdef")
        shown = await asyncio.to_thread(cli, "get", "--store", redis_url, key)
        lines = fields(shown.stdout)
        assert lines["status"] == "COMPLETED"
        assert "in progress until" not in lines
        assert lines["validation"] == "none (no payload validation)"
        assert lines["data"] == "12 bytes of JSON"
        as_json = await asyncio.to_thread(cli, "get", "--json", "--store", redis_url, key)
        assert json.loads(json.loads(as_json.stdout)["data"]) == {"paid": 12}
        await store.delete(key)


async def test_delete_asks_before_deleting_a_completed_record(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = f"cli#{uuid.uuid4().hex}"
    now = int(time.time())
    async with CachePersistenceLayer.from_url(redis_url) as store:
        assert (await store.claim(claim_of(key, now), now=now)).claimed
        done = DataRecord(
            idempotency_key=key, status=RecordStatus.COMPLETED, expiry_timestamp=now + 3600
        )
        await store.complete(done, owner="owner-0123456789abcdef")

        refused = await asyncio.to_thread(cli, "delete", "--store", redis_url, key)
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"error: {key!r} holds a COMPLETED record (a stored result): deleting it lets the "
            "next call with this key run again; pass --yes to delete it"
        )
        assert await store.get(key) is not None

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
        assert await asyncio.to_thread(main, ["delete", "--store", redis_url, key]) == 1
        out = capsys.readouterr().out
        assert out.startswith(f"{key!r} holds a COMPLETED record: deleting it lets the next")
        assert out.endswith(f"Delete it? [y/N] not deleted: {key!r}\n")
        assert await store.get(key) is not None

        monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
        assert await asyncio.to_thread(main, ["delete", "--store", redis_url, key]) == 0
        assert capsys.readouterr().out.endswith(f"deleted {key!r}\n")
        assert await store.get(key) is None

        assert (await store.claim(claim_of(key, now), now=now)).claimed
        await store.complete(done, owner="owner-0123456789abcdef")
        forced = await asyncio.to_thread(cli, "delete", "--yes", "--store", redis_url, key)
        assert forced.returncode == 0, forced.stderr
        assert forced.stdout.strip() == f"deleted {key!r}"


async def test_delete_frees_an_in_progress_or_unusable_record_without_asking(
    cache_servers: ServerPool, redis_url: str
) -> None:
    key = f"cli#{uuid.uuid4().hex}"
    now = int(time.time())
    async with CachePersistenceLayer.from_url(redis_url) as store:
        assert (await store.claim(claim_of(key, now), now=now)).claimed
        done = await asyncio.to_thread(cli, "delete", "--store", redis_url, key)
        assert done.returncode == 0, done.stderr
    node = cache_servers.standalone("redis")
    with node.admin() as admin:
        admin.set(key, "not a record")
        freed = await asyncio.to_thread(cli, "delete", "--store", redis_url, key)
        assert freed.returncode == 0, freed.stderr
        assert admin.get(key) is None
