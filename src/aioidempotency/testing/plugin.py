"""The pytest plugin of aioidempotency: fixtures for testing idempotent code.

Installed with the package (the ``pytest11`` entry point ``aioidempotency``); disable it
with ``-p no:aioidempotency``. Fixtures (docs/testing.md):

- ``idempotency_clock``: a `FakeClock` that every engine and in-memory store uses
  during the test (see below);
- ``idempotency_events``: an `EventLog` of every engine decision during the test,
  with ``assert_ran_once``, ``assert_replayed``, ``assert_released``,
  ``assert_left_no_claim`` and ``wait_for``;
- ``idempotency_memory_store``: a new `InMemoryPersistenceLayer`;
- ``idempotency_store``: the store named by ``--idempotency-store-url`` (or the
  ``idempotency_store_url`` ini value; ``memory://`` by default): a new one per test
  for ``memory://``, otherwise one per session, from which the records of the keys a
  test used are deleted after it;
- ``idempotency_store_url``: that URL.

While the plugin is loaded, engines (`IdempotencyEngine`, `SyncIdempotencyEngine`)
and in-memory stores built without a ``clock=`` get a clock that reads the real time,
or the test's ``idempotency_clock`` while a test uses it; so the clock reaches the
engines of decorators, middleware and Lambda handlers built at import time too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aioidempotency._async.memory import InMemoryPersistenceLayer
from aioidempotency._async.store import PersistenceLayer
from aioidempotency._twins import as_sync_store
from aioidempotency._urls import store_from_url
from aioidempotency.events import IdempotencyEvent, listen
from aioidempotency.testing._clock import (
    FakeClock,
    default_clock,
    install_default_clock,
    uninstall_default_clock,
)
from aioidempotency.testing._log import EventLog

DEFAULT_STORE_URL = "memory://"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aioidempotency")
    group.addoption(
        "--idempotency-store-url",
        dest="idempotency_store_url",
        default=None,
        help="store URL of the idempotency_store fixture (default: the "
        f"idempotency_store_url ini value, else {DEFAULT_STORE_URL})",
    )
    parser.addini(
        "idempotency_store_url",
        "store URL of the idempotency_store fixture",
        default=DEFAULT_STORE_URL,
    )


_CLOCK_REFUSED = pytest.StashKey[str]()
"""Why the default clock could not be installed (the fixture then fails with it)."""


def pytest_configure(config: pytest.Config) -> None:
    try:
        install_default_clock()
    except RuntimeError as exc:  # only the tests that take the clock fail
        config.stash[_CLOCK_REFUSED] = str(exc)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CLOCK_REFUSED not in config.stash:
        uninstall_default_clock()


@pytest.fixture
def idempotency_clock(pytestconfig: pytest.Config) -> Iterator[FakeClock]:
    """A `FakeClock` at the real time that engines and in-memory stores read during
    the test (unless built with a ``clock=`` of their own)."""
    refused = pytestconfig.stash.get(_CLOCK_REFUSED, None)
    if refused is not None:
        pytest.fail(refused, pytrace=False)
    clock = FakeClock()
    default_clock.fake = clock
    try:
        yield clock
    finally:
        default_clock.fake = None


@pytest.fixture
def idempotency_events() -> Iterator[EventLog]:
    """An `EventLog` listening to every engine during the test."""
    with EventLog() as log:
        yield log


@pytest.fixture
def idempotency_memory_store() -> InMemoryPersistenceLayer:
    """A new, empty in-memory store."""
    return InMemoryPersistenceLayer()


@pytest.fixture(scope="session")
def idempotency_store_url(pytestconfig: pytest.Config) -> str:
    """The URL of the ``idempotency_store`` fixture's store."""
    url: str | None = pytestconfig.getoption("idempotency_store_url")
    if url is None:
        url = str(pytestconfig.getini("idempotency_store_url") or DEFAULT_STORE_URL)
    return url


@pytest.fixture(scope="session")
def _idempotency_session_store(idempotency_store_url: str) -> Iterator[PersistenceLayer | None]:
    """The store of a URL other than ``memory://``, shared by the session's tests."""
    if idempotency_store_url.startswith("memory:"):
        yield None
        return
    store = store_from_url(idempotency_store_url)
    try:
        yield store
    finally:
        as_sync_store(store).close()


@pytest.fixture
def idempotency_store(
    idempotency_store_url: str, _idempotency_session_store: PersistenceLayer | None
) -> Iterator[PersistenceLayer]:
    """The store named by ``--idempotency-store-url`` (``memory://`` by default).

    A new store per test for ``memory://``. Any other store is the session's; the
    records of every key the test's calls used (seen through the events) are deleted
    after it, so a test never replays another's result. Async and sync code both take
    it (``@idempotent(persistence_store=...)`` as well as ``@idempotent_async``).
    """
    if _idempotency_session_store is None:
        yield store_from_url(idempotency_store_url)
        return
    keys: dict[str, None] = {}

    def seen(event: IdempotencyEvent) -> None:
        if event.key is not None:
            keys.setdefault(event.key)

    unsubscribe = listen(seen)
    try:
        yield _idempotency_session_store
    finally:
        unsubscribe()
        sync_store = as_sync_store(_idempotency_session_store)
        for key in list(keys):
            sync_store.delete(key)
