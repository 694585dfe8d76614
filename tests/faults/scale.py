"""How big the fault suite runs: ``AIOIDEM_FAULT_SCALE=ci`` (default) or ``full``.

Every `nox -s tests` runs the fault tests CI-sized (the whole fault suite adds a couple
of minutes at most); `nox -s faults` runs them full-sized. Tests ask `scale()` or
`pick(ci=..., full=...)` for their counts instead of reading the variable themselves.
"""

from __future__ import annotations

import os
from typing import Literal, TypeVar

__all__ = ["ENV", "Scale", "is_full", "pick", "scale"]

ENV = "AIOIDEM_FAULT_SCALE"
Scale = Literal["ci", "full"]
T = TypeVar("T")


def scale() -> Scale:
    """The scale asked for in the environment; anything but ``full`` means ``ci``."""
    value = os.environ.get(ENV, "ci").strip().lower()
    if value not in {"ci", "full"}:
        raise ValueError(f"{ENV} must be 'ci' or 'full', not {value!r}")
    return "full" if value == "full" else "ci"


def is_full() -> bool:
    """True under ``AIOIDEM_FAULT_SCALE=full``."""
    return scale() == "full"


def pick(*, ci: T, full: T) -> T:
    """`ci` or `full` according to the scale, e.g. ``rounds = pick(ci=20, full=500)``."""
    return full if is_full() else ci
