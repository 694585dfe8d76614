"""Store outages, store by store: what a caller sees, how often the function runs and
what is left in the store (the invariants of docs/reliability.md).

Every store talks to its server through a `FaultProxy` with 0.5 s client timeouts;
what is stored is read on the server's real port. Every call is bounded by
`asyncio.wait_for(..., BOUND)`, so a hang fails instead of hanging. Each scenario adds
a row to the fault table printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from aioidempotency import IdempotencyEngine
from aioidempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyClaimLostError,
    IdempotencyCompletionError,
    IdempotencyError,
    IdempotencyPersistenceLayerError,
)
from aioidempotency.persistence import store_from_url
from tests.faults.conftest import MakeServer
from tests.faults.rigs import (
    CACHE_QUERY,
    CACHE_RIGS,
    CLIENT_TIMEOUT,
    TABLE,
    Counted,
    FaultRow,
    Rig,
    client_cause,
    error_name,
)
from tests.faults.scale import pick

BOUND = 15.0
"""Upper bound on any single call: far above every client timeout and retry budget."""
ERROR_BOUND = 7.5
"""A store that cannot be reached must say so within this many seconds: 0.5 s client
timeouts, a few attempts, none started after the stores' retry budget (5 s)."""
LEASE = 1.0
RESULT = {"result": "p"}


async def bounded(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, BOUND)


def assert_typed(exc: BaseException, *, transient: bool | None = None) -> None:
    """An `IdempotencyError` with the client's exception down its `__cause__` chain."""
    assert isinstance(exc, IdempotencyError), f"raw client error reached the caller: {exc!r}"
    cause = client_cause(exc)
    assert cause is not None, f"no client exception chained under {exc!r}"
    if transient is not None:
        assert isinstance(exc, IdempotencyPersistenceLayerError), repr(exc)
        assert exc.transient is transient, f"{exc!r} (cause {cause!r}): transient != {transient}"


async def call_until_ok(
    engine: IdempotencyEngine,
    payload: str,
    fn: Callable[[], Awaitable[Any]],
    row: FaultRow,
    *,
    within: float,
) -> tuple[Any, float]:
    """Retry `payload` until it returns (in progress and transient errors are retried);
    returns the result and the seconds it took. Fails past `within` seconds."""
    started = time.monotonic()
    seen: list[str] = []
    while True:
        row.calls += 1
        try:
            result = await bounded(engine.run(payload, fn))
        except (IdempotencyAlreadyInProgressError, IdempotencyPersistenceLayerError) as exc:
            if isinstance(exc, IdempotencyPersistenceLayerError):
                if not exc.transient:
                    raise
                assert_typed(exc)
            seen.append(error_name(exc))
            row.errors[f"retry: {error_name(exc)}"] += 1
        else:
            return result, time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"{payload!r} still refused after {within}s: {seen[-5:]}")
        await asyncio.sleep(0.05)  # pacing of the retry loop, not a synchronisation


async def warm_up(engine: IdempotencyEngine, counted: Counted) -> None:
    """One call through the proxy: clients connected, scripts loaded (a transient
    failure of this set-up step, on a busy machine, is retried)."""
    result, _ = await call_until_ok(
        engine, "warm", counted("warm"), FaultRow("warm-up", ""), within=BOUND
    )
    assert result == {"result": "warm"}


async def settle(engine: IdempotencyEngine) -> None:
    """Let the engine's background releases and completions finish."""
    assert await engine.drain(BOUND), "background cleanups still running"


# -- 1. server down during the claim ------------------------------------------------------


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "cold"])
async def test_server_down_during_claim(rig: Rig, connected: bool) -> None:
    engine, counted = rig.engine(lease=LEASE), Counted()
    row = TABLE.add(FaultRow(f"down at claim ({'connected' if connected else 'cold'})", rig.kind))
    if connected:
        await warm_up(engine, counted)
    rig.proxy.refuse()
    started = time.monotonic()
    row.calls += 1
    with pytest.raises(IdempotencyError) as info:
        await bounded(engine.run("p", counted("p")))
    row.to_error = time.monotonic() - started
    row.errors[error_name(info.value)] += 1
    assert_typed(info.value, transient=True)
    assert counted.executions["p"] == 0
    assert row.to_error <= ERROR_BOUND, f"unreachable store took {row.to_error:.1f}s to fail"
    key = engine.idempotency_key("p")
    rig.proxy.pass_through()
    assert key not in await rig.records()  # nothing reached the server
    result, row.to_recovery = await call_until_ok(engine, "p", counted("p"), row, within=LEASE + 10)
    assert result == RESULT
    assert counted.executions["p"] == 1
    await settle(engine)
    row.executions = counted.executions["p"]
    row.locked_after = len(await rig.locked_keys())
    assert row.locked_after == 0


# -- 2./3. frozen server and lost reply during the claim ----------------------------------


async def _claim_fault_then_recover(rig: Rig, fault: str) -> None:
    """`fault` (stall, sigstop, half_open) during the claim, then recovery."""
    engine, counted = rig.engine(lease=LEASE), Counted()
    row = TABLE.add(FaultRow(f"{fault} at claim", rig.kind))
    await warm_up(engine, counted)
    if fault == "sigstop":
        assert rig.server is not None
        rig.server.freeze()
    elif fault == "stall":
        rig.proxy.stall()
    else:
        rig.proxy.half_open()
    started = time.monotonic()
    row.calls += 1
    with pytest.raises(IdempotencyError) as info:
        await bounded(engine.run("p", counted("p")))
    failed_at = time.time()
    row.to_error = time.monotonic() - started
    row.errors[error_name(info.value)] += 1
    assert_typed(info.value, transient=True)
    assert counted.executions["p"] == 0
    if fault == "sigstop":
        assert rig.server is not None
        rig.server.thaw()
    else:
        rig.proxy.pass_through()
    assert row.to_error <= ERROR_BOUND, f"{fault}: the store took {row.to_error:.1f}s to fail"
    # Whatever landed (late, or with its reply lost) is the failed call's claim; nobody
    # may renew it, so it frees itself within one lease of the call at worst.
    stored = (await rig.records()).get(engine.idempotency_key("p"))
    if stored is not None:
        row.note = "claim landed"
        assert stored.status == "INPROGRESS"
        assert stored.in_progress_expiration is not None
        assert stored.in_progress_expiration <= (failed_at + LEASE) * 1000
    result, row.to_recovery = await call_until_ok(engine, "p", counted("p"), row, within=LEASE + 10)
    assert result == RESULT
    assert counted.executions["p"] == 1
    await settle(engine)
    row.executions = counted.executions["p"]
    row.locked_after = len(await rig.locked_keys())
    assert row.locked_after == 0


async def test_frozen_server_during_claim(rig: Rig) -> None:
    await _claim_fault_then_recover(rig, "stall")


@pytest.mark.parametrize("rig", CACHE_RIGS, indirect=True)
async def test_sigstopped_server_during_claim(rig: Rig) -> None:
    await _claim_fault_then_recover(rig, "sigstop")


async def test_lost_reply_during_claim(rig: Rig) -> None:
    await _claim_fault_then_recover(rig, "half_open")


# -- 4. connection dropped during completion ----------------------------------------------


@pytest.mark.parametrize("deliver", [True, False], ids=["reply-lost", "request-lost"])
async def test_connection_dropped_during_completion(rig: Rig, deliver: bool) -> None:
    engine, counted = rig.engine(lease=LEASE), Counted()
    row = TABLE.add(
        FaultRow(f"reset at completion ({'reply' if deliver else 'request'} lost)", rig.kind)
    )
    await warm_up(engine, counted)

    async def arm() -> None:  # the claim is done: the next COMPLETED write is ours
        rig.proxy.reset_next(b"COMPLETED", deliver=deliver)

    started = time.monotonic()
    row.calls += 1
    try:
        result = await bounded(engine.run("p", counted("p", arm)))
    except IdempotencyCompletionError as exc:
        row.errors[error_name(exc)] += 1
        assert_typed(exc)
        assert exc.result == RESULT  # noqa: PT017 - either outcome is allowed; never lost
        row.to_error = time.monotonic() - started
    else:
        assert result == RESULT
        row.note = "completion retried by the store"
    assert rig.proxy.stats().triggers == 1, "the completion never crossed the proxy"
    await settle(engine)
    replay, row.to_recovery = await call_until_ok(engine, "p", counted("p"), row, within=LEASE + 10)
    assert replay == RESULT
    assert counted.executions["p"] == 1, "the function ran twice"
    stored = (await rig.records())[engine.idempotency_key("p")]
    assert stored.status == "COMPLETED"
    row.executions = counted.executions["p"]
    row.locked_after = len(await rig.locked_keys())


# -- 5. the lease renewer survives an outage longer than the lease ------------------------


async def test_lease_renewal_survives_outage_longer_than_lease(rig: Rig) -> None:
    """Regression: the renewer gave up for good during an outage, and a duplicate ran
    the function again once the store was back."""
    lease = 0.6
    engine, counted = rig.engine(lease=lease), Counted()
    row = TABLE.add(FaultRow(f"outage of 2 leases ({lease}s) mid-call", rig.kind))
    await warm_up(engine, counted)
    # Another process: its own store object and engine, same key prefix.
    other_store = store_from_url(rig.url)
    other = rig.track(IdempotencyEngine(other_store, engine.config, key_prefix=engine.key_prefix))
    # Its client opens now: opening one (aiobotocore loads its service model) can stall
    # the shared loop, and with it the first call's renewals, for longer than a lease.
    await warm_up(other, counted)
    key = engine.idempotency_key("p")
    started, finish = asyncio.Event(), asyncio.Event()

    async def body() -> None:
        started.set()
        await finish.wait()

    first = asyncio.ensure_future(engine.run("p", counted("p", body)))
    try:
        await bounded(started.wait())
        claim = (await rig.records())[key]
        assert claim.owner is not None
        assert claim.in_progress_expiration is not None
        await wait_for_renewal(rig, key, claim.owner, after=claim.in_progress_expiration)

        rig.proxy.refuse()
        outage = time.monotonic()
        await asyncio.sleep(2 * lease)  # the outage itself: real time, by design
        lapsed = (await rig.records())[key]
        assert not lapsed.live_in_progress(time.time()), "the outage did not outlast the lease"
        rig.proxy.pass_through()
        renewed = await wait_for_renewal(rig, key, claim.owner, after=time.time() * 1000)
        row.to_recovery = time.monotonic() - outage - 2 * lease
        row.note = f"renewed {renewed:.2f}s after the store came back"

        # The record is ours and live again: duplicates over more than a lease refuse.
        for _ in range(3):
            row.calls += 1
            with pytest.raises(IdempotencyAlreadyInProgressError) as info:
                await bounded(other.run("p", counted("p")))
            row.errors[error_name(info.value)] += 1
            assert not first.done()
            await asyncio.sleep(lease / 2)  # spread the duplicates over 1.5 leases
        finish.set()
        row.calls += 1
        assert await bounded(first) == RESULT
        row.calls += 1
        assert await bounded(other.run("p", counted("p"))) == RESULT  # a replay
        assert counted.executions["p"] == 1
    finally:
        finish.set()
        if not first.done():
            first.cancel()
        with contextlib.suppress(BaseException):
            await first
        await settle(engine)
        await settle(other)
        await other_store.aclose()
    row.executions = counted.executions["p"]
    row.locked_after = len(await rig.locked_keys())
    assert row.locked_after == 0


async def wait_for_renewal(rig: Rig, key: str, owner: str, *, after: float) -> float:
    """Wait (bounded) until `owner`'s claim on `key` runs past `after` (epoch ms).

    Returns the seconds waited; fails if the lease is not renewed within 3 s."""
    started = time.monotonic()
    while True:
        stored = (await rig.records()).get(key)
        assert stored is not None, "the first call's claim vanished"
        assert stored.owner == owner, "the first call's claim was taken over"
        if stored.in_progress_expiration is not None and stored.in_progress_expiration > after:
            return time.monotonic() - started
        if time.monotonic() - started > 3.0:
            raise AssertionError(f"the lease on {key!r} was not renewed within 3 s: {stored}")
        await asyncio.sleep(0.02)  # polling the server's state, bounded


# -- 6. server killed and restarted on the same port --------------------------------------


@pytest.mark.parametrize("aof", [False, True], ids=["data-lost", "aof"])
@pytest.mark.parametrize("kind", CACHE_RIGS)
async def test_server_killed_and_restarted(make_server: MakeServer, kind: str, aof: bool) -> None:
    """kill -9 while calls run, restart on the same port: typed transient errors during
    the outage, the same store object recovers, and a function runs twice only for a
    payload whose caller was told its result was not stored."""
    server = make_server("valkey" if kind == "valkey_glide" else "redis", aof=aof)
    store = store_from_url(f"{server.url}?{CACHE_QUERY[kind]}&timeout={CLIENT_TIMEOUT}")
    rig = Rig(kind, store, via=None, server=server)
    engine, counted = rig.engine(lease=LEASE), Counted()
    row = TABLE.add(FaultRow(f"kill -9 + restart ({'AOF' if aof else 'no persistence'})", kind))
    workers, per_phase = pick(ci=3, full=8), pick(ci=5, full=50)
    told: collections.Counter[str] = collections.Counter()  # result not stored, and said so
    state = _Phase()
    done_after = [0] * workers
    first_error: list[float] = []
    first_ok_after: list[float] = []
    outage_seen = asyncio.Event()

    async def worker(index: int) -> None:
        number = 0
        while not (state.phase == "after" and done_after[index] >= per_phase):
            payload = f"w{index}-{number}"
            row.calls += 1
            try:
                result = await bounded(engine.run(payload, counted(payload)))
            except IdempotencyError as exc:
                row.errors[error_name(exc)] += 1
                check_outage_error(exc, payload)
                if isinstance(exc, (IdempotencyCompletionError, IdempotencyClaimLostError)):
                    told[payload] += 1
                if state.phase == "down":
                    if not first_error:
                        first_error.append(time.monotonic() - state.killed)
                    outage_seen.set()
                await asyncio.sleep(0.02)  # pacing of retries during the outage
                continue  # retry the same payload
            assert result == {"result": payload}
            if state.phase == "after":
                done_after[index] += 1
                if not first_ok_after:
                    first_ok_after.append(time.monotonic() - state.restarted)
            number += 1

    tasks = [asyncio.ensure_future(worker(i)) for i in range(workers)]
    try:
        await first_of(tasks, until(lambda: counted.total >= workers * per_phase))
        state.phase, state.killed = "down", time.monotonic()
        server.kill()
        await first_of(tasks, outage_seen.wait())
        server.restart()
        state.phase, state.restarted = "after", time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), BOUND * 2)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await settle(engine)
        row.locked_after = len(await rig.locked_keys())
        await rig.aclose()
    row.to_error = first_error[0] if first_error else None
    row.to_recovery = first_ok_after[0] if first_ok_after else None
    row.executions = counted.total
    assert row.errors, "the outage was never seen"
    for payload, runs in counted.executions.items():
        assert runs <= 1 + told[payload], f"{payload} ran {runs} times; told {told[payload]}"


@dataclasses.dataclass
class _Phase:
    phase: str = "before"
    killed: float = 0.0
    restarted: float = 0.0


def check_outage_error(exc: IdempotencyError, payload: str) -> None:
    """What a caller may see while the server is down or just back."""
    if isinstance(exc, (IdempotencyCompletionError, IdempotencyClaimLostError)):
        assert exc.result == {"result": payload}  # ran; result attached, not stored
        if isinstance(exc, IdempotencyCompletionError):
            assert_typed(exc)
    elif isinstance(exc, IdempotencyPersistenceLayerError):
        assert_typed(exc, transient=True)
    else:  # a claim that landed before the kill and survived it (AOF)
        assert isinstance(exc, IdempotencyAlreadyInProgressError), repr(exc)


async def first_of(tasks: Sequence[asyncio.Future[None]], waiting: Awaitable[Any]) -> None:
    """Await `waiting` (bounded), failing at once if a worker fails first."""
    waiter = asyncio.ensure_future(waiting)
    try:
        done, _ = await asyncio.wait([waiter, *tasks], timeout=BOUND, return_when="FIRST_COMPLETED")
        for task in done:
            if task is not waiter:
                task.result()  # a worker's failure
                raise AssertionError("a worker stopped early")
        assert waiter in done, "timed out"
    finally:
        waiter.cancel()


async def until(check: Callable[[], bool]) -> None:
    while not check():  # noqa: ASYNC110 - polling test-local counters, bounded by the caller
        await asyncio.sleep(0.01)


# -- 7. wrong password ----------------------------------------------------------------------


@pytest.mark.parametrize("when", ["cold", "reconnect"])
@pytest.mark.parametrize("rig", CACHE_RIGS, indirect=True)
async def test_wrong_password_is_not_reported_as_unreachable(rig: Rig, when: str) -> None:
    assert rig.server is not None
    engine, counted = rig.engine(lease=LEASE), Counted()
    row = TABLE.add(FaultRow(f"wrong password ({when})", rig.kind))
    if when == "reconnect":
        await warm_up(engine, counted)
    rig.server.set_password("not-what-the-client-has")
    try:
        if when == "reconnect":
            rig.proxy.drop()  # authenticated connections go; new ones must log in
        started = time.monotonic()
        row.calls += 1
        with pytest.raises(IdempotencyError) as info:
            await bounded(engine.run("p", counted("p")))
        row.to_error = time.monotonic() - started
        row.errors[error_name(info.value)] += 1
        assert counted.executions["p"] == 0
        assert_typed(info.value, transient=False)
    finally:
        rig.server.set_password(None)
        await settle(engine)
    row.executions = counted.executions["p"]
