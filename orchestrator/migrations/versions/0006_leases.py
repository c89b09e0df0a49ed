"""leases: a lease expiry (and the holder's pid) on the job row, and job_attempts

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 21:40:00.000000

`jobs.lease_expires_at` is set by `begin` and renewed by the worker's heartbeat; the lease
sweep finds running jobs whose lease expired (index on status, lease_expires_at).
`jobs.worker_pid` is the pool process holding the lease (a redelivery on the same worker
node takes over at once when that process is gone). `job_attempts` lists every attempt of
each phase: worker, start, end and outcome.
"""

import sqlalchemy as sa
from alembic import op

import billing.tables

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_expires_at", billing.tables.UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("worker_pid", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_status_lease", "jobs", ["status", "lease_expires_at"], unique=False)
    op.create_table(
        "job_attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("phase", sa.String(length=20), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("worker_pid", sa.Integer(), nullable=True),
        sa.Column("started_at", billing.tables.UTCDateTime(), nullable=False),
        sa.Column("ended_at", billing.tables.UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(20), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_attempts_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_attempts")),
        sa.UniqueConstraint("job_id", "phase", "number", name="uq_job_attempts_job_phase_number"),
    )


def downgrade() -> None:
    op.drop_table("job_attempts")
    op.drop_index("ix_jobs_status_lease", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("worker_pid")
        batch.drop_column("lease_expires_at")
