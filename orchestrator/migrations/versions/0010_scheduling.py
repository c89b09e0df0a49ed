"""scheduling: the dispatch queue, fair-queuing state per (queue, account), per-queue
virtual time, and per-account running-cap overrides

Revision ID: 0010
Revises: 0009
"""

from alembic import op
import sqlalchemy as sa

import billing.tables


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('dispatch_queue',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('task', sa.String(length=20), nullable=False),
    sa.Column('queue', sa.String(length=40), nullable=False),
    sa.Column('account_id', sa.String(length=40), nullable=False),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('enqueued_at', billing.tables.UTCDateTime(), nullable=False),
    sa.Column('dispatched_at', billing.tables.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_dispatch_queue_job_id_jobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dispatch_queue')),
    sa.UniqueConstraint('job_id', name='uq_dispatch_queue_job')
    )
    op.create_index('ix_dispatch_queue_account', 'dispatch_queue', ['queue', 'account_id', 'state', 'id'], unique=False)
    op.create_index('ix_dispatch_queue_state', 'dispatch_queue', ['queue', 'state'], unique=False)
    op.create_table('sched_flows',
    sa.Column('queue', sa.String(length=40), nullable=False),
    sa.Column('account_id', sa.String(length=40), nullable=False),
    sa.Column('plan', sa.String(length=20), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('cap', sa.Integer(), nullable=False),
    sa.Column('running', sa.Integer(), nullable=False),
    sa.Column('queued', sa.Integer(), nullable=False),
    sa.Column('finish_tag', sa.Float(), nullable=False),
    sa.Column('head_tag', sa.Float(), nullable=False),
    sa.Column('head_since_s', sa.Float(), nullable=False),
    sa.Column('sort_key', sa.Float(), nullable=False),
    sa.Column('eligible', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('queue', 'account_id', name=op.f('pk_sched_flows'))
    )
    op.create_index('ix_sched_flows_key', 'sched_flows', ['queue', 'eligible', 'sort_key', 'head_since_s', 'account_id'], unique=False)
    op.create_index('ix_sched_flows_queued', 'sched_flows', ['queue', 'queued'], unique=False)
    op.create_table('sched_queues',
    sa.Column('queue', sa.String(length=40), nullable=False),
    sa.Column('vtime', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('queue', name=op.f('pk_sched_queues'))
    )
    op.create_table('account_limits',
    sa.Column('account_id', sa.String(length=40), nullable=False),
    sa.Column('running_cap', sa.Integer(), nullable=True),
    sa.Column('updated_at', billing.tables.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_account_limits_account_id_accounts')),
    sa.PrimaryKeyConstraint('account_id', name=op.f('pk_account_limits'))
    )


def downgrade() -> None:
    op.drop_table('account_limits')
    op.drop_table('sched_queues')
    op.drop_index('ix_sched_flows_queued', table_name='sched_flows')
    op.drop_index('ix_sched_flows_key', table_name='sched_flows')
    op.drop_table('sched_flows')
    op.drop_index('ix_dispatch_queue_state', table_name='dispatch_queue')
    op.drop_index('ix_dispatch_queue_account', table_name='dispatch_queue')
    op.drop_table('dispatch_queue')
