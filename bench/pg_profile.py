"""Which SQL statements a bench spends PostgreSQL's time on, on a private throwaway cluster.

    python bench/pg_profile.py [--jobs N] [--top 25] -- bench/lifecycle.py --jobs 400

Starts a PostgreSQL 15 cluster of its own (initdb into a temp dir, a free port on 127.0.0.1,
trust auth, pg_stat_statements with track=all and track_planning=on; fsync and
synchronous_commit at their defaults, autovacuum off as on the shared server), runs the bench
with TOLLGATE_BENCH_PG_ADMIN_URL pointing at it, prints the top statements, the row writes
per table, WAL and commits, all per job, then stops the cluster and deletes it (also on
Ctrl-C or an error). As root, initdb refuses to run: the cluster is then run as the
`postgres` user (`runuser -u postgres`) in a temp dir chowned to it; the bench stays root.

Scope: the bench creates a fresh `tollgate_bench_<random>` database and drops it at the end,
taking its table counters with it. So a bench calls `phase_start(db_url)` / `phase_end(db_url)`
around the part that matters (no-ops unless run under this tool): bench/lifecycle.py around
its whole-path part, bench/api.py around its `POST /v1/jobs` wrk run. The figures then cover
that part only, and "per job" divides by the jobs created in it (`--jobs` overrides). A bench
without the hooks is profiled whole (stats reset before it starts, setup and baseline parts
included), statements and WAL only. Nested statements (track=all, `top` = n) are also counted
inside their caller's time. Autovacuum is off (as on the shared server), so the bench's
fresh tables are never analyzed; `--analyze` runs ANALYZE at phase_start, as autovacuum
would have by then in a long-running deployment (it changes some plan-cache choices).
Table and WAL counters reach the shared stats up to 10 s late from an idle backend, so
`phase_start` waits STATS_FLUSH_WAIT_S before resetting them (or they would land in the
part) and `phase_end` before reading them; pg_stat_statements has no such lag.

Exec time is wall time in the backend: row-lock waits and the commit's WAL fsync count too.
So pg_stat_activity is also sampled at 50 Hz during the run, and the backend ms per job are
split into on CPU (running or runnable) and each wait event, in total and per top-level
statement: that is the part to compare with the CPU figures of bench/lifecycle.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PHASE_FILE_ENV = "TOLLGATE_BENCH_PG_PROFILE"  # where phase_end writes its figures (JSON)
ADMIN_URL_ENV = "TOLLGATE_BENCH_PG_ADMIN_URL"
ANALYZE_ENV = "TOLLGATE_BENCH_PG_ANALYZE"  # "1": phase_start runs ANALYZE first (--analyze)
STATS_FLUSH_WAIT_S = 11  # PGSTAT_IDLE_INTERVAL (10 s) plus a margin
READY_TIMEOUT_S = 60
TOP_DEFAULT = 25
QUERY_CHARS_MAX = 160
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.track_planning": "on",
    "autovacuum": "off",  # as on the shared server (its postgresql.conf)
    "shared_buffers": "128MB",
    "timezone": "'Etc/UTC'",
}
STATEMENTS_SQL = """
SELECT queryid, calls, plans, total_exec_time, total_plan_time, rows, shared_blks_dirtied,
       wal_bytes::bigint AS wal_bytes, toplevel, query
FROM pg_stat_statements
WHERE dbid {} AND query NOT ILIKE '%%pg_stat%%'
"""
TABLES_SQL = """
SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables
"""
WAL_SQL = "SELECT wal_records, wal_fpi, wal_bytes::bigint AS wal_bytes FROM pg_stat_wal"
SAMPLE_INTERVAL_S = 0.02  # pg_stat_activity at 50 Hz: what active backends wait on
SAMPLE_SQL = """
SELECT query_id, coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity
WHERE state = 'active' AND backend_type = 'client backend' AND datname <> 'postgres'
"""
DATABASE_SQL = """
SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, sessions,
       active_time, idle_in_transaction_time
FROM pg_stat_database WHERE datname = current_database()
"""


def _libpq(url: str) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://...) as a libpq one."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def _rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with psycopg.connect(_libpq(url), autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def _reset(db_url: str | None) -> None:
    admin = os.environ[ADMIN_URL_ENV]
    _rows(admin, "SELECT pg_stat_statements_reset(), pg_stat_reset_shared('wal')")
    if db_url:
        _rows(db_url, "SELECT pg_stat_reset()")  # this database's table and xact counters


def phase_start(db_url: str) -> None:
    """Reset the statistics right before the part a bench wants profiled (no-op unless run
    under bench/pg_profile.py)."""
    path = os.environ.get(PHASE_FILE_ENV)
    if not path:
        return
    if os.environ.get(ANALYZE_ENV) == "1":  # what autovacuum would have done by now
        _rows(db_url, "ANALYZE")
    time.sleep(STATS_FLUSH_WAIT_S)  # idle backends' counters from before land first
    _reset(db_url)
    jobs = _rows(db_url, "SELECT count(*) AS n FROM jobs")[0]["n"]
    Path(path).write_text(json.dumps({"jobs_before": jobs, "t_start": time.time()}))


def phase_end(db_url: str) -> None:
    """Record the figures of the part since phase_start (no-op unless under the tool)."""
    path = os.environ.get(PHASE_FILE_ENV)
    if not path:
        return
    admin, db = os.environ[ADMIN_URL_ENV], db_url.rsplit("/", 1)[1].split("?")[0]
    where = "= (SELECT oid FROM pg_database WHERE datname = %s)"
    statements = _rows(admin, STATEMENTS_SQL.format(where), (db,))  # exact, no flush lag
    t_end = time.time()
    time.sleep(STATS_FLUSH_WAIT_S)
    jobs = _rows(db_url, "SELECT count(*) AS n FROM jobs")[0]["n"]
    start = json.loads(Path(path).read_text())
    figures = {
        "scope": "the bench's profiled part (phase_start .. phase_end)",
        "window": [start["t_start"], t_end],
        "jobs": jobs - start["jobs_before"],
        "statements": statements,
        "tables": _rows(db_url, TABLES_SQL),
        "database": _rows(db_url, DATABASE_SQL)[0],
        "wal": _rows(admin, WAL_SQL)[0],
    }
    Path(path).write_text(json.dumps(figures, default=float))


def sample(admin: str, stop: threading.Event, ticks: list[float], out: list[Any]) -> None:
    """Until `stop`: every SAMPLE_INTERVAL_S, (time, query_id, wait) of each active backend."""
    with psycopg.connect(_libpq(admin), autocommit=True) as conn:
        while not stop.wait(SAMPLE_INTERVAL_S):
            now = time.time()
            ticks.append(now)
            out.extend((now, q, w) for q, w in conn.execute(SAMPLE_SQL))


# --- the private cluster -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quiet(argv: list[str], *, check: bool = True) -> None:
    subprocess.run(argv, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


@contextmanager
def private_cluster() -> Iterator[tuple[str, Path]]:
    """(admin URL, temp dir) of a fresh cluster, stopped and deleted on the way out."""
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-pgprof-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root
        pg = pwd.getpwnam("postgres")
        os.chown(tmp, pg.pw_uid, pg.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = tmp / "data", _free_port()
    pg_ctl = [*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data)]
    try:
        initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        _quiet([*run_as, *initdb, "-E", "UTF8", "--locale=C.UTF-8"])
        conf = {**SETTINGS, "port": str(port), "unix_socket_directories": f"'{tmp}'"}
        with open(data / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        _quiet([*pg_ctl, "-l", str(tmp / "server.log"), "-w", "-t", str(READY_TIMEOUT_S), "start"])
        admin = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        _rows(admin, "CREATE EXTENSION pg_stat_statements")
        yield admin, tmp
    finally:
        if (data / "postmaster.pid").exists():
            _quiet([*pg_ctl, "-m", "fast", "-w", "stop"], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def run_bench(command: list[str], env: dict[str, str]) -> int:
    argv = [sys.executable, *command] if command[0].endswith(".py") else command
    child = subprocess.Popen(argv, env=env)
    try:
        return child.wait()
    except SystemExit:  # our SIGTERM (see main): the bench cleans up as on a Ctrl-C
        child.send_signal(signal.SIGINT)
        raise
    finally:  # Ctrl-C reaches the bench too (same process group): let it clean up first
        if child.poll() is None:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


# --- the report --------------------------------------------------------------------------


def report(figures: dict[str, Any], jobs: int, top: int) -> None:
    print(f"\nPostgreSQL profile: {figures['scope']}; per job = / {jobs} jobs")
    stmts = sorted(
        figures["statements"], key=lambda s: -(s["total_exec_time"] + s["total_plan_time"])
    )
    head = ["calls", "/job", "exec ms/j", "plan ms/j", "mean ex", "mean pl", "plans/c"]
    head += ["rows/j", "dirty/j", "walB/j"]
    print("".join(f"{h:>10}" for h in head) + "  top query")
    for s in stmts[:top]:
        query = " ".join(s["query"].split())[:QUERY_CHARS_MAX]
        calls, plans, ex, pl = s["calls"], s["plans"], s["total_exec_time"], s["total_plan_time"]
        cells = [calls / jobs, ex / jobs, pl / jobs, ex / max(calls, 1), pl / max(plans, 1)]
        cells += [plans / max(calls, 1), s["rows"] / jobs, s["shared_blks_dirtied"] / jobs]
        line = f"{calls:>10}" + "".join(f"{c:>10.3f}" for c in cells)
        print(f"{line}{s['wal_bytes'] / jobs:>10.0f}  {'y' if s['toplevel'] else 'n':>3} {query}")
    level = [s for s in stmts if s["toplevel"]]
    print(
        f"top-level statements: {len(level)}, {sum(s['calls'] for s in level) / jobs:.1f} calls,"
        f" exec {sum(s['total_exec_time'] for s in level) / jobs:.3f} ms,"
        f" plan {sum(s['total_plan_time'] for s in level) / jobs:.3f} ms per job"
    )
    if figures.get("tables"):
        print(f"\n{'table':<28}{'ins/job':>10}{'upd/job':>10}{'hot/job':>10}{'del/job':>10}")
        keys = ("n_tup_ins", "n_tup_upd", "n_tup_hot_upd", "n_tup_del")
        writes = sorted(figures["tables"], key=lambda t: -(t["n_tup_ins"] + t["n_tup_upd"]))
        for t in writes:
            if any(t[k] for k in keys):
                print(f"{t['relname']:<28}" + "".join(f"{t[k] / jobs:>10.2f}" for k in keys))
        print(
            f"{'all tables':<28}"
            + "".join(f"{sum(t[k] for t in writes) / jobs:>10.2f}" for k in keys)
        )
    wal = figures["wal"]
    print(
        f"\nWAL per job: {wal['wal_records'] / jobs:.1f} records, {wal['wal_bytes'] / jobs:.0f}"
        f" bytes, {wal['wal_fpi'] / jobs:.2f} full-page images (whole cluster)"
    )
    if db := figures.get("database"):
        print(
            f"commits per job: {db['xact_commit'] / jobs:.2f} (rollbacks"
            f" {db['xact_rollback'] / jobs:.2f}); rows inserted {db['tup_inserted'] / jobs:.1f},"
            f" updated {db['tup_updated'] / jobs:.1f}, deleted {db['tup_deleted'] / jobs:.1f}"
        )
        # Time of sessions that ended or were idle at the read (PG 15: running ones lag).
        print(
            f"new sessions per job: {db['sessions'] / jobs:.3f}; backend time per job: active"
            f" {db['active_time'] / jobs:.2f} ms, idle in transaction"
            f" {db['idle_in_transaction_time'] / jobs:.2f} ms"
        )


def report_samples(figures: dict[str, Any], jobs: int, top: int) -> None:
    """Sampled backend time per job: on CPU (or runnable) vs each wait, total and by statement."""
    t0, t1 = figures["window"]
    ticks = [t for t in figures["ticks"] if t0 <= t <= t1]
    if not ticks:
        return
    ms = (t1 - t0) * 1000 / len(ticks) / jobs  # backend ms per job that one sample stands for
    texts = {s["queryid"]: " ".join(s["query"].split()) for s in figures["statements"]}
    by_wait: dict[str, int] = {}
    by_query: dict[Any, dict[str, int]] = {}
    for t, query_id, wait in figures["samples"]:
        if t0 <= t <= t1:
            by_wait[wait] = by_wait.get(wait, 0) + 1
            waits = by_query.setdefault(query_id, {})
            waits[wait] = waits.get(wait, 0) + 1
    print(f"\nsampled active backends ({len(ticks)} samples over {t1 - t0:.1f} s), ms per job:")
    print(
        "  "
        + ", ".join(f"{w} {n * ms:.2f}" for w, n in sorted(by_wait.items(), key=lambda x: -x[1]))
    )
    print(f"{'ms/job':>8}{'CPU':>8}  top waits  query (top-level)")
    for query_id, waits in sorted(by_query.items(), key=lambda x: -sum(x[1].values()))[:top]:
        other = sorted(((w, n) for w, n in waits.items() if w != "CPU"), key=lambda x: -x[1])
        other_text = ", ".join(f"{w} {n * ms:.2f}" for w, n in other[:2])
        query = texts.get(query_id, f"queryid {query_id}")[:100]
        cpu_ms, all_ms = waits.get("CPU", 0) * ms, sum(waits.values()) * ms
        print(f"{all_ms:>8.2f}{cpu_ms:>8.2f}  {other_text}  {query}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, help="divide by this (default: the part's jobs)")
    parser.add_argument("--top", type=int, default=TOP_DEFAULT, help="statements to print")
    parser.add_argument(
        "--analyze", action="store_true", help="ANALYZE the bench database at phase_start"
    )
    parser.add_argument("command", nargs="+", help="the bench: -- bench/lifecycle.py ...")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cluster goes too
    with private_cluster() as (admin, tmp):
        phase_file = tmp / "phase.json"
        env = {**os.environ, ADMIN_URL_ENV: admin, PHASE_FILE_ENV: str(phase_file)}
        env[ANALYZE_ENV] = "1" if args.analyze else "0"
        env.pop("TOLLGATE_BENCH_PG_URL", None)  # bench/ledger.py would use that server
        os.environ[ADMIN_URL_ENV] = admin
        _reset(None)
        stop, ticks, samples = threading.Event(), list[float](), list[Any]()
        sampler = threading.Thread(target=sample, args=(admin, stop, ticks, samples), daemon=True)
        sampler.start()
        t_start = time.time()
        try:
            rc = run_bench(args.command, env)
        finally:
            stop.set()
            sampler.join(timeout=5)
        if phase_file.exists() and "statements" in json.loads(phase_file.read_text()):
            figures = json.loads(phase_file.read_text())
        else:  # no hooks: the whole run, every database but the admin one
            time.sleep(STATS_FLUSH_WAIT_S)
            where = "<> (SELECT oid FROM pg_database WHERE datname = 'postgres')"
            figures = {
                "scope": "the whole bench run (no phase hooks), every bench database",
                "window": [t_start, time.time()],
                "statements": _rows(admin, STATEMENTS_SQL.format(where)),
                "wal": _rows(admin, WAL_SQL)[0],
            }
        jobs = args.jobs or figures.get("jobs") or 1
        report(figures, jobs, args.top)
        report_samples({**figures, "ticks": ticks, "samples": samples}, jobs, args.top)
    if rc:
        sys.exit(f"the bench exited with {rc}")


if __name__ == "__main__":
    main()
