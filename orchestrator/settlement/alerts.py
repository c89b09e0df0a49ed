"""Low-balance alerts: a threshold per (account, kind), and one `balance.low` webhook per
crossing.

`check(conn, account, kind)` runs in the transaction that changed the credits (a hold, the
settlement of a job, a void, a grant, grant expiry), after the ledger call: one primary-key
read of the alert row, and nothing more when the account has no alert for that kind. When
`available` is below the threshold and the alert is armed, it disarms it and writes a
`callback` outbox row in the same transaction: exactly one webhook per crossing, delivered
(and retried) by the job callbacks' task `tollgate.callback`, signed like them. When
`available` is back at or above the threshold, the alert re-arms. An alert set while the
balance is already below its threshold starts disarmed (it fires after the next top-up and
fall). Without a webhook URL the crossing is still recorded (disarmed), nothing is sent.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, Engine, bindparam, delete, insert, select, update

from billing import CREDIT_KINDS, InvalidAmount, ledger
from billing.clock import utcnow
from billing.db import TRANSACTION_ATTEMPTS_MAX, run_transaction
from billing.locked import lock_balance
from billing.queries import EXPIRE_BATCH_MAX
from billing.tables import accounts, grants
from orchestrator.jobs.specs import validate_callback_url
from orchestrator.scheduling import outbox
from orchestrator.tables import balance_alerts

THRESHOLD_MAX: Final = 10_000_000
EVENT_TYPE: Final = "balance.low"
UNSET: Final = object()
# Built once: every hold and settlement runs it (statement building cost more than the read).
ALERT_OF: Final = select(balance_alerts.c.threshold, balance_alerts.c.armed).where(
    balance_alerts.c.account_id == bindparam("account_id"),
    balance_alerts.c.kind == bindparam("kind"),
)


def check(
    conn: Connection,
    account_id: str,
    kind: str,
    now: datetime | None = None,
    job_id: str | None = None,
) -> bool:
    """After a change of this account's `kind` credits: fire or re-arm its alert. True when
    a balance.low webhook was written. `job_id`: the job whose hold or settlement changed
    them, so the job's fast-path relay publishes the webhook with its own messages."""
    alert = conn.execute(ALERT_OF, {"account_id": account_id, "kind": kind}).first()
    if alert is None:
        return False
    now = now or utcnow()
    available = ledger.get_balance(conn, account_id, kind, now=now).available
    low = available < alert.threshold
    if low == (not alert.armed):
        return False  # no crossing: still low and disarmed, or still fine and armed
    conn.execute(
        update(balance_alerts)
        .where(balance_alerts.c.account_id == account_id, balance_alerts.c.kind == kind)
        .values(armed=not low, updated_at=now)
    )
    if not low:
        return False
    url = conn.execute(select(accounts.c.webhook_url).where(accounts.c.id == account_id))
    webhook_url = url.scalar_one_or_none()
    if webhook_url:
        event_id = "evt_" + secrets.token_hex(12)
        data = {
            "id": event_id,
            "account_id": account_id,
            "kind": kind,
            "available": available,
            "threshold": int(alert.threshold),
            "at": now.isoformat(),
        }
        # A Standard Webhooks delivery through the job callbacks' task (no job_id in the
        # payload: nothing is recorded on a job). The event id is the webhook-id.
        body = {"type": EVENT_TYPE, "timestamp": now.isoformat(), "data": data}
        outbox.add(
            conn, "callback", job_id, {"webhook_id": event_id, "url": webhook_url, "body": body}
        )
    return True


def expire_grants_and_check(conn: Connection, now: datetime) -> int:
    """The grant-expiry sweep, then the alerts of the accounts whose credits it expired."""
    pairs = conn.execute(
        select(grants.c.account_id, grants.c.kind)
        .join(
            balance_alerts,
            (balance_alerts.c.account_id == grants.c.account_id)
            & (balance_alerts.c.kind == grants.c.kind),
        )
        .where(grants.c.remaining > 0, grants.c.expires_at <= now)
        .distinct()
        .limit(EXPIRE_BATCH_MAX)
    ).all()
    total = ledger.expire_grants(conn, now=now)
    for account_id, kind in pairs:
        check(conn, account_id, kind, now)
    return total


def check_after(
    engine: Engine,
    account_id: str,
    kind: str,
    now: datetime,
    job_id: str | None = None,
    *,
    attempts_max: int = TRANSACTION_ATTEMPTS_MAX,
    budget_s: float | None = None,
) -> bool:
    """`check` in a transaction of its own, right after a one-statement transaction changed
    the credits (orchestrator.db_direct: the usual submit, a worker's finish). A crash in
    between only delays the webhook: the alert is still armed, and the balance's next
    change fires it."""
    return run_transaction(
        engine,
        lambda conn: check(conn, account_id, kind, now, job_id),
        attempts_max=attempts_max,
        budget_s=budget_s,
    )


def check_all(
    conn: Connection, account_id: str, now: datetime | None = None, job_id: str | None = None
) -> None:
    for kind in CREDIT_KINDS:
        check(conn, account_id, kind, now, job_id)


def view(conn: Connection, account_id: str) -> dict[str, Any]:
    account = ledger.get_account(conn, account_id)
    rows = conn.execute(
        select(balance_alerts).where(balance_alerts.c.account_id == account_id)
    ).all()
    return {
        "webhook_url": account.webhook_url,
        "thresholds": {r.kind: int(r.threshold) for r in rows},
        "armed": {r.kind: bool(r.armed) for r in rows},
    }


def set_alerts(
    engine: Engine,
    account_id: str,
    thresholds: dict[str, int | None],
    webhook_url: Any = UNSET,
) -> dict[str, Any]:
    """Set (an int) or remove (None) thresholds per kind, and optionally the account's
    webhook URL (None removes it). Kinds not named keep their alert."""
    for kind, threshold in thresholds.items():
        if kind not in CREDIT_KINDS:
            raise InvalidAmount(f"thresholds.{kind}", f"must be one of {', '.join(CREDIT_KINDS)}")
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int)
            or not 0 <= threshold <= THRESHOLD_MAX
        ):
            raise InvalidAmount(f"thresholds.{kind}", f"must be an integer in 0..{THRESHOLD_MAX}")
    if webhook_url is not UNSET and webhook_url is not None:
        try:
            validate_callback_url(webhook_url)
        except Exception as exc:
            raise InvalidAmount(
                "webhook_url", "must be an http(s) URL of at most 2000 characters"
            ) from exc

    def work(conn: Connection) -> dict[str, Any]:
        now = utcnow()
        ledger.get_account(conn, account_id)  # UnknownAccount
        if webhook_url is not UNSET:
            conn.execute(
                update(accounts).where(accounts.c.id == account_id).values(webhook_url=webhook_url)
            )
        for kind, threshold in thresholds.items():
            key = (balance_alerts.c.account_id == account_id, balance_alerts.c.kind == kind)
            conn.execute(delete(balance_alerts).where(*key))
            if threshold is None:
                continue
            lock_balance(conn, account_id, kind)
            available = ledger.get_balance(conn, account_id, kind, now=now).available
            conn.execute(
                insert(balance_alerts).values(
                    account_id=account_id,
                    kind=kind,
                    threshold=threshold,
                    armed=available >= threshold,
                    updated_at=now,
                )
            )
        return view(conn, account_id)

    return run_transaction(engine, work)
