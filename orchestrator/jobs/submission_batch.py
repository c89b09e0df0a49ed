"""Submitting a batch of jobs with one transaction per account (the Redis intake's
batches, PostgreSQL).

`submit_many` gives each request its own outcome, exactly what `service.submit` would give
it alone, and commits the plain new jobs of each account together:

- one statement finds which requests were seen before (a job under their id: a replayed
  message; or under their idempotency key);
- per account, the submit statement of each new plain job (`submission_pg.
  SUBMIT_ENQUEUE_SQL`: hold, job row, event row, queue entry) goes out pipelined (psycopg
  `executemany`, one round trip), then one COMMIT that waits for the WAL flush, as each
  submit's did.

An account's transaction is all or nothing, so no request can change another's outcome: a
hold the ledger refuses (insufficient credits) rolls it back, and it runs again without
that request, at most `BATCH_REFUSALS_MAX` times. Every request a transaction does not take
(refused, seen before, a family with its own submit rows, an input image, an invalid spec,
a repeated idempotency key, an unknown account) is then submitted alone by
`service.submit`, which records a rejection, answers a replay or raises the request's own
error. One transaction per account, not per batch: see `_by_account` (lock order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine

from billing import BillingError, ledger
from billing.clock import utcnow
from billing.db import is_transient, run_transaction
from orchestrator.db import single_statements
from orchestrator.errors import OrchestratorError
from orchestrator.jobs import kinds, specs, submission_pg, webhooks
from orchestrator.jobs import service as jobs
from orchestrator.jobs.deadlines import hold_ttl_s
from orchestrator.jobs.families import family_for
from orchestrator.jobs.records import view
from orchestrator.settlement import alerts
from orchestrator.storage import Storage
from orchestrator.tables import IDEMPOTENCY_KEY_MAX_LEN

BATCH_MAX: Final = 64  # requests per transaction (holds are locked until its COMMIT)
BATCH_REFUSALS_MAX: Final = 2  # batch reruns after refused holds; then each goes alone

# Which requests were seen before: a job under the request's id, or under its key.
SEEN_SQL: Final = (
    "SELECT m.i FROM unnest(%(ids)s::text[], %(accounts)s::text[], %(keys)s::text[])"
    " WITH ORDINALITY AS m(job_id, account_id, key, i)"
    " WHERE EXISTS (SELECT 1 FROM jobs AS j WHERE j.id = m.job_id)"
    " OR EXISTS (SELECT 1 FROM jobs AS j WHERE j.account_id = m.account_id"
    " AND j.idempotency_key = m.key)"
)


@dataclass(frozen=True)
class Request:
    """One job to submit, as `service.submit` takes it (`job_id`: the caller's id)."""

    account_id: str
    spec: Any
    job_id: str
    idempotency_key: str | None = None
    callback_url: str | None = None
    webhook_events_filter: Any = None
    source: str = "redis"


Outcome = jobs.Submitted | Exception


@dataclass
class _New:
    index: int
    values: dict[str, Any]
    ttl_s: int
    task: str


class _Refused(OrchestratorError):
    """Requests an account's transaction cannot take (a refused hold; on a rerun, a job it
    already inserted): roll it back and run it again without them."""

    def __init__(self, indexes: list[int]) -> None:
        super().__init__(f"{len(indexes)} holds refused")
        self.indexes = indexes


def submit_many(engine: Engine, storage: Storage, requests: Sequence[Request]) -> list[Outcome]:
    """Each request's `Submitted`, or the exception `service.submit` raises for it alone.
    A database outage past the retry budget is every remaining request's outcome."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    for start in range(0, len(requests), BATCH_MAX):
        chunk = list(range(start, min(start + BATCH_MAX, len(requests))))
        try:
            _submit_chunk(engine, storage, requests, chunk, outcomes)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return [o if o is not None else exc for o in outcomes]
    return [o if o is not None else AssertionError("no outcome") for o in outcomes]


def _submit_chunk(
    engine: Engine,
    storage: Storage,
    requests: Sequence[Request],
    chunk: list[int],
    outcomes: list[Outcome | None],
) -> None:
    batch = _batchable(engine, requests, chunk)
    alone = [i for i in chunk if i not in {n.index for n in batch}]
    if batch:
        seen = run_transaction(single_statements(engine), partial(_seen, batch=batch))
        alone += [n.index for n in batch if n.index in seen]
        batch = [n for n in batch if n.index not in seen]
    for group in _by_account(batch):
        for _ in range(BATCH_REFUSALS_MAX + 1):
            if not group:
                break
            try:
                tries = [0]
                taken = run_transaction(engine, partial(_submit_group, group=group, tries=tries))
            except _Refused as refused:
                alone += refused.indexes
                group = [n for n in group if n.index not in refused.indexes]
                continue
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database is down: every remaining request retries
                break  # e.g. a replay that committed meanwhile: the group goes alone
            for n, row in taken:
                outcomes[n.index] = jobs.Submitted(view(row), created=True)
            group = []
        alone += [n.index for n in group]  # refused too often: each goes alone
    for i in sorted(alone):
        outcomes[i] = _submit_alone(engine, storage, requests[i])


def _by_account(batch: list[_New]) -> list[list[_New]]:
    """One group per account, in order. A group's transaction holds only its account's
    balance and flow rows: a transaction holding one account's flow row while it waits for
    another account's balance row would close a cycle with a job's end (balance, then
    flow) and a dispatch pass (flows) of that other account."""
    groups: dict[str, list[_New]] = {}
    for n in batch:
        groups.setdefault(n.values["account_id"], []).append(n)
    return list(groups.values())


def _submit_alone(engine: Engine, storage: Storage, r: Request) -> Outcome:
    try:
        return jobs.submit(
            engine,
            storage,
            r.account_id,
            r.spec,
            idempotency_key=r.idempotency_key,
            callback_url=r.callback_url,
            webhook_events_filter=r.webhook_events_filter,
            source=r.source,
            job_id=r.job_id,
        )
    except Exception as exc:
        return exc


def _batchable(engine: Engine, requests: Sequence[Request], chunk: list[int]) -> list[_New]:
    """The chunk's plain new jobs, priced, in order (the rest go alone)."""
    if engine.dialect.name != "postgresql":
        return []
    out: list[_New] = []
    keys: set[tuple[str, str]] = set()
    for i in chunk:
        r = requests[i]
        key = r.idempotency_key
        if key is not None and (
            not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX_LEN or (r.account_id, key) in keys
        ):
            continue  # an error, or a second use in the batch: alone, after the first
        try:
            callback_url = specs.validate_callback_url(r.callback_url)
            events = webhooks.validate_events_filter(r.webhook_events_filter)
            normalised, price = specs.validate(r.spec)
            kind = kinds.kind_for(normalised["type"])
        except Exception:
            continue  # alone: it raises there, after its idempotency check
        spec = dict(normalised)
        plain = kind.before_insert is None and kind.after_hold is None
        if not plain or (kind.takes_input_image and ("image_id" in spec or "image_b64" in spec)):
            continue
        ttl_s = hold_ttl_s(spec)
        try:
            ledger.check_hold(price.credit_kind, price.credits, ttl_s, r.job_id)
        except Exception:
            continue
        if key is not None:
            keys.add((r.account_id, key))
        digest = jobs.request_hash(r.spec, callback_url, events)
        values = jobs.new_job_values(
            r.job_id,
            r.account_id,
            spec,
            price,
            r.source,
            utcnow(),
            key,
            digest,
            callback_url,
            events,
        )
        out.append(_New(i, values, ttl_s, spec["type"]))
    return out


def _seen(conn: Connection, batch: list[_New]) -> set[int]:
    """The requests seen before (their index). Read outside the groups' transactions: a
    replay committed after this read makes its group's insert fail on the job's id or key,
    and that group's requests then go alone."""
    params = {
        "ids": [n.values["id"] for n in batch],
        "accounts": [n.values["account_id"] for n in batch],
        "keys": [n.values["idempotency_key"] for n in batch],
    }
    return {batch[int(r[0]) - 1].index for r in conn.exec_driver_sql(SEEN_SQL, params)}


def _submit_group(conn: Connection, group: list[_New], tries: list[int]) -> list[tuple[_New, Any]]:
    """One account's new jobs in the caller's transaction; raises _Refused (rolling it back)
    when the ledger refuses a hold. A rerun (after a conflict, or a COMMIT whose answer was
    lost) first looks for the jobs an earlier try inserted: those go alone, and find
    themselves there."""
    tries[0] += 1
    if tries[0] > 1:
        again = _seen(conn, group)
        if again:
            raise _Refused(sorted(again))
    statements = [
        submission_pg.submit_params(
            n.values,
            n.ttl_s,
            jobs.queued_event(n.values),
            n.values["created_at"],
            enqueue=(n.task, family_for(n.task).queue),
        )
        for n in group
    ]
    driver = conn.connection.driver_connection
    assert driver is not None
    rows = []
    with driver.cursor(row_factory=namedtuple_row) as cur:
        # Pipelined: every statement is sent before the first answer is read.
        cur.executemany(statements[0][0], [params for _, params in statements], returning=True)
        while True:
            rows.append(cur.fetchone())
            if not cur.nextset():
                break
    if len(rows) != len(group):
        raise AssertionError(f"batch submit answered {len(rows)} rows for {len(group)} jobs")
    refused, taken = [], []
    for n, row in zip(group, rows, strict=True):
        try:
            job, has_alert = submission_pg.submitted_row(row, n.values)
        except BillingError:
            refused.append(n.index)
            continue
        taken.append((n, job, has_alert))
    if refused:
        raise _Refused(refused)
    for n, _, has_alert in taken:
        if has_alert:
            v = n.values
            alerts.check(conn, v["account_id"], v["credit_kind"], v["created_at"], v["id"])
    return [(n, job) for n, job, _ in taken]
