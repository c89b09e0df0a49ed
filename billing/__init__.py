"""Billing: pricing (pure) and the credit ledger. Imports no Celery, FastAPI, torch or Redis."""

from billing.errors import (
    BillingError,
    HoldAlreadyResolved,
    InsufficientCredits,
    InvalidAmount,
    InvalidJobSpec,
    ReferenceConflict,
    UnknownAccount,
    UnknownGrant,
    UnknownHold,
)
from billing.pricing import CREDIT_KINDS, Quote, quote

__all__ = [
    "CREDIT_KINDS",
    "BillingError",
    "HoldAlreadyResolved",
    "InsufficientCredits",
    "InvalidAmount",
    "InvalidJobSpec",
    "Quote",
    "ReferenceConflict",
    "UnknownAccount",
    "UnknownGrant",
    "UnknownHold",
    "quote",
]
