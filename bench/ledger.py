"""Ledger throughput on PostgreSQL: hold+commit pairs per second against a raw ceiling.

    python bench/ledger.py [--database-url URL] [--seconds 5] [--clients 1,4,16] [--shared]

Each client is a separate process with its own engine (pool of one connection). A *pair* is
two transactions, as the service runs them: `ledger.hold` (10 credits), then `ledger.commit`
(7 of them; the other 3 go back to their grant). By default every client works on its own
account, so clients do not queue on one `balances` row lock; `--shared` adds a row where
all clients of the highest level hold against one account, for contrast.

The ceiling is measured in the same run on the same database: a raw psycopg transaction
`BEGIN; UPDATE <one row>; INSERT <one row>; COMMIT`, each client on its own row. The ratio
pairs/s / raw tx/s is reported per level; the target is >= 0.5 at 16 clients.

When `pgbench` is on PATH, the highest level is measured once more with pgbench (a C client,
no Python) running the same two ledger functions and the same raw transaction: what the SQL
alone allows, i.e. the best ratio any client code could reach on this database and machine.

Without --database-url (or TOLLGATE_BENCH_PG_URL) the bench creates a throwaway database
`tollgate_bench_<random>` next to postgresql+psycopg://postgres@127.0.0.1:5432/test, migrates
it to head and drops it at the end. With a URL given, the database must already be migrated;
the bench adds accounts and grants to it and creates (then drops) two `bench_raw_*` tables.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from billing import ledger
from billing.db import make_engine, run_transaction
from billing.verify import verify
from orchestrator.db import upgrade

ADMIN_URL_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SECONDS_MIN, SECONDS_MAX = 1.0, 30.0
CLIENTS_MAX = 32
HOLD_AMOUNT = 10
COMMIT_AMOUNT = 7
GRANT_AMOUNT = ledger.GRANT_AMOUNT_MAX
TARGET_RATIO = 0.5
WARMUP_ITERATIONS = 3


@dataclass(frozen=True)
class Level:
    clients: int
    pairs_per_s: float
    raw_tx_per_s: float

    @property
    def ratio(self) -> float:
        return self.pairs_per_s / self.raw_tx_per_s if self.raw_tx_per_s else 0.0


# --- database setup ---------------------------------------------------------------------


@contextmanager
def bench_database(url: str | None, admin_url: str) -> Iterator[str]:
    """The URL to benchmark: the one given, or a fresh migrated database dropped afterwards."""
    if url:
        yield url
        return
    name = f"tollgate_bench_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        new_url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        upgrade(new_url)
        yield new_url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as a plain libpq URL for psycopg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


RAW_TABLES = ("bench_raw_counter", "bench_raw_log", "bench_raw_accounts")


def create_raw_tables(url: str, clients: int) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw_counter (id int PRIMARY KEY, n bigint NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw_log (id bigserial PRIMARY KEY, "
            "counter_id int NOT NULL, delta int NOT NULL, created_at timestamp NOT NULL)"
        )
        conn.execute("TRUNCATE bench_raw_counter, bench_raw_log")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO bench_raw_counter (id, n) VALUES (%s, 0)",
                [(i,) for i in range(clients)],
            )


def drop_raw_tables(url: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        for table in RAW_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def funded_accounts(url: str, count: int) -> list[str]:
    engine = make_engine(url, pool_size=1)
    try:

        def work(conn: Any) -> list[str]:
            ids = []
            for _ in range(count):
                account = ledger.create_account(conn, "bench", "business")
                ledger.grant(
                    conn,
                    account,
                    "image",
                    GRANT_AMOUNT,
                    source="purchase",
                    reference=f"bench-grant-{account}",
                )
                ids.append(account)
            return ids

        return run_transaction(engine, work)
    finally:
        engine.dispose()


# --- client processes -------------------------------------------------------------------


def _timed_loop(step: Callable[[int], None], barrier: Any, seconds: float) -> tuple[int, float]:
    for i in range(WARMUP_ITERATIONS):  # connect and warm caches before the clock starts
        step(-1 - i)
    barrier.wait()
    start = time.perf_counter()
    deadline = start + seconds
    done = 0
    while time.perf_counter() < deadline:
        step(done)
        done += 1
    return done, time.perf_counter() - start


def ledger_client(url: str, account: str, barrier: Any, seconds: float, results: Any) -> None:
    engine = make_engine(url, pool_size=1)
    tag = f"bench-{os.getpid()}-{secrets.token_hex(3)}"

    def pair(i: int) -> None:
        reference = f"{tag}-{i}"
        run_transaction(
            engine,
            lambda c: ledger.hold(c, account, "image", HOLD_AMOUNT, reference=reference, ttl_s=600),
        )
        run_transaction(engine, lambda c: ledger.commit(c, reference, COMMIT_AMOUNT))

    try:
        results.put(_timed_loop(pair, barrier, seconds))
    except Exception as exc:  # reported by the parent
        results.put(exc)
        barrier.abort()
    finally:
        engine.dispose()


def raw_client(url: str, row: int, barrier: Any, seconds: float, results: Any) -> None:
    conn = psycopg.connect(libpq_url(url))

    def tx(_i: int) -> None:
        with conn.transaction():
            conn.execute("UPDATE bench_raw_counter SET n = n + 1 WHERE id = %s", (row,))
            conn.execute(
                "INSERT INTO bench_raw_log (counter_id, delta, created_at) "
                "VALUES (%s, 1, now() AT TIME ZONE 'utc')",
                (row,),
            )

    try:
        results.put(_timed_loop(tx, barrier, seconds))
    except Exception as exc:
        results.put(exc)
        barrier.abort()
    finally:
        conn.close()


def run_clients(
    target: Callable[..., None], args_per_client: list[tuple[Any, ...]], seconds: float
) -> float:
    """Start one process per client, all timed from one barrier; total operations per second."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(args_per_client))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(*args, barrier, seconds, results))
        for args in args_per_client
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    # Each client ran for its own `elapsed` (>= seconds); sum the per-client rates.
    return sum(done / elapsed for done, elapsed in outcomes)


# --- the SQL alone (pgbench) -------------------------------------------------------------

PGBENCH_PAIR = f"""\\set r random(1, 1000000000000)
BEGIN;
SELECT r_error FROM tollgate_ledger_hold(
    (SELECT a FROM bench_raw_accounts WHERE c = :client_id), 'image', {HOLD_AMOUNT},
    'pgb-:client_id-:r', 600, (now() AT TIME ZONE 'utc')::timestamp);
COMMIT;
BEGIN;
SELECT r_error FROM tollgate_ledger_resolve(
    'pgb-:client_id-:r', 'committed', {COMMIT_AMOUNT}, (now() AT TIME ZONE 'utc')::timestamp);
COMMIT;
"""
PGBENCH_RAW = """BEGIN;
UPDATE bench_raw_counter SET n = n + 1 WHERE id = :client_id;
INSERT INTO bench_raw_log (counter_id, delta, created_at)
    VALUES (:client_id, 1, now() AT TIME ZONE 'utc');
COMMIT;
"""


def pgbench_level(url: str, accounts: list[str], clients: int, seconds: float) -> Level | None:
    """pairs/s and raw tx/s with pgbench as the client; None without pgbench."""
    exe = shutil.which("pgbench")
    if exe is None:
        return None
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_raw_accounts (c int PRIMARY KEY, a text)")
        conn.execute("TRUNCATE bench_raw_accounts")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO bench_raw_accounts (c, a) VALUES (%s, %s)",
                list(enumerate(accounts[:clients])),
            )
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, script in (("pair", PGBENCH_PAIR), ("raw", PGBENCH_RAW)):
            path = Path(tmp) / f"{name}.sql"
            path.write_text(script)
            out = subprocess.run(
                [exe, "-n", "-M", "simple", "-c", str(clients), "-j", str(min(clients, 4)),
                 "-T", str(max(1, round(seconds))), "-f", str(path), libpq_url(url)],
                capture_output=True, text=True, timeout=seconds + 120, check=False,
            )  # fmt: skip
            found = re.search(r"tps = ([0-9.]+)", out.stdout)
            if out.returncode != 0 or found is None:
                raise RuntimeError(f"pgbench {name} failed: {out.stderr[-500:]}")
            rates.append(float(found.group(1)))
    return Level(clients, rates[0], rates[1])


# --- statement counts -------------------------------------------------------------------


def statements_per_pair(url: str, account: str) -> tuple[int, int]:
    """Round trips the driver makes for one hold and one commit (BEGIN/COMMIT included)."""
    engine = make_engine(url, pool_size=1)
    counts = {"n": 0}

    @event.listens_for(engine, "before_cursor_execute")
    def _count(*_args: Any) -> None:
        counts["n"] += 1

    @event.listens_for(engine, "begin")
    def _begin(_conn: Any) -> None:
        counts["n"] += 1

    @event.listens_for(engine, "commit")
    def _commit(_conn: Any) -> None:
        counts["n"] += 1

    try:
        reference = f"bench-count-{secrets.token_hex(4)}"
        run_transaction(engine, lambda c: c.exec_driver_sql("SELECT 1"))  # connect first
        counts["n"] = 0
        run_transaction(
            engine,
            lambda c: ledger.hold(c, account, "image", HOLD_AMOUNT, reference=reference, ttl_s=600),
        )
        hold_n, counts["n"] = counts["n"], 0
        run_transaction(engine, lambda c: ledger.commit(c, reference, COMMIT_AMOUNT))
        return hold_n, counts["n"]
    finally:
        engine.dispose()


# --- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TOLLGATE_BENCH_PG_URL"),
        help="an existing, migrated PostgreSQL database (default: a throwaway one)",
    )
    parser.add_argument(
        "--admin-url",
        default=ADMIN_URL_DEFAULT,
        help="where to create the throwaway database (default: %(default)s)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (1..30)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument(
        "--shared", action="store_true", help="add a row with every client on one account"
    )
    args = parser.parse_args(argv)
    args.seconds = min(max(args.seconds, SECONDS_MIN), SECONDS_MAX)
    try:
        args.levels = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--clients: expected integers, got {args.clients!r}")
    if not args.levels or not all(1 <= n <= CLIENTS_MAX for n in args.levels):
        parser.error(f"--clients: each level must be in 1..{CLIENTS_MAX}")
    if args.database_url and not args.database_url.startswith("postgresql"):
        parser.error("--database-url: the bench runs on PostgreSQL only")
    return args


def print_table(levels: list[Level], shared: Level | None) -> None:
    print(f"{'clients':>16}{'pairs/s':>10}{'raw tx/s':>10}{'ratio':>8}")
    for lv in levels:
        print(f"{lv.clients:>16}{lv.pairs_per_s:>10.1f}{lv.raw_tx_per_s:>10.1f}{lv.ratio:>8.2f}")
    if shared is not None:
        label = f"{shared.clients} (shared)"
        print(
            f"{label:>16}{shared.pairs_per_s:>10.1f}{shared.raw_tx_per_s:>10.1f}{shared.ratio:>8.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    top = max(args.levels)
    with bench_database(args.database_url, args.admin_url) as url:
        print(f"database: {make_url(url).database}  seconds per measurement: {args.seconds:g}")
        print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}")
        accounts = funded_accounts(url, top)
        create_raw_tables(url, top)
        try:
            hold_n, commit_n = statements_per_pair(url, accounts[0])
            print(
                f"round trips: hold {hold_n}, commit {commit_n} (BEGIN/COMMIT included; no pool"
                " pre-ping); raw tx 4 (BEGIN, UPDATE, INSERT, COMMIT)"
            )
            print(
                "each client: its own process, engine and account (no shared row lock); "
                f"a pair = hold {HOLD_AMOUNT} + commit {COMMIT_AMOUNT}, two transactions\n"
            )
            levels = []
            for n in args.levels:
                pairs = run_clients(
                    ledger_client, [(url, accounts[i]) for i in range(n)], args.seconds
                )
                raw = run_clients(raw_client, [(url, i) for i in range(n)], args.seconds)
                levels.append(Level(n, pairs, raw))
            shared = None
            if args.shared:
                pairs = run_clients(ledger_client, [(url, accounts[0])] * top, args.seconds)
                raw = run_clients(raw_client, [(url, 0)] * top, args.seconds)
                shared = Level(top, pairs, raw)
            print_table(levels, shared)
            if args.shared:
                print(f"(shared: all {top} clients on one account / one raw row)")
            floor = pgbench_level(url, accounts, top, args.seconds)
            if floor is not None:
                print(
                    f"the SQL alone (pgbench, a C client, {top} clients): "
                    f"pairs/s {floor.pairs_per_s:.1f}, raw tx/s {floor.raw_tx_per_s:.1f}, "
                    f"ratio {floor.ratio:.2f}"
                )
            engine = make_engine(url, pool_size=1)
            problems = run_transaction(engine, verify)
            engine.dispose()
            print(f"ledger verify: {'ok' if not problems else f'{len(problems)} violation(s)'}")
        finally:
            drop_raw_tables(url)
    at = {lv.clients: lv for lv in levels}
    goal = at.get(16) or levels[-1]
    met = goal.ratio >= TARGET_RATIO
    print(
        f"target ratio >= {TARGET_RATIO} at {goal.clients} clients: "
        f"{'MET' if met else 'NOT MET'} ({goal.ratio:.2f})"
    )
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
