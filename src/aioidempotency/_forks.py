"""How many forks this process descends from: one counter for every fork-aware part."""

from __future__ import annotations

import os

__all__ = ["fork_generation"]

_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def fork_generation() -> int:
    """How many forks this process descends from (0 in the process that started): a
    holder compares it with the value it saw when it took its clients."""
    return _generation
