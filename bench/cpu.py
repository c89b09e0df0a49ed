"""CPU time by process group, read from /proc (Linux), so a bench can say where a job's
time goes: ms of CPU per job for PostgreSQL, Redis, the Celery worker, the intake, the API and
the bench's own client. Processes that exit between two snapshots are not counted.

The box is shared (other sessions run tests and benches on it), so a snapshot can be scoped
(`Scope`): only the bench's own process tree, plus the PostgreSQL backends connected to the
bench's database (named in their process title). PostgreSQL's background processes (WAL
writer, checkpointer...) serve every database: they are counted apart, as "postgres aux",
and only with a scope. Without a scope every process of the machine is counted."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
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
# Background processes of the PostgreSQL server (shared by every database on it).
PG_AUX = ("walwriter", "checkpointer", "background writer", "autovacuum", "logical replication")


@dataclass(frozen=True)
class Scope:
    """What a snapshot counts: the tree under `root_pid` and the backends of `database`."""

    root_pid: int
    database: str | None = None


def _group(pid: str, name: str, cmdline: str) -> str:
    if pid == str(os.getpid()):
        return "bench client"
    for group, needle in GROUPS:
        if needle in name or needle in cmdline:
            return group
    return "other"


def _read(entry: Path) -> tuple[str, str, int, int] | None:
    """(name, cmdline, parent pid, ticks) of a process, None if it exited meanwhile."""
    try:
        stat = (entry / "stat").read_text()
        cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return name, cmdline, int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime+stime


def snapshot(scope: Scope | None = None) -> Counter[str]:
    """Cumulative user+system CPU seconds of every live process (in `scope`), by group."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _read(entry)) is not None:
            procs[int(entry.name)] = info
    out: Counter[str] = Counter()
    mine = _tree(procs, scope.root_pid) if scope is not None else set(procs)
    for pid, (name, cmdline, _, ticks) in procs.items():
        group = None
        if pid in mine:
            group = _group(str(pid), name, cmdline)
        elif scope is not None and cmdline.startswith("postgres: "):
            if scope.database and f" {scope.database} " in cmdline:
                group = "postgres"
            elif any(aux in cmdline for aux in PG_AUX):
                group = "postgres aux"
        if group is not None:
            out[group] += ticks / CLOCK_TICKS_PER_S
    return out


def _tree(procs: dict[int, tuple[str, str, int, int]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, _, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:  # bounded: each pid is visited once
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo += children.get(pid, [])
    return found


def per_job_ms(before: Counter[str], after: Counter[str], jobs: int) -> dict[str, float]:
    """CPU milliseconds per job for each group that used any, largest first."""
    spent = {k: (after[k] - before[k]) * 1000 / jobs for k in after}
    return dict(sorted(((k, v) for k, v in spent.items() if v > 0), key=lambda kv: -kv[1]))


def describe(ms: dict[str, float]) -> str:
    total = sum(ms.values())
    parts = ", ".join(f"{k} {v:.2f}" for k, v in ms.items() if v >= 0.01)
    return f"{total:.2f} ms ({parts})"
