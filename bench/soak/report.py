"""The soak's result: gathered from the database, Redis and the fault log, then printed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select

from bench.soak.audit import drift, percentile
from bench.soak.faults import Chaos
from billing.db import run_transaction
from billing.verify import verify
from orchestrator.ingress.streams import DEAD_STREAM
from orchestrator.jobs.states import TERMINAL
from orchestrator.tables import jobs


@dataclass
class Outcome:
    accepted: list[Any]
    rejected: list[Any]
    stuck: list[Any]
    by_status: dict[str, int]
    dead: int
    dead_kinds: dict[str, int]
    drifted: int
    drift_notes: list[str]
    problems: list[Any]
    recoveries: list[float]  # seconds from a worker kill to the end of a job it was running
    unrecovered: list[str]
    errors_5xx: dict[int, int]


def gather(engine: Any, redis_port: int, chaos: Chaos, granted: dict[str, int]) -> Outcome:
    def rows(c: Any) -> list[Any]:
        cols = (jobs.c.id, jobs.c.status, jobs.c.worker, jobs.c.finished_at, jobs.c.attempt)
        return list(c.execute(select(*cols)).all())

    all_rows = run_transaction(engine, rows)
    client = redis.Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
    dead: Any = client.xrange(DEAD_STREAM)
    dead_kinds: dict[str, int] = {}
    for _mid, fields in dead:
        dead_kinds[fields.get("kind", "?")] = dead_kinds.get(fields.get("kind", "?"), 0) + 1
    accepted = [r for r in all_rows if r.status != "rejected"]
    by_status: dict[str, int] = {}
    for r in all_rows:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    drifted, drift_notes = drift(engine, granted)
    finished = {r.id: r.finished_at for r in all_rows}
    return Outcome(
        accepted=accepted,
        rejected=[r for r in all_rows if r.status == "rejected"],
        stuck=[r for r in accepted if r.status not in TERMINAL],
        by_status=by_status,
        dead=len(dead),
        dead_kinds=dead_kinds,
        drifted=drifted,
        drift_notes=drift_notes,
        problems=run_transaction(engine, verify),
        recoveries=[
            finished[j].timestamp() - at
            for at, ids in chaos.kills
            for j in ids
            if finished.get(j) is not None
        ],
        unrecovered=sorted({j for _, ids in chaos.kills for j in ids if finished.get(j) is None}),
        errors_5xx={c: k for c, k in chaos.http_codes.items() if c >= 500 and c != 503 or c == 0},
    )


def show(out: Outcome, sent: dict[str, int], chaos: Chaos, work: Path) -> bool:
    """Print the report; True when the soak failed (stuck, drift, verify, 5xx, rejections
    recorded twice)."""
    print()
    print(f"messages sent: {sent}")
    print(
        f"jobs accepted: {len(out.accepted)}; rejected rows: {len(out.rejected)};"
        f" by status: {out.by_status}"
    )
    print(f"dead letters: {out.dead} {out.dead_kinds} (insufficient_credits rows must match)")
    print(f"jobs terminal: {len(out.accepted) - len(out.stuck)}; stuck: {len(out.stuck)}")
    for r in out.stuck:
        cause = " (its worker's main process was killed)" if r.id in chaos.main_kill_jobs else ""
        print(f"  stuck {r.id}: {r.status} on {r.worker} (attempt {r.attempt}){cause}")
    print(f"credits drifted: {out.drifted} {out.drift_notes}")
    print(f"ledger verify: {out.problems if out.problems else 'clean'}")
    print(f"HTTP codes of the API calls: {chaos.http_codes}")
    if out.recoveries:
        print(
            f"recovery after a worker kill: {len(out.recoveries)} jobs, "
            f"p50 {percentile(out.recoveries, 50):.1f} s, "
            f"p99 {percentile(out.recoveries, 99):.1f} s"
        )
    if out.unrecovered:
        print(f"jobs a killed worker was running that never ended: {out.unrecovered}")
    print(f"logs in {work}")
    duplicate_rejections = len(out.rejected) - out.dead_kinds.get("insufficient_credits", 0)
    if duplicate_rejections > 0:
        print(f"rejections recorded more than once: {duplicate_rejections}")
    return bool(
        out.stuck or out.drifted or out.problems or out.errors_5xx or duplicate_rejections > 0
    )
