"""worker functions: a job's begin and finish in one round trip each on PostgreSQL

Revision ID: 0011
Revises: 0010

`orchestrator/execution/start.py` and `result.py` call these on PostgreSQL for a plain job
(the usual case); SQLite keeps the Python (Core) path, so this migration does nothing
there. Each function takes the job's row lock first and does what the Python path does,
step for step, or changes nothing and says so (begin: no row; finish: `fallback`) when the
job needs the Python path, which then runs in the same transaction under the same lock.

- `tollgate_job_begin`: only a `dispatched` job, not canceled, under ATTEMPTS_MAX attempts,
  without a callback URL (no `start` webhook to queue) and without an input image: the job
  becomes `running` under the new lease, the attempt is recorded, the `running` event is
  written to the outbox, and the transaction commits without waiting for the WAL flush
  (only a lease is at stake, as in the Python path).
- `tollgate_job_finish`: only the current attempt of a `running` job with no callback URL,
  no outputs recorded yet and an open hold (or none). The caller computes the outcome (the
  status, its reason and the charge) from the outputs it passes; the function records
  them, ends the attempt, writes job_results, resolves the hold through
  tollgate_ledger_resolve (it raises on a ledger error: nothing of the finish survives),
  ends the job and writes its `event` outbox row. `r_alert`: the account has a low-balance
  alert for the kind (the caller checks it, in the same transaction). Already recorded:
  `r_status` is the job's status and `r_alert` NULL. The transaction waits for the WAL flush.
Timestamps are naive UTC, as the tables store them.
"""

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

BEGIN = """
CREATE OR REPLACE FUNCTION tollgate_job_begin(
    p_job text, p_token text, p_worker text, p_pid integer, p_now timestamp,
    p_lease timestamp, p_at text, p_attempts_max integer
)
RETURNS TABLE (
    r_attempt integer, r_spec json, r_account_id text, r_created_at timestamp,
    r_first_start boolean, r_price bigint, r_price_per_output bigint,
    r_outputs_expected integer
)
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
BEGIN
    SELECT * INTO j FROM jobs WHERE id = p_job FOR UPDATE;
    IF NOT FOUND OR j.status <> 'dispatched' OR j.cancel_requested
            OR j.attempt >= p_attempts_max OR j.callback_url IS NOT NULL
            OR (j.spec::jsonb ? 'image_id') THEN
        RETURN;
    END IF;
    UPDATE jobs SET
        status = 'running', updated_at = p_now, attempt = j.attempt + 1,
        lease_token = p_token, worker = p_worker, worker_pid = p_pid,
        lease_expires_at = p_lease, started_at = coalesce(j.started_at, p_now),
        outputs = '[]'::json, progress_step = 0
    WHERE id = p_job;
    INSERT INTO outbox (topic, job_id, payload, created_at) VALUES (
        'event', p_job,
        json_build_object(
            'job_id', j.id, 'account_id', j.account_id, 'type', j.type, 'status', 'running',
            'charged', j.charged, 'refunded', j.refunded, 'error', coalesce(j.error, ''),
            'at', p_at
        ),
        p_now
    );
    INSERT INTO job_attempts (job_id, phase, number, worker, worker_pid, started_at)
    VALUES (p_job, 'running', j.attempt + 1, p_worker, p_pid, p_now)
    ON CONFLICT ON CONSTRAINT uq_job_attempts_job_phase_number DO UPDATE SET
        ended_at = NULL, outcome = NULL, detail = NULL, worker = EXCLUDED.worker,
        worker_pid = EXCLUDED.worker_pid, started_at = EXCLUDED.started_at;
    -- Only a lease is at stake: if a crash loses it, the job is redelivered or reaped.
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY SELECT j.attempt + 1, j.spec, j.account_id::text, j.created_at,
        j.started_at IS NULL, j.price, j.price_per_output, j.outputs_expected;
END
$$
"""

FINISH = """
CREATE OR REPLACE FUNCTION tollgate_job_finish(
    p_job text, p_attempt integer, p_token text, p_outcome text, p_status text,
    p_error text, p_reason text, p_outputs json, p_delivered integer, p_charge bigint,
    p_step integer, p_total integer, p_now timestamp, p_at text,
    OUT r_status text, OUT r_alert boolean, OUT r_account_id text, OUT r_credit_kind text
)
LANGUAGE plpgsql AS $$
DECLARE
    j jobs%ROWTYPE;
    v_hold holds%ROWTYPE;
    v_has_hold boolean;
    v_res record;
    v_charged bigint := 0;
BEGIN
    SELECT * INTO j FROM jobs WHERE id = p_job FOR UPDATE;
    IF NOT FOUND THEN
        r_status := 'fallback';
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM job_results
               WHERE job_id = p_job AND phase = 'running' AND attempt = p_attempt) THEN
        r_status := j.status;  -- a rerun after a lost commit answer
        RETURN;
    END IF;
    IF j.lease_token IS DISTINCT FROM p_token OR j.status <> 'running'
            OR j.callback_url IS NOT NULL OR json_array_length(j.outputs) <> 0
            OR p_status NOT IN ('succeeded', 'failed', 'canceled') THEN
        r_status := 'fallback';
        RETURN;
    END IF;
    SELECT * INTO v_hold FROM holds WHERE reference = p_job;
    v_has_hold := FOUND;
    IF v_has_hold AND v_hold.status <> 'open' THEN
        r_status := 'fallback';
        RETURN;
    END IF;
    UPDATE job_attempts SET ended_at = p_now, outcome = p_outcome,
        detail = left(nullif(p_error, ''), 500)
    WHERE job_id = p_job AND phase = 'running' AND number = p_attempt AND ended_at IS NULL;
    INSERT INTO job_results
        (job_id, phase, attempt, outcome, delivered, applied, detail, created_at)
    VALUES (p_job, 'running', p_attempt, p_outcome, p_delivered, true, p_error, p_now);
    r_alert := false;
    IF v_has_hold THEN
        SELECT * INTO v_res FROM tollgate_ledger_resolve(
            p_job, CASE WHEN p_charge > 0 THEN 'committed' ELSE 'released' END,
            greatest(p_charge, 0), p_now);
        IF v_res.r_error IS NOT NULL THEN
            RAISE EXCEPTION 'tollgate_job_finish: ledger error % for job %', v_res.r_error, p_job;
        END IF;
        v_charged := v_res.r_committed;
        r_alert := EXISTS (SELECT 1 FROM balance_alerts
                           WHERE account_id = j.account_id AND kind = j.credit_kind);
    END IF;
    UPDATE jobs SET
        status = p_status, updated_at = p_now, finished_at = p_now, charged = v_charged,
        refunded = j.price - v_charged, error = p_reason,
        outputs = CASE WHEN json_array_length(p_outputs) > 0 THEN p_outputs ELSE outputs END,
        progress_step = coalesce(p_step, progress_step),
        progress_total = coalesce(p_total, progress_total)
    WHERE id = p_job;
    INSERT INTO outbox (topic, job_id, payload, created_at) VALUES (
        'event', p_job,
        json_build_object(
            'job_id', j.id, 'account_id', j.account_id, 'type', j.type, 'status', p_status,
            'charged', v_charged, 'refunded', j.price - v_charged,
            'error', coalesce(p_reason, ''), 'at', p_at
        ),
        p_now
    );
    r_status := p_status;
    r_account_id := j.account_id;
    r_credit_kind := j.credit_kind;
END
$$
"""


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(BEGIN)
    op.execute(FINISH)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS tollgate_job_finish(text, integer, text, text, text,"
               " text, text, json, integer, bigint, integer, integer, timestamp, text)")
    op.execute("DROP FUNCTION IF EXISTS tollgate_job_begin(text, text, text, integer,"
               " timestamp, timestamp, text, integer)")
