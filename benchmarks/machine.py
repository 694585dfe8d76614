"""What else the machine was doing during a run: load averages and busy CPU share.

The benchmarks share a small machine with other work; a tool records the machine-wide
CPU use over its run (from ``/proc/stat``) next to its own figures, so that a reader
can tell a quiet run from a busy one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

__all__ = ["LoadWatch"]


def _jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of every CPU since boot, or None without ``/proc/stat``."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already in user
        return total - idle, total
    return None


@dataclasses.dataclass
class LoadWatch:
    """Started at construction; `summary()` describes the machine since then."""

    start: tuple[int, int] | None = dataclasses.field(default_factory=_jiffies)
    load_at_start: tuple[float, float, float] = dataclasses.field(default_factory=os.getloadavg)

    def busy_cores(self) -> float | None:
        """Cores busy on average since the start (every process of the machine)."""
        end = _jiffies()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        cores = os.cpu_count() or 1
        return (end[0] - self.start[0]) / (end[1] - self.start[1]) * cores

    def summary(self) -> dict[str, object]:
        busy = self.busy_cores()
        return {
            "cores": os.cpu_count(),
            "busy_cores": None if busy is None else round(busy, 2),
            "loadavg_1m_start": round(self.load_at_start[0], 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
        }

    def sentence(self) -> str:
        s = self.summary()
        busy = "unknown" if s["busy_cores"] is None else f"{s['busy_cores']:.2f}"
        return (
            f"machine: {s['cores']} cores, {busy} of them busy on average during the run "
            f"(this process, its servers and everything else); 1-minute load average "
            f"{s['loadavg_1m_start']} at the start, {s['loadavg_1m_end']} at the end"
        )
