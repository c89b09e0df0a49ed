"""delivery: per-job webhook events filter and delivery status, output and input retention

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-01 21:40:00.000000

jobs.webhook_events_filter (JSON list; NULL: ["completed"]), jobs.webhook (the last delivery:
last_status, attempts, delivered_at / failed_at), jobs.outputs_deleted_at (the retention
sweeper deleted the outputs; the row and its outputs list stay), images.deleted_at.
"""

import sqlalchemy as sa
from alembic import op

from billing.tables import UTCDateTime

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_events_filter", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("webhook", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("outputs_deleted_at", UTCDateTime(), nullable=True))
        batch.create_index("ix_jobs_finished_at", ["finished_at"])
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("deleted_at", UTCDateTime(), nullable=True))
        batch.create_index("ix_images_created_at", ["created_at"])


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_created_at")
        batch.drop_column("deleted_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_finished_at")
        batch.drop_column("outputs_deleted_at")
        batch.drop_column("webhook")
        batch.drop_column("webhook_events_filter")
