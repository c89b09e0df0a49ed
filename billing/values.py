"""Values the ledger returns, and the checks on the arguments it takes (shared by the
Python path and the PostgreSQL fast path)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing.errors import InvalidAmount
from billing.pricing import CREDIT_KINDS
from billing.tables import REFERENCE_MAX_LEN


@dataclass(frozen=True)
class Balance:
    kind: str
    balance: int
    held: int
    available: int


@dataclass(frozen=True)
class Hold:
    id: int
    reference: str
    account_id: str
    kind: str
    amount: int
    status: str
    committed: int
    expires_at: datetime

    @property
    def released(self) -> int:
        """Credits given back: all of them unless committed, the rest after a partial commit."""
        return 0 if self.status == "open" else self.amount - self.committed


@dataclass(frozen=True)
class Grant:
    id: int
    reference: str
    account_id: str
    kind: str
    amount: int
    created: bool


def check_kind(kind: str) -> None:
    if kind not in CREDIT_KINDS:
        raise InvalidAmount("kind", f"must be one of {', '.join(CREDIT_KINDS)}, got {kind!r}")


def check_amount(field: str, amount: int, lo: int, hi: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or not lo <= amount <= hi:
        raise InvalidAmount(field, f"must be an integer in {lo}..{hi}, got {amount!r}")


def check_reference(reference: str) -> None:
    if not isinstance(reference, str) or not 1 <= len(reference) <= REFERENCE_MAX_LEN:
        raise InvalidAmount("reference", f"must be a string of 1..{REFERENCE_MAX_LEN} characters")
