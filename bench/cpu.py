"""CPU time by process group, read from /proc (Linux), so a bench can say where a job's
time goes: ms of CPU per job for PostgreSQL, Redis, the Celery worker, the intake, the API and
the bench's own client. Processes that exit between two snapshots are not counted."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# (group, what its command line or process name contains), first match wins.
GROUPS = (
    ("postgres", "postgres"),
    ("redis", "redis-server"),
    ("celery worker", "celery"),
    ("intake", "orchestrator intake"),
    ("api", "orchestrator api"),
)


def _group(pid: str, name: str, cmdline: str) -> str:
    if pid == str(os.getpid()):
        return "bench client"
    for group, needle in GROUPS:
        if needle in name or needle in cmdline:
            return group
    return "other"


def snapshot() -> Counter[str]:
    """Cumulative user+system CPU seconds of every live process, summed by group."""
    out: Counter[str] = Counter()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        out[_group(entry.name, name, cmdline)] += ticks / CLOCK_TICKS_PER_S
    return out


def per_job_ms(before: Counter[str], after: Counter[str], jobs: int) -> dict[str, float]:
    """CPU milliseconds per job for each group that used any, largest first."""
    spent = {k: (after[k] - before[k]) * 1000 / jobs for k in after}
    return dict(sorted(((k, v) for k, v in spent.items() if v > 0), key=lambda kv: -kv[1]))


def describe(ms: dict[str, float]) -> str:
    total = sum(ms.values())
    parts = ", ".join(f"{k} {v:.2f}" for k, v in ms.items() if v >= 0.01)
    return f"{total:.2f} ms ({parts})"
