"""Developer tasks: ``nox -s tests``, ``nox -s lint``, ``nox -s generate``, ``nox -s demo``,
``nox -s faults``, ``nox -s bench``, ``nox -s docs``."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


def _ensure_redis_server(session: nox.Session) -> None:
    """The suite starts its own redis-server; install Debian's package when missing."""
    if shutil.which("redis-server"):
        return
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        session.run("apt-get", "update", "-qq", external=True)
        session.run(
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "redis-server",
            external=True,
            env={"DEBIAN_FRONTEND": "noninteractive"},
        )
        return
    session.error("redis-server is missing: install it (Debian: apt-get install redis-server)")


# pytest options that take a value, so that value is not read as a test path.
_PYTEST_VALUE_OPTIONS = frozenset({"-p", "-c", "-o", "-W", "--basetemp", "--rootdir", "--timeout"})
# pytest options that run part of the suite.
_PYTEST_SELECTING_OPTIONS = ("-k", "-m", "--lf", "--last-failed", "--deselect", "--ignore")


def _selects_tests(args: list[str]) -> bool:
    """Whether pytest `args` run part of the suite (a path, a node id, -k, -m...)."""
    takes_value = False
    for arg in args:
        if takes_value:
            takes_value = False
        elif arg in _PYTEST_VALUE_OPTIONS:
            takes_value = True
        elif arg.startswith(_PYTEST_SELECTING_OPTIONS) or not arg.startswith("-"):
            return True
    return False


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the whole test suite against real Redis, Valkey and moto servers, under coverage.

    The whole suite fails below the coverage gate (`fail_under` in pyproject.toml); a run
    of part of it (``nox -s tests -- tests/test_engine.py``, ``-k``, ``-m``) only reports.
    The fault suite (``tests/faults``) runs after it without coverage: under coverage's
    tracer, CPython 3.11 aborted twice in its threaded cluster tests.
    """
    _ensure_redis_server(session)
    session.install("-e", ".[test]")
    session.run("coverage", "erase")
    if _selects_tests(session.posargs):
        session.run("coverage", "run", "-m", "pytest", *session.posargs)
        session.run("coverage", "combine", "--quiet")
        session.run("coverage", "report", "--fail-under=0")
        return
    session.run("coverage", "run", "-m", "pytest", "--ignore=tests/faults", *session.posargs)
    session.run("coverage", "combine", "--quiet")
    session.run("coverage", "report")
    session.run("pytest", "tests/faults", *session.posargs)


@nox.session(python=PYTHON)
def faults(session: nox.Session) -> None:
    """The fault-injection suite at full size (`nox -s tests` runs it CI-sized).

    Servers are killed, frozen and restarted, connections dropped and replies lost;
    the fault table is printed at the end (``AIOIDEM_FAULT_TABLE=path`` saves it).
    """
    _ensure_redis_server(session)
    session.install("-e", ".[test]")
    session.run("pytest", "tests/faults", *session.posargs, env={"AIOIDEM_FAULT_SCALE": "full"})


@nox.session(python=PYTHON)
def generate(session: nox.Session) -> None:
    """Rewrite the sync twin (src/aioidempotency/_sync) from the async source.

    ``nox -s generate -- --check`` only checks that the generated files are current.
    """
    session.install("ruff")
    session.run("python", "tools/unasync.py", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """The generated sync twin is current; ruff (lint and format); mypy --strict."""
    session.install("-e", ".[test]", "ruff", "mypy")
    session.run("python", "tools/unasync.py", "--check")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "src", "tools", "tests")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The retry-storm demo on the embedded in-memory store."""
    session.install("-e", ".[cli]")
    session.run("python", "-m", "aioidempotency", "demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against Powertools and the round-trip floor (minutes on 2 cores).

    ``nox -s bench -- --smoke`` runs every case a few times into a temporary folder.
    """
    _ensure_redis_server(session)
    session.install("-e", ".[bench]")
    args = list(session.posargs)
    if "--smoke" not in args:
        args = ["--out", "benchmarks/results", "--docs", "docs/performance.md", *args]
    session.run("python", "-m", "benchmarks.run", *args)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ with ``mkdocs build --strict``.

    A broken link, a missing page or an API reference that does not resolve fails the
    build. Only the ``docs`` extra is installed: the API reference reads src/ without
    importing it. ``nox -s docs -- serve`` serves it with live reload instead.
    """
    extras = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]
    session.install(*extras["docs"])
    # Material's notice about MkDocs 2.0 is printed on every build; it is not about this site.
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
        return
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs)
