"""A `HandlerLoop` of one's own (not the process's shared one, whose at-fork hook is
registered) used in a forked child notices the fork on its next invocation: the child
starts a loop of its own and leaves the parent's alone."""

from __future__ import annotations

import json
import os
import time

import pytest

from aioidempotency.aws_lambda import HandlerLoop


async def where() -> dict[str, int]:
    return {"pid": os.getpid()}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_handler_loop_without_the_fork_hook_starts_afresh_in_the_child() -> None:
    loop = HandlerLoop()
    try:
        assert loop.run(where()) == {"pid": os.getpid()}
        parent_loop = loop.loop()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                result = loop.run(where())
                report = {
                    "result": result,
                    "fresh": loop.loop() is not parent_loop,
                    "created": loop.created,
                    "parent_loop_closed": parent_loop.is_closed(),
                }
                os.write(write_end, json.dumps(report).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        deadline = time.monotonic() + 30
        while True:
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                break
            assert time.monotonic() < deadline, "the forked child hung"
            time.sleep(0.01)  # polling a child process, bounded by the deadline
        with os.fdopen(read_end) as pipe:
            report = json.loads(pipe.read())
        assert os.waitstatus_to_exitcode(status) == 0
        assert report == {
            "result": {"pid": pid},
            "fresh": True,
            "created": 2,
            "parent_loop_closed": False,
        }
        assert loop.loop() is parent_loop, "the parent keeps its loop"
        assert loop.created == 1
    finally:
        loop.close(timeout=5)
