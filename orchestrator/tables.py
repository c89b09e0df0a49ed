"""The orchestrator's tables, on billing's MetaData (one schema, one migration history)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)

from billing.tables import ACCOUNT_ID_MAX_LEN, BigId, UTCDateTime, metadata

# API keys are stored as SHA-256 hex digests; the key itself is shown once, at creation.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("key_hash", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    UniqueConstraint("key_hash"),
)

JOB_ID_MAX_LEN = 40
IDEMPOTENCY_KEY_MAX_LEN = 200

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(JOB_ID_MAX_LEN), primary_key=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("type", String(20), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("status", String(20), nullable=False),
    Column("credit_kind", String(20), nullable=False),
    Column("price", BigInteger, nullable=False),
    # Credits per delivered output (a partial batch is charged per_output x delivered).
    Column("price_per_output", BigInteger, nullable=False),
    Column("outputs_expected", Integer, nullable=False),
    Column("charged", BigInteger, nullable=False, server_default=text("0")),
    Column("refunded", BigInteger, nullable=False, server_default=text("0")),
    Column("progress_step", Integer, nullable=False, server_default=text("0")),
    Column("progress_total", Integer, nullable=False, server_default=text("0")),
    Column("outputs", JSON, nullable=False),
    Column("error", Text, nullable=True),
    Column("idempotency_key", String(IDEMPOTENCY_KEY_MAX_LEN), nullable=True),
    Column("request_hash", String(64), nullable=True),
    Column("callback_url", String(2000), nullable=True),
    # Which job events are POSTed to callback_url (NULL: ["completed"]), and how the last
    # delivery went: {"id", "event", "last_status", "attempts", "delivered_at" | "failed_at"}.
    Column("webhook_events_filter", JSON, nullable=True),
    Column("webhook", JSON, nullable=True),
    # Set when output retention deleted the stored outputs (the outputs list stays).
    Column("outputs_deleted_at", UTCDateTime, nullable=True),
    Column("source", String(10), nullable=False),
    # Each delivery of the task to a worker takes a new attempt; only the current attempt's
    # token may report progress or settle.
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("lease_token", String(40), nullable=True),
    Column("worker", String(200), nullable=True),
    # The lease: renewed by the running attempt's heartbeat; past it, the lease sweep takes
    # the job back (settlement.lease_sweep). worker_pid: the process holding it on `worker`.
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("worker_pid", Integer, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("deadline_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    UniqueConstraint("account_id", "idempotency_key", name="uq_jobs_account_idempotency"),
    Index("ix_jobs_account_created", "account_id", "created_at"),
    Index("ix_jobs_status_deadline", "status", "deadline_at"),
    Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    Index("ix_jobs_finished_at", "finished_at"),
)

# Results as workers reported them, one row per attempt, including late ones (after the job
# was canceled or expired): recorded, never charged.
job_results = Table(
    "job_results",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(JOB_ID_MAX_LEN), ForeignKey("jobs.id"), nullable=False),
    # The phase (job status while running: running, training, rendering) and its attempt.
    Column("phase", String(20), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("delivered", Integer, nullable=False),
    Column("applied", Boolean, nullable=False),
    Column("detail", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("job_id", "phase", "attempt", name="uq_job_results_job_phase_attempt"),
)

# Every attempt of a job's phase (running, training, rendering) as operators see it: who ran
# it, when, and how it ended (succeeded, failed, canceled, lease_expired, superseded, late;
# NULL while it runs). Written by begin, finish and the lease sweep.
job_attempts = Table(
    "job_attempts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(JOB_ID_MAX_LEN), ForeignKey("jobs.id"), nullable=False),
    Column("phase", String(20), nullable=False),
    Column("number", Integer, nullable=False),
    Column("worker", String(200), nullable=True),
    Column("worker_pid", Integer, nullable=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime, nullable=True),
    Column("outcome", String(20), nullable=True),
    Column("detail", Text, nullable=True),
    UniqueConstraint("job_id", "phase", "number", name="uq_job_attempts_job_phase_number"),
)

# Transactional outbox: written in the same transaction as the state change it announces,
# published after commit (fast path) or by the beat re-publisher (crash path).
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("topic", String(20), nullable=False),
    Column("job_id", String(JOB_ID_MAX_LEN), nullable=True),
    Column("payload", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("published_at", UTCDateTime, nullable=True),
    Index("ix_outbox_unpublished", "published_at", "id"),
)

# Uploaded input images (POST /v1/images or inline image_b64), owned by an account.
images = Table(
    "images",
    metadata,
    Column("id", String(JOB_ID_MAX_LEN), primary_key=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("path", String(1000), nullable=False),
    Column("format", String(10), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Set when input retention deleted the stored image.
    Column("deleted_at", UTCDateTime, nullable=True),
    Index("ix_images_created_at", "created_at"),
)

# A tune: the job (same id) trains a LoRA, then renders 64 images. Per-tune data lives here;
# status, progress and outputs stay on the job row.
tunes = Table(
    "tunes",
    metadata,
    Column("id", String(JOB_ID_MAX_LEN), ForeignKey("jobs.id"), primary_key=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("subject", String(40), nullable=False),
    # The rare token the LoRA learns ("a photo of <token> <subject>").
    Column("token", String(20), nullable=False),
    Column("base_model", String(100), nullable=False),
    Column("styles", JSON, nullable=False),
    Column("training", JSON, nullable=False),
    # Storage keys of the training photos; emptied when training ends (they are deleted).
    Column("image_keys", JSON, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("lora_key", String(500), nullable=True),
    # Ledger reference of the current 64-image render hold (NULL: none placed yet).
    Column("render_hold_ref", String(200), nullable=True),
    Column("render_count", Integer, nullable=False, server_default=text("0")),
    Column("contact_sheet_key", String(500), nullable=True),
    Column("trained_at", UTCDateTime, nullable=True),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("weights_deleted_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_tunes_account_created", "account_id", "created_at"),
    Index("ix_tunes_expires_at", "expires_at"),
)

PROVIDER_MAX_LEN = 20
PROVIDER_ID_MAX_LEN = 200

# Payment provider events processed (or deliberately ignored), one row per event id: written
# in the same transaction as the event's effect, so a replay changes nothing.
payment_events = Table(
    "payment_events",
    metadata,
    Column("provider", String(PROVIDER_MAX_LEN), primary_key=True),
    Column("event_id", String(PROVIDER_ID_MAX_LEN), primary_key=True),
    Column("type", String(100), nullable=False),
    Column("outcome", String(40), nullable=False),
    Column("detail", Text, nullable=True),
    Column("received_at", UTCDateTime, nullable=False),
)

# Which grants a payment bought (a pack's checkout, a subscription invoice), so that a
# refund of that payment voids them. `payment_id` is the provider's payment id (Stripe: the
# payment intent, else the charge or the invoice).
payment_grants = Table(
    "payment_grants",
    metadata,
    Column("provider", String(PROVIDER_MAX_LEN), primary_key=True),
    Column("payment_id", String(PROVIDER_ID_MAX_LEN), primary_key=True),
    Column("grant_reference", String(200), primary_key=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# A refund of a payment no grant is known for yet (the refund event came first): the next
# purchase of that payment applies it. Cumulative amounts, as providers report them.
pending_refunds = Table(
    "pending_refunds",
    metadata,
    Column("provider", String(PROVIDER_MAX_LEN), primary_key=True),
    Column("payment_id", String(PROVIDER_ID_MAX_LEN), primary_key=True),
    Column("refunded", BigInteger, nullable=False),
    Column("paid", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# A provider's subscription and the account and plan it pays for.
subscriptions = Table(
    "subscriptions",
    metadata,
    Column("provider", String(PROVIDER_MAX_LEN), primary_key=True),
    Column("subscription_id", String(PROVIDER_ID_MAX_LEN), primary_key=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), nullable=False),
    Column("plan", String(20), nullable=True),
    Column("status", String(40), nullable=False),
    Column("current_period_end", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Low-balance alerts: one threshold per (account, kind). `armed`: the next fall of
# `available` below the threshold sends a balance.low webhook (then it is disarmed until
# available is back at or above the threshold).
balance_alerts = Table(
    "balance_alerts",
    metadata,
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), primary_key=True),
    Column("kind", String(20), primary_key=True),
    Column("threshold", BigInteger, nullable=False),
    Column("armed", Boolean, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# ----------------------------------------------------------------- scheduling (migration 0010)
# One row per job phase waiting for, or holding, a worker slot: `queued` until the
# dispatcher picks it (in fair order), then `dispatched` until the phase ends (the row is
# deleted in the transaction that ends it). `id` orders an account's jobs (FIFO).
dispatch_queue = Table(
    "dispatch_queue",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(JOB_ID_MAX_LEN), ForeignKey("jobs.id"), nullable=False),
    # The family (job type, or tune_render) whose task runs this phase, and its queue.
    Column("task", String(20), nullable=False),
    Column("queue", String(40), nullable=False),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), nullable=False),
    Column("state", String(12), nullable=False),
    Column("enqueued_at", UTCDateTime, nullable=False),
    Column("dispatched_at", UTCDateTime, nullable=True),
    UniqueConstraint("job_id", name="uq_dispatch_queue_job"),
    Index("ix_dispatch_queue_account", "queue", "account_id", "state", "id"),
    Index("ix_dispatch_queue_state", "queue", "state"),
)

# Per (queue, account): the fair-queuing state of orchestrator.scheduling.fairness.Flow. `eligible`
# (queued > 0 and running < cap) and `sort_key` are kept current so one dispatch decision
# reads the first `free` eligible rows of ix_sched_flows_key, whatever the backlog.
sched_flows = Table(
    "sched_flows",
    metadata,
    Column("queue", String(40), primary_key=True),
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), primary_key=True),
    Column("plan", String(20), nullable=False),
    Column("weight", Float, nullable=False),
    Column("cap", Integer, nullable=False),
    Column("running", Integer, nullable=False),
    Column("queued", Integer, nullable=False),
    Column("finish_tag", Float, nullable=False),
    Column("head_tag", Float, nullable=False),
    Column("head_since_s", Float, nullable=False),
    Column("sort_key", Float, nullable=False),
    Column("eligible", Boolean, nullable=False),
    Index("ix_sched_flows_key", "queue", "eligible", "sort_key", "head_since_s", "account_id"),
    Index("ix_sched_flows_queued", "queue", "queued"),
)

# Per queue: the virtual time (largest start tag dispatched). Its row lock serialises
# dispatchers of one queue (PostgreSQL); SQLite's BEGIN IMMEDIATE serialises them anyway.
sched_queues = Table(
    "sched_queues",
    metadata,
    Column("queue", String(40), primary_key=True),
    Column("vtime", Float, nullable=False),
)

# An operator's override of an account's running cap (POST /v1/accounts/{id}/limits).
account_limits = Table(
    "account_limits",
    metadata,
    Column("account_id", String(ACCOUNT_ID_MAX_LEN), ForeignKey("accounts.id"), primary_key=True),
    Column("running_cap", Integer, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)
