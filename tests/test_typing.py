"""`mypy --strict` sees through the decorators: original parameters and return types.

One mypy run over `tests/typing_sample.py`, whose ``# R:`` and ``# E:`` markers say
what mypy must reveal and reject.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is needed to type-check the sample")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path("tests") / "typing_sample.py"
MARKER = re.compile(r"#\s*(?P<kind>[RE]):\s*(?P<value>.+?)\s*$")
OUTPUT = re.compile(
    r"^(?P<path>[^:]+):(?P<line>\d+): (?P<kind>error|note): (?P<message>.*?)"
    r"(?:  \[(?P<code>[a-z0-9-]+)\])?$"
)
REVEALED = re.compile(r'^Revealed type is "(?P<type>.*)"$')
PREFIXES = ("tests.typing_sample.", "builtins.", "typing.", "_asyncio.", "asyncio.tasks.")


def normalise(revealed: str) -> str:
    for prefix in PREFIXES:
        revealed = re.sub(rf"(?<![\w.]){re.escape(prefix)}", "", revealed)
    return revealed


def expectations() -> tuple[dict[int, str], dict[int, str]]:
    """The sample's markers: {line: revealed type} and {line: error code}."""
    reveals: dict[int, str] = {}
    errors: dict[int, str] = {}
    source = (ROOT / SAMPLE).read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        found = MARKER.fullmatch(token.string)
        if found is None:
            continue
        number = token.start[0]
        standalone = not token.line[: token.start[1]].strip()
        target = number + 1 if standalone else number
        (reveals if found["kind"] == "R" else errors)[target] = found["value"]
    return reveals, errors


def test_mypy_strict_sees_the_original_signatures(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            "pyproject.toml",
            "--strict",
            "--show-error-codes",
            "--no-error-summary",
            "--no-color-output",
            "--no-pretty",
            "--hide-error-context",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            str(SAMPLE),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr  # errors expected

    revealed: dict[int, str] = {}
    errors: dict[int, str] = {}
    for line in completed.stdout.splitlines():
        parsed = OUTPUT.match(line)
        assert parsed is not None, f"unexpected mypy output: {line}"
        assert Path(parsed["path"]) == SAMPLE, line
        number = int(parsed["line"])
        if parsed["kind"] == "error":
            assert number not in errors, f"two errors on line {number}: {completed.stdout}"
            errors[number] = parsed["code"] or ""
            continue
        reveal = REVEALED.match(parsed["message"])
        if reveal is not None:
            revealed[number] = normalise(reveal["type"])

    expected_reveals, expected_errors = expectations()
    assert len(expected_reveals) >= 12
    assert len(expected_errors) >= 12
    assert revealed == expected_reveals
    assert errors == expected_errors
