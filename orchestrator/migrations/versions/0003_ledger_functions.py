"""ledger functions: hold and hold resolution in one round trip on PostgreSQL

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 10:00:00.000000

`billing/ledger.py` calls these on PostgreSQL; SQLite keeps the Python (Core) path, so this
migration does nothing there. The functions do exactly what the Python path does, step for
step (set-based where Python loops): lock the `balances` row first, the same burn order,
the same allocations, entries and grant expiry. They never raise for a ledger error; they return its code in
`r_error` (with the hold's columns and, for a hold, the available credits) and the caller
raises the Python exception. A RAISE would abort the caller's transaction and undo the work
done before the error (grant expiry before an `insufficient`), which the Python path keeps.

Error codes: `unknown_account`, `conflict` (reference used for another hold), `insufficient`
(r_available set), `unknown_hold`, `resolved` (r_status is the hold's status),
`invalid_amount` (commit outside 0..amount), `not_due` (expire before the deadline).
Timestamps are naive UTC, as the tables store them.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


# Expire the unreserved remainder of this account's expired grants (the caller holds the
# balance lock): `remaining -> expired`, one `expire_grant` entry per grant, and the balance
# goes down by the total (left alone when nothing was due). Spliced into both functions as
# the leading CTEs of a statement; `{account}` and `{kind}` name the variables to use.
EXPIRE_DUE_CTES = """
    WITH due AS (
        UPDATE grants AS g
        SET remaining = 0, expired = g.expired + d.remaining
        FROM (
            SELECT id, remaining FROM grants
            WHERE account_id = {account} AND kind = {kind}
              AND remaining > 0 AND expires_at <= p_now
        ) AS d
        WHERE g.id = d.id
        RETURNING g.id, d.remaining
    ), due_entries AS (
        INSERT INTO entries
            (account_id, kind, type, delta_balance, delta_held, grant_id, created_at)
        SELECT {account}, {kind}, 'expire_grant', -due.remaining, 0, due.id, p_now FROM due
    ), due_total AS (
        SELECT sum(remaining) AS n FROM due
    ), due_balance AS (
        UPDATE balances SET balance = balance - due_total.n
        FROM due_total
        WHERE account_id = {account} AND kind = {kind} AND due_total.n > 0
    )"""

HOLD = (
    """
CREATE OR REPLACE FUNCTION tollgate_ledger_hold(
    p_account text, p_kind text, p_amount bigint, p_reference text, p_ttl_s integer,
    p_now timestamp,
    OUT r_error text, OUT r_available bigint,
    OUT r_id bigint, OUT r_account_id text, OUT r_kind text, OUT r_amount bigint,
    OUT r_status text, OUT r_committed bigint, OUT r_expires_at timestamp
)
LANGUAGE plpgsql AS $$
DECLARE
    v_hold holds%ROWTYPE;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account AND kind = p_kind FOR UPDATE;
    IF NOT FOUND THEN
        r_error := 'unknown_account';
        RETURN;
    END IF;

    -- Idempotency: read under the lock (each statement here takes a fresh snapshot).
    SELECT * INTO v_hold FROM holds WHERE reference = p_reference;
    IF FOUND THEN
        r_id := v_hold.id;
        r_account_id := v_hold.account_id;
        r_kind := v_hold.kind;
        r_amount := v_hold.amount;
        r_status := v_hold.status;
        r_committed := v_hold.committed;
        r_expires_at := v_hold.expires_at;
        IF (v_hold.account_id, v_hold.kind, v_hold.amount)
                IS DISTINCT FROM (p_account, p_kind, p_amount) THEN
            r_error := 'conflict';
        END IF;
        RETURN;
    END IF;

    -- Expire what is due, then count the live grants' credits. The count reads the grants
    -- as they were before this statement's expiry, which only touches grants it excludes."""
    + EXPIRE_DUE_CTES.format(account="p_account", kind="p_kind")
    + """
    SELECT coalesce(sum(remaining), 0) INTO r_available FROM grants
    WHERE account_id = p_account AND kind = p_kind AND remaining > 0
      AND (expires_at IS NULL OR expires_at > p_now);
    IF r_available < p_amount THEN
        r_error := 'insufficient';
        RETURN;
    END IF;

    -- The hold, its allocations in burn order (soonest-expiring first, never-expiring last,
    -- then the older grant), the grants' remaining, the `hold` entry and the balance.
    r_expires_at := p_now + make_interval(secs => p_ttl_s);
    WITH new_hold AS (
        INSERT INTO holds
            (reference, account_id, kind, amount, status, committed, created_at, expires_at)
        VALUES (p_reference, p_account, p_kind, p_amount, 'open', 0, p_now, r_expires_at)
        RETURNING id
    ), live AS (
        SELECT id, remaining,
               sum(remaining) OVER (ORDER BY expires_at ASC NULLS LAST, id ASC) AS upto
        FROM grants
        WHERE account_id = p_account AND kind = p_kind AND remaining > 0
          AND (expires_at IS NULL OR expires_at > p_now)
    ), taken AS (
        SELECT id, least(remaining, p_amount - (upto - remaining)) AS take
        FROM live WHERE upto - remaining < p_amount
    ), reserved AS (
        UPDATE grants AS g SET remaining = g.remaining - taken.take
        FROM taken WHERE g.id = taken.id
    ), allocated AS (
        INSERT INTO hold_allocations (hold_id, grant_id, amount, committed)
        SELECT new_hold.id, taken.id, taken.take, 0 FROM new_hold, taken
    ), entry AS (
        INSERT INTO entries
            (account_id, kind, type, delta_balance, delta_held, hold_id, created_at)
        SELECT p_account, p_kind, 'hold', 0, p_amount, new_hold.id, p_now FROM new_hold
    ), held AS (
        UPDATE balances SET held = held + p_amount
        WHERE account_id = p_account AND kind = p_kind
    )
    SELECT id INTO r_id FROM new_hold;

    r_account_id := p_account;
    r_kind := p_kind;
    r_amount := p_amount;
    r_status := 'open';
    r_committed := 0;
END
$$
"""
)

RESOLVE = (
    """
CREATE OR REPLACE FUNCTION tollgate_ledger_resolve(
    p_reference text, p_status text, p_committed bigint, p_now timestamp,
    OUT r_error text,
    OUT r_id bigint, OUT r_account_id text, OUT r_kind text, OUT r_amount bigint,
    OUT r_status text, OUT r_committed bigint, OUT r_expires_at timestamp
)
LANGUAGE plpgsql AS $$
DECLARE
    v_hold holds%ROWTYPE;
    v_expired bigint;
BEGIN
    IF p_status NOT IN ('committed', 'released', 'expired') THEN
        RAISE EXCEPTION 'tollgate_ledger_resolve: bad status %', p_status;
    END IF;
    SELECT * INTO v_hold FROM holds WHERE reference = p_reference;
    IF NOT FOUND THEN
        r_error := 'unknown_hold';
        RETURN;
    END IF;
    PERFORM 1 FROM balances
    WHERE account_id = v_hold.account_id AND kind = v_hold.kind FOR UPDATE;
    IF NOT FOUND THEN
        r_error := 'unknown_account';
        r_account_id := v_hold.account_id;
        RETURN;
    END IF;
    -- Re-read under the lock: another resolver may have won (fresh snapshot per statement).
    SELECT * INTO v_hold FROM holds WHERE id = v_hold.id;
    r_id := v_hold.id;
    r_account_id := v_hold.account_id;
    r_kind := v_hold.kind;
    r_amount := v_hold.amount;
    r_status := v_hold.status;
    r_committed := v_hold.committed;
    r_expires_at := v_hold.expires_at;
    IF v_hold.status <> 'open' THEN
        r_error := 'resolved';
        RETURN;
    END IF;
    IF p_status = 'committed'
            AND (p_committed IS NULL OR p_committed < 0 OR p_committed > v_hold.amount) THEN
        r_error := 'invalid_amount';
        RETURN;
    END IF;
    IF p_status = 'expired' AND v_hold.expires_at > p_now THEN
        r_error := 'not_due';
        RETURN;
    END IF;
    IF p_status <> 'committed' THEN
        p_committed := 0;
    END IF;

    -- Consume `p_committed` from the allocations in burn order and give the rest of each
    -- back to its grant; resolve the hold; its entry; the balance.
    WITH alloc AS (
        SELECT ha.grant_id, ha.amount,
               sum(ha.amount) OVER (ORDER BY gr.expires_at ASC NULLS LAST, gr.id ASC) AS upto
        FROM hold_allocations AS ha JOIN grants AS gr ON gr.id = ha.grant_id
        WHERE ha.hold_id = v_hold.id
    ), split AS (
        SELECT grant_id, amount,
               greatest(0, least(amount, p_committed - (upto - amount))) AS take
        FROM alloc
    ), consumed AS (
        UPDATE hold_allocations AS ha SET committed = split.take
        FROM split
        WHERE ha.hold_id = v_hold.id AND ha.grant_id = split.grant_id AND split.take <> 0
    ), returned AS (
        UPDATE grants AS g SET remaining = g.remaining + (split.amount - split.take)
        FROM split
        WHERE g.id = split.grant_id AND split.amount - split.take <> 0
    ), resolved AS (
        UPDATE holds SET status = p_status, committed = p_committed, resolved_at = p_now
        WHERE id = v_hold.id AND status = 'open'
    ), entry AS (
        INSERT INTO entries
            (account_id, kind, type, delta_balance, delta_held, hold_id, created_at)
        VALUES (
            v_hold.account_id, v_hold.kind,
            CASE p_status WHEN 'committed' THEN 'commit' WHEN 'released' THEN 'release'
                          ELSE 'expire_hold' END,
            -p_committed, -v_hold.amount, v_hold.id, p_now
        )
    )
    UPDATE balances SET balance = balance - p_committed, held = held - v_hold.amount
    WHERE account_id = v_hold.account_id AND kind = v_hold.kind;

    -- Credits returned to a grant that expired while they were reserved expire now (a new
    -- statement, so it sees the credits the one above gave back)."""
    + EXPIRE_DUE_CTES.format(account="v_hold.account_id", kind="v_hold.kind")
    + """
    SELECT count(*) INTO v_expired FROM due;

    r_status := p_status;
    r_committed := p_committed;
END
$$
"""
)


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return  # SQLite runs the Python path in billing/ledger.py
    op.execute(HOLD)
    op.execute(RESOLVE)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS tollgate_ledger_resolve(text, text, bigint, timestamp)")
    op.execute(
        "DROP FUNCTION IF EXISTS tollgate_ledger_hold(text, text, bigint, text, integer, timestamp)"
    )
