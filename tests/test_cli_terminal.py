"""What the command line shows a person: ``get`` on a claim without a lease and on an
orphaned claim (on a real Redis server), and the demo's progress bar on a terminal."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import struct
import sys
import termios
import threading
import time
import uuid

import pytest

from aioidempotency import store_from_url
from aioidempotency._cli import main
from aioidempotency._records import DataRecord, RecordStatus
from tests.servers.redis import ServerPool


async def run_cli(*argv: str) -> int:
    return await asyncio.wait_for(asyncio.to_thread(main, list(argv)), 60)


@pytest.fixture
def redis_url(cache_servers: ServerPool) -> str:
    node = cache_servers.standalone("redis")
    return f"redis://{node.host}:{node.port}?timeout=5"


def shown_rows(out: str) -> dict[str, str]:
    return {
        name.strip(): value.strip()
        for name, _, value in (line.partition(":") for line in out.splitlines())
    }


async def test_get_shows_a_claim_without_a_lease_in_progress_until_it_expires(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = f"cli#{uuid.uuid4().hex}"
    now = int(time.time())
    record = DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=now + 600,
        owner="owner-1",
    )
    async with store_from_url(redis_url) as store:
        assert (await store.claim(record, now=now)).claimed
        capsys.readouterr()
        assert await run_cli("get", "--store", redis_url, key) == 0
        await store.delete(key)
    out = capsys.readouterr().out
    assert "in progress until: the record expires (no lease)" in out.replace("  ", " ")
    assert shown_rows(out)["status"] == "INPROGRESS"


async def test_get_shows_an_orphaned_claim(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = f"cli#{uuid.uuid4().hex}"
    now = int(time.time())
    record = DataRecord(
        idempotency_key=key,
        status=RecordStatus.INPROGRESS,
        expiry_timestamp=now + 600,
        in_progress_expiry_timestamp=(now - 125) * 1000,  # its owner stopped renewing
        owner="owner-2",
    )
    async with store_from_url(redis_url) as store:
        assert (await store.claim(record, now=now - 130)).claimed
        capsys.readouterr()
        assert await run_cli("get", "--store", redis_url, key) == 0
        await store.delete(key)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("in progress until")]
    assert len(line) == 1
    assert line[0].endswith(" ago): orphaned, the next call takes it over")
    # 125 s ago when the test read the clock, a few seconds more when the command did
    assert re.search(r"\(2 min [5-9] s ago\)", line[0]), line[0]


def test_the_demo_draws_a_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    master, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    terminal = os.fdopen(replica, "w")
    drawn: list[bytes] = []

    def drain() -> None:  # read what the bar writes, so the terminal never fills up
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal was closed
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        assert main(["demo", "-n", "10", "-k", "3", "-c", "5", "--work-ms", "0"]) == 0
    finally:
        monkeypatch.undo()
        terminal.close()
        reader.join(10)
        os.close(master)
    assert not reader.is_alive()
    text = b"".join(drawn).decode(errors="replace")
    assert "30/30" in text  # the bar reached every request, and was closed
    assert "req" in text
