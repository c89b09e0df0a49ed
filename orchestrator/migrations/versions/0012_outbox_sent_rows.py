"""outbox: a published row is deleted when it is sent; drop the rows sent before

Revision ID: 0012
Revises: 0011

Until now the relay marked a sent row (`published_at`) and kept it, so the table grew by
about four rows per job forever. The relay now deletes what it sends
(`orchestrator.scheduling.outbox`); this drops the rows already marked, `BATCH_ROWS` per
statement. `published_at` stays: every remaining row has it NULL, and the relay's index
is on it.
"""

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

BATCH_ROWS = 10_000
BATCHES_MAX = 100_000  # 1e9 rows: a bound on the loop, far above any table here


def upgrade() -> None:
    conn = op.get_bind()
    for _ in range(BATCHES_MAX):
        done = conn.execute(
            sa.text(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
                " WHERE published_at IS NOT NULL ORDER BY id LIMIT :n)"
            ),
            {"n": BATCH_ROWS},
        ).rowcount
        if done < BATCH_ROWS:
            break


def downgrade() -> None:
    pass  # the rows were sent; nothing needs them back
