"""Every Python example in README.md and docs/ is run or type-checked, so none can rot.

Each fenced ``python`` block is preceded by an HTML comment (invisible once rendered)
that says what the suite does with it:

- ``<!-- docs-example: run -->`` executes the block, in a module of its own, with a
  top-level ``await`` allowed (run on an event loop of the page). Python lines after the
  first line of the comment are a hidden setup, run first: the stubs for names the
  example only mentions (``charge``, ``app``). A comment
  ``<!-- docs-example: then ... -->`` right after the block holds checks run after it.
- ``<!-- docs-example: typecheck -->`` is for what needs AWS or a service that is not
  here: the block (after its hidden setup, which declares the stubs' types) is
  type-checked by mypy, all such blocks in one run.
- ``<!-- docs-example: pytest -->`` marks a test module of docs/testing.md (its first
  line names it, ``# test_....py``), which tests/test_testing_plugin.py runs as written
  under pytest with the plugin.

Options after the mode: ``continue`` runs the block in the namespace of the page's
previous run block (for typecheck: appends it to the previous block's module);
``redis`` sets ``IDEMPOTENCY_STORE_URL`` to a Valkey server of the suite; ``dynamodb``
points DynamoDB clients at moto (``AWS_ENDPOINT_URL_DYNAMODB``) with the tables
``idempotency`` and ``IdempotencyTable``; without it, AWS clients get a closed local
port, so no example ever reaches AWS. A block without a comment fails the suite.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = "docs-example:"
MODES = ("run", "typecheck", "pytest")
OPTIONS = frozenset({"continue", "redis", "dynamodb"})
TABLES = ("idempotency", "IdempotencyTable")


@dataclasses.dataclass(frozen=True)
class Block:
    """One ``python`` block of a page, with what its marker says."""

    page: Path
    line: int  # the first line of the code, 1-based
    code: str
    mode: str | None  # None: no marker
    options: frozenset[str]
    setup: tuple[int, str] | None  # (first line, text)
    then: tuple[int, str] | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _comment_before(lines: list[str], fence: int) -> tuple[int, list[str]] | None:
    """The HTML comment ending on the last non-blank line before line index `fence`."""
    end = fence - 1
    while end >= 0 and not lines[end].strip():
        end -= 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return None
    start = end
    while start >= 0 and "<!--" not in lines[start]:
        start -= 1
    return (start, lines[start : end + 1]) if start >= 0 else None


def _comment_after(lines: list[str], close: int) -> tuple[int, list[str]] | None:
    """The HTML comment starting on the first non-blank line after line index `close`."""
    start = close + 1
    while start < len(lines) and not lines[start].strip():
        start += 1
    if start >= len(lines) or not lines[start].lstrip().startswith("<!--"):
        return None
    end = start
    while end < len(lines) and "-->" not in lines[end]:
        end += 1
    return start, lines[start : end + 1]


def _parse_comment(first: int, comment: list[str]) -> tuple[list[str], tuple[int, str] | None]:
    """The words after ``docs-example:`` on the comment's first line (none when it is not
    such a comment), and the Python text of its other lines with its first line number."""
    text = "\n".join(comment).strip().removeprefix("<!--").removesuffix("-->")
    head, _, body = text.partition("\n")
    if not head.strip().startswith(MARKER):
        return [], None
    words = head.strip().removeprefix(MARKER).split()
    return words, ((first + 2, textwrap.dedent(body)) if body.strip() else None)


def extract(page: Path) -> list[Block]:
    """The ``python`` blocks of `page`, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```python":
            index += 1
            continue
        close = index + 1
        while lines[close].strip() != "```":
            close += 1
        code = textwrap.dedent("\n".join(lines[index + 1 : close]))  # in a list item too
        mode: str | None = None
        options: frozenset[str] = frozenset()
        setup = then = None
        before = _comment_before(lines, index)
        if before is not None:
            words, setup = _parse_comment(before[0], before[1])
            if words and words[0] in MODES:
                mode, options = words[0], frozenset(words[1:])
        after = _comment_after(lines, close)
        if after is not None:
            words, body = _parse_comment(after[0], after[1])
            if words == ["then"]:
                then = body
        blocks.append(Block(page, index + 2, code, mode, options, setup, then))
        index = close + 1
    return blocks


BLOCKS = [block for page in PAGES for block in extract(page)]


def _source(*blocks: Block) -> str:
    """The blocks' setups, code and checks at their lines in the page, the other lines
    blank: tracebacks and mypy name the page's lines."""
    out: list[str] = []
    for block in blocks:
        for part in (block.setup, (block.line, block.code), block.then):
            if part is not None:
                first, text = part
                out += [""] * (first - 1 - len(out))
                out += text.splitlines()
    return "\n".join(out) + "\n"


def test_every_block_is_run_or_type_checked() -> None:
    """Every ``python`` block has a marker the suite acts on, and compiles."""
    assert len(BLOCKS) >= 40
    unmarked = [b.where for b in BLOCKS if b.mode is None]
    assert unmarked == [], "blocks without a <!-- docs-example: run|typecheck --> comment"
    unknown = [(b.where, sorted(b.options - OPTIONS)) for b in BLOCKS if b.options - OPTIONS]
    assert unknown == []
    modules = [b for b in BLOCKS if b.mode == "pytest"]
    assert modules
    for block in modules:  # run by tests/test_testing_plugin.py, which finds them so
        assert block.page == ROOT / "docs" / "testing.md", block.where
        assert re.match(r"# test_\w+\.py\n", block.code), block.where
    for block in BLOCKS:
        compile(_source(block), block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


# Running -----------------------------------------------------------------------------


def _run_groups() -> Iterator[tuple[str, list[Block]]]:
    """The run blocks, grouped by page."""
    for page in PAGES:
        blocks = [b for b in BLOCKS if b.page == page and b.mode == "run"]
        if blocks:
            yield str(page.relative_to(ROOT)), blocks


RUN_GROUPS = dict(_run_groups())


@pytest.fixture
def docs_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the examples of a page expect around them: AWS settings, store URLs."""
    blocks = RUN_GROUPS[request.node.callspec.params["page"]]
    options = frozenset().union(*(b.options for b in blocks))
    # The session's moto server sets the suite's AWS settings when it starts: start it
    # before they are patched here, or undoing the patch would remove them.
    moto = request.getfixturevalue("moto_server") if "dynamodb" in options else None
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.delenv("POWERTOOLS_IDEMPOTENCY_DISABLED", raising=False)
    monkeypatch.setenv("IDEMPOTENCY_STORE_URL", "memory://")
    # No example reaches AWS: without the dynamodb option, AWS clients get a closed port.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aioidempotency-docs/config")
    monkeypatch.setenv(
        "AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aioidempotency-docs/credentials"
    )
    if "redis" in options:
        server = request.getfixturevalue("cache_servers").standalone("valkey")
        server.admin().flushall()
        monkeypatch.setenv("IDEMPOTENCY_STORE_URL", f"valkey://{server.host}:{server.port}")
    if "dynamodb" in options:
        import boto3

        assert moto is not None
        endpoint = moto.endpoint_url
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", endpoint)
        client = boto3.client("dynamodb", endpoint_url=endpoint)
        existing = client.list_tables()["TableNames"]
        for table in TABLES:
            if table in existing:
                client.delete_table(TableName=table)
            client.create_table(
                TableName=table,
                AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
            client.update_time_to_live(
                TableName=table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "expiration"},
            )


def _run(block: Block, module: types.ModuleType, loop: asyncio.AbstractEventLoop) -> None:
    code = compile(_source(block), str(block.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & inspect.CO_COROUTINE:
        loop.run_until_complete(eval(code, module.__dict__))
    else:
        exec(code, module.__dict__)


@pytest.mark.parametrize("page", list(RUN_GROUPS))
@pytest.mark.usefixtures("docs_env")
def test_examples_run(page: str) -> None:
    """A page's run blocks, in order, each in a module of its own unless it continues."""
    loop = asyncio.new_event_loop()
    module: types.ModuleType | None = None
    try:
        for number, block in enumerate(RUN_GROUPS[page]):
            if module is None or "continue" not in block.options:
                module = types.ModuleType(f"docs_example_{Path(page).stem}_{number}")
                sys.modules[module.__name__] = module
            try:
                _run(block, module, loop)
            except Exception as exc:
                raise AssertionError(f"the example at {block.where} failed: {exc!r}") from exc
    finally:
        for name in [n for n in sys.modules if n.startswith("docs_example_")]:
            del sys.modules[name]
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# Type-checking -----------------------------------------------------------------------

MYPY_CONFIG = """\
[mypy]
python_version = 3.11
check_untyped_defs = True
warn_unused_ignores = True
follow_imports = silent
mypy_path = {root}/src:{root}
cache_dir = {root}/.mypy_cache/docs-examples

[mypy-aws_cdk.*,constructs.*,prometheus_client.*,opentelemetry.exporter.*,aioboto3.*,aiobotocore.*,botocore.*,glide.*,jmespath.*,boto3.*]
ignore_missing_imports = True
"""


def _module_text(blocks: list[Block]) -> str:
    """The blocks as one module mypy accepts: a top-level ``await`` moves the code into a
    function, whose header takes the first (blank) line so the lines stay the page's."""
    source = _source(*blocks)
    try:
        compile(source, blocks[0].where, "exec")
    except SyntaxError:
        lines = source.splitlines()
        assert not lines[0].strip(), blocks[0].where
        body = textwrap.indent("\n".join(lines[1:]), "    ")
        source = f"async def _example() -> None:  # noqa\n{body}\n"
    return source


def test_examples_type_check(tmp_path: Path) -> None:
    """The typecheck blocks, one module each (a continuing block joins the previous one),
    checked by one mypy run."""
    modules: dict[str, list[Block]] = {}
    last: str | None = None
    for block in (b for b in BLOCKS if b.mode == "typecheck"):
        if last is None or "continue" not in block.options:
            last = f"ex_{re.sub(r'[^0-9a-zA-Z]', '_', block.where)}"
            modules[last] = []
        modules[last].append(block)
    assert len(modules) >= 5
    pages = {}
    for name, blocks in modules.items():
        (tmp_path / f"{name}.py").write_text(_module_text(blocks))
        pages[name] = str(blocks[0].page.relative_to(ROOT))
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG.format(root=ROOT))
    files = sorted(str(tmp_path / f"{name}.py") for name in modules)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), *files],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        # mypy only reads the library: not worth running under the suite's coverage
        env={k: v for k, v in os.environ.items() if not k.startswith("COVERAGE")},
    )
    report = re.sub(r"(ex_\w+)\.py", lambda m: pages.get(m[1], m[0]), done.stdout)
    assert done.returncode == 0, report + done.stderr
