"""The package imports with no optional extra installed, and names its public API."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import aioidempotency

BLOCK_EXTRAS = textwrap.dedent(
    """
    import sys
    for name in ("redis", "glide", "botocore", "botocore.exceptions", "aioboto3",
                 "aiobotocore", "starlette", "aiohttp", "tqdm", "pytest", "http_sf",
                 "opentelemetry", "aws_lambda_powertools"):
        sys.modules[name] = None  # makes "import name" raise ImportError
    """
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_EXTRAS + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_core_works_without_any_extra() -> None:
    done = run_python(
        """
        import asyncio
        import aioidempotency as ai

        async def main():
            engine = ai.IdempotencyEngine(ai.InMemoryPersistenceLayer(), key_prefix="p")
            calls = []
            async def fn():
                calls.append(1)
                return {"ok": True}
            assert await engine.run({"id": 1}, fn) == {"ok": True}
            assert await engine.run({"id": 1}, fn) == {"ok": True}
            assert len(calls) == 1
            print("core ok")

        asyncio.run(main())
        """
    )
    assert done.returncode == 0, done.stderr
    assert "core ok" in done.stdout


def test_dynamodb_store_without_its_extra_says_what_to_install() -> None:
    done = run_python(
        """
        import aioidempotency
        try:
            aioidempotency.DynamoDBPersistenceLayer(table_name="t")
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "aioidempotency[dynamodb]" in done.stdout


def test_star_imports_work_without_any_extra() -> None:
    done = run_python(
        """
        from aioidempotency import *
        from aioidempotency.persistence import *
        from aioidempotency.integrations import *
        import aioidempotency, aioidempotency.persistence as persistence
        missing = [n for n in aioidempotency.__all__ + persistence.__all__ if n not in globals()]
        print("missing:", missing)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "missing: []" in done.stdout


def test_every_public_name_is_importable() -> None:
    for name in aioidempotency.__all__:
        assert getattr(aioidempotency, name) is not None, name


ROOT = Path(__file__).resolve().parents[1]
#: Labels of documents that are not in this repository, and machine paths.
FOREIGN = re.compile(r"\bsemantics [A-Z]\d*\b|\([A-Z]\d\)|/work/|/home/\w|/root/|/tmp/\w")


def test_committed_text_cites_only_this_repository() -> None:
    """Docstrings, comments and docs cite what is in this repository, never a section
    label of an outside document ("semantics A3", "(C1)") nor a path of one machine."""
    files = subprocess.run(
        ["git", "ls-files", "src", "docs", "README.md", "CONTRIBUTING.md", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert files
    found = [
        f"{name}:{number}: {line.strip()}"
        for name in files
        if name.endswith((".py", ".md", ".toml"))
        for number, line in enumerate((ROOT / name).read_text().splitlines(), 1)
        if FOREIGN.search(line)
    ]
    assert found == []
