"""The testing kit for users (`aioidempotency.testing`): its pytest plugin, run in pytests
of its own (`pytester`, subprocesses) on the examples of docs/testing.md as written
there, on the in-memory store and on Redis; and its helpers, tested directly.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from aioidempotency import IdempotencyConfig, IdempotencyEngine, idempotent_async
from aioidempotency.events import CallOutcome, EventKind
from aioidempotency.persistence import InMemoryPersistenceLayer
from aioidempotency.testing import EventLog, FakeClock, key_for, orphan_claim
from aioidempotency.testing import _clock as clock_module
from tests.servers.redis import ServerPool

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parents[1] / "docs" / "testing.md"
EXAMPLES = {
    "test_lambda_payments.py": 4,
    "test_fastapi_payments.py": 2,
    "test_aiohttp_refunds.py": 2,
}
"""The runnable examples of docs/testing.md and how many tests each holds."""
STORE_EXAMPLE = "test_my_store.py"
"""The store author's example of docs/testing.md: the contract kit on a store."""
INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def examples() -> dict[str, str]:
    """The Python blocks of docs/testing.md whose first line names a test module."""
    blocks = re.findall(r"```python\n(# (test_\w+\.py)\n.*?)```", DOCS.read_text(), re.DOTALL)
    return {name: code for code, name in blocks if name in EXAMPLES}


def plugin_args() -> list[str]:
    """Load the plugin by hand unless the installed package registers it already."""
    registered = any(
        entry.value == "aioidempotency.testing.plugin"
        for entry in importlib.metadata.entry_points(group="pytest11")
    )
    return ["-p", "no:cacheprovider"] + (
        [] if registered else ["-p", "aioidempotency.testing.plugin"]
    )


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeini(INI)
    return pytester.runpytest_subprocess(*plugin_args(), "-p", "no:warnings", *args, timeout=240)


# -- the plugin, on the documented examples -----------------------------------------------


def test_the_docs_hold_every_example() -> None:
    named = re.findall(r"```python\n# (test_\w+\.py)\n", DOCS.read_text())
    assert sorted(named) == sorted([*EXAMPLES, STORE_EXAMPLE])
    assert sorted(examples()) == sorted(EXAMPLES)


def test_the_store_authors_example_runs_the_contract(pytester: pytest.Pytester) -> None:
    code = re.search(rf"```python\n(# {STORE_EXAMPLE}\n.*?)```", DOCS.read_text(), re.DOTALL)
    assert code is not None
    pytester.makepyfile(**{STORE_EXAMPLE.removesuffix(".py"): code[1]})
    outcomes = run(pytester).parseoutcomes()
    assert outcomes.get("failed", 0) == outcomes.get("errors", 0) == 0, outcomes
    assert outcomes["passed"] >= 30, outcomes  # the in-memory store skips a few


def test_the_examples_pass_on_the_in_memory_store(pytester: pytest.Pytester) -> None:
    for name, code in examples().items():
        pytester.makepyfile(**{name.removesuffix(".py"): code})
    result = run(pytester)
    result.assert_outcomes(passed=sum(EXAMPLES.values()))


def test_the_examples_pass_on_redis_and_leave_no_record(
    pytester: pytest.Pytester, cache_servers: ServerPool
) -> None:
    node = cache_servers.standalone("redis")
    db = 9  # a database of its own: the suite's cache backends flush database 0
    with redis.Redis(node.host, node.port, db=db, socket_timeout=5) as admin:
        admin.flushdb()
        for name, code in examples().items():
            pytester.makepyfile(**{name.removesuffix(".py"): code})
        url = f"redis://{node.host}:{node.port}/{db}?client=redis&timeout=5"
        result = run(pytester, f"--idempotency-store-url={url}")
        result.assert_outcomes(passed=sum(EXAMPLES.values()))
        assert admin.dbsize() == 0  # each test's records were deleted after it


def test_the_store_url_comes_from_the_option_else_the_ini(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_url="""
        from aioidempotency.persistence import InMemoryPersistenceLayer

        def test_url(idempotency_store_url, idempotency_store, idempotency_memory_store):
            assert idempotency_store_url == EXPECTED
            assert isinstance(idempotency_store, InMemoryPersistenceLayer)
            assert idempotency_store.max_items == MAX_ITEMS
            assert idempotency_memory_store is not idempotency_store
        """
    )
    pytester.makeconftest("import os\nEXPECTED = os.environ['EXPECTED']\n")
    test_file = pytester.path / "test_url.py"
    test_file.write_text(
        "from conftest import EXPECTED\n"
        "MAX_ITEMS = int(EXPECTED.rpartition('=')[2]) if '=' in EXPECTED else 100000\n"
        + test_file.read_text()
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EXPECTED", "memory://")
        run(pytester).assert_outcomes(passed=1)
        env.setenv("EXPECTED", "memory://?max_items=7")
        run(pytester, "--idempotency-store-url=memory://?max_items=7").assert_outcomes(passed=1)
    pytester.makeini(INI + "idempotency_store_url = memory://?max_items=5\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EXPECTED", "memory://?max_items=5")
        result = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:warnings", timeout=240)
        result.assert_outcomes(passed=1)


def test_the_clock_reaches_engines_built_before_the_test_and_only_during_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_clock="""
        import time

        from aioidempotency import IdempotencyEngine, InMemoryPersistenceLayer

        ENGINE = IdempotencyEngine(InMemoryPersistenceLayer(), key_prefix="at-import")

        def test_faked(idempotency_clock):
            idempotency_clock.advance(3600)
            assert ENGINE._clock() == idempotency_clock.now
            assert ENGINE.persistence_store.table._clock() == idempotency_clock.now

        def test_real_time_again():
            assert abs(ENGINE._clock() - time.time()) < 60
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_import_aioidempotency_imports_no_test_framework() -> None:
    code = (
        "import sys, aioidempotency, aioidempotency.persistence, aioidempotency.events\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pytest', '_pytest', "
        "'aioidempotency.testing'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, aioidempotency.testing; print('pytest' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False"  # FakeClock and EventLog need no pytest


# -- FakeClock -------------------------------------------------------------------------------


def test_a_fake_clock_moves_only_ahead_and_by_the_configs_durations() -> None:
    clock = FakeClock(1000.0)
    assert clock() == clock.now == 1000.0
    with pytest.raises(ValueError, match="only moves ahead"):
        clock.advance(-1)
    config = IdempotencyConfig(expires_after_seconds=60, in_progress_lease_seconds=3.0)
    assert clock.advance_past_expiry(config) == 1061.0
    assert clock.advance_to_renewal(config) == pytest.approx(1062.002)
    assert clock.advance_past_lease(config) == pytest.approx(1065.004)
    with pytest.raises(ValueError, match="no in-progress lease"):
        clock.advance_past_lease(IdempotencyConfig(in_progress_lease_seconds=None))
    assert FakeClock().now == pytest.approx(FakeClock().now, abs=5)


def test_the_default_clock_is_refused_when_a_constructor_takes_no_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_clock(*, other: int = 1) -> None: ...

    monkeypatch.setattr(clock_module, "_replaced", [])
    monkeypatch.setattr(clock_module, "_clock_takers", lambda: [no_clock])
    with pytest.raises(RuntimeError, match="takes no keyword-only clock"):
        clock_module.install_default_clock()
    assert repr(clock_module.DefaultClock()) == "<aioidempotency test clock: real time>"


def test_a_session_inside_another_leaves_the_default_clock_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def takes_a_clock(*, clock: Callable[[], float] = time.time) -> None: ...

    monkeypatch.setattr(clock_module, "_replaced", [])
    monkeypatch.setattr(clock_module, "_installs", 0)
    monkeypatch.setattr(clock_module, "_clock_takers", lambda: [takes_a_clock])
    defaults = takes_a_clock.__kwdefaults__
    assert defaults is not None
    clock_module.install_default_clock()  # the outer session
    clock_module.install_default_clock()  # a pytester run in the same process
    assert defaults["clock"] is clock_module.default_clock
    clock_module.uninstall_default_clock()
    assert defaults["clock"] is clock_module.default_clock
    clock_module.uninstall_default_clock()
    assert defaults["clock"] is time.time


def test_a_clock_that_cannot_be_installed_fails_only_the_tests_that_take_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(
        """
        from aioidempotency import IdempotencyEngine

        IdempotencyEngine.__init__.__kwdefaults__["clock"] = lambda: 0.0
        """
    )
    pytester.makepyfile(
        test_refused="""
        def test_clock(idempotency_clock):
            pass

        def test_events(idempotency_events):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*IdempotencyEngine.__init__ takes no keyword-only clock*"])


# -- EventLog --------------------------------------------------------------------------------


class Declined(Exception):
    pass


def engine_on(clock: FakeClock, store: InMemoryPersistenceLayer | None = None) -> IdempotencyEngine:
    return IdempotencyEngine(
        store or InMemoryPersistenceLayer(), IdempotencyConfig(), key_prefix="kit", clock=clock
    )


async def test_the_log_asserts_what_the_engine_did() -> None:
    clock = FakeClock()
    engine = engine_on(clock)
    runs: list[int] = []

    async def pay() -> str:
        runs.append(1)
        return "paid"

    async def decline() -> str:
        raise Declined("no")

    with EventLog() as log:
        assert await engine.run({"id": 1}, pay) == "paid"
        assert await engine.run({"id": 1}, pay) == "paid"
        key = log.assert_ran_once()
        assert log.assert_replayed(times=1) == 1
        log.assert_left_no_claim(store=engine.persistence_store)
        assert log.outcomes() == [CallOutcome.EXECUTED, CallOutcome.REPLAYED]
        with pytest.raises(AssertionError, match="1 calls replayed the stored result, not 2"):
            log.assert_replayed(key, times=2)
        with pytest.raises(AssertionError, match="no claim was released"):
            log.assert_released(key)

        clock.advance_past_expiry()
        assert await engine.run({"id": 1}, pay) == "paid"
        with pytest.raises(AssertionError, match=r"(?s)ran 2 times, not once\n.*call 3: claimed"):
            log.assert_ran_once(key)

        with pytest.raises(Declined):
            await engine.run({"id": 2}, decline)
        with pytest.raises(AssertionError, match="say which key: the log saw 2 keys"):
            log.assert_ran_once()
        declined = engine.idempotency_key({"id": 2})
        assert log.assert_released(declined, error=Declined).error == "Declined"
        assert log.assert_released(prefix="kit", key=declined, error="Declined")
        with pytest.raises(AssertionError, match="after a ValueError"):
            log.assert_released(declined, error=ValueError)
        with pytest.raises(AssertionError, match="result was not stored"):
            log.assert_ran_once(declined)
        with pytest.raises(AssertionError, match="0 calls replayed"):
            log.assert_replayed(declined)
        assert log.keys("kit") == [key, declined]
        assert log.keys("other") == []
        with pytest.raises(AssertionError, match=r"saw 0 keys with prefix 'other'$"):
            log.the_key(prefix="other")
        assert len(log.select(kind=EventKind.CLAIMED)) == 3
    count = len(log.events)
    await engine.run({"id": 3}, pay)
    assert len(log.events) == count  # stopped listening
    log.clear()
    assert log.events == []


async def test_the_log_sees_a_claim_left_behind() -> None:
    clock = FakeClock()
    store = InMemoryPersistenceLayer()
    engine = engine_on(clock, store)
    started, finish = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await finish.wait()
        return "done"

    with EventLog() as log:
        running = asyncio.create_task(engine.run({"id": 1}, slow))
        await asyncio.wait_for(started.wait(), 10)
        key = engine.idempotency_key({"id": 1})
        with pytest.raises(AssertionError, match="1 calls claimed the key and never let it go"):
            log.assert_left_no_claim(key)
        finish.set()
        assert await running == "done"
        log.assert_left_no_claim(key, store=store, now=clock())
    orphan = orphan_claim(store, "kit#orphan", now=clock(), lease_seconds=5)
    with pytest.raises(AssertionError, match="the store still holds a claim"):
        log.assert_left_no_claim("kit#orphan", store=store, now=clock())
    log.assert_left_no_claim("kit#orphan", store=store, now=clock() + 6)  # orphaned by then
    with pytest.raises(AssertionError, match="is held already"):
        orphan_claim(store, orphan.idempotency_key, now=clock())


async def test_waiting_for_events_is_bounded_in_both_worlds() -> None:
    log = EventLog()
    with pytest.raises(TimeoutError, match=r"1 claimed events not seen within 0\.05s"):
        log.wait_for(EventKind.CLAIMED, timeout=0.05)
    with pytest.raises(TimeoutError, match="2 claimed events not seen"):
        await log.wait_for_async(EventKind.CLAIMED, count=2, timeout=0.05)
    engine = engine_on(FakeClock())

    async def pay() -> str:
        return "paid"

    with log:
        waiter = asyncio.create_task(log.wait_for_async(EventKind.COMPLETED, timeout=10))
        await asyncio.sleep(0)  # the waiter is waiting
        await engine.run({"id": 1}, pay)
        assert (await waiter).kind is EventKind.COMPLETED
        thread_events: list[Any] = []
        thread = threading.Thread(
            target=lambda: thread_events.append(log.wait_for(EventKind.REPLAYED, timeout=10))
        )
        thread.start()
        await engine.run({"id": 1}, pay)
        thread.join(10)
        assert [e.kind for e in thread_events] == [EventKind.REPLAYED]


async def test_key_for_names_the_key_of_a_decorated_call() -> None:
    store = InMemoryPersistenceLayer()

    @idempotent_async(persistence_store=store)
    async def charge(order: dict[str, int]) -> int:
        return order["amount"]

    with EventLog() as log:
        await charge({"amount": 5})
    assert key_for(charge, {"amount": 5}) == log.the_key()
    with pytest.raises(TypeError, match="is not an idempotent function"):
        key_for(print, {})
