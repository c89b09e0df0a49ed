"""Errors raised by billing. `BillingError` is the root; callers catch it at the edges."""

from __future__ import annotations


class BillingError(Exception):
    """Root of every error billing raises on purpose."""


class InvalidJobSpec(BillingError):
    """A job spec that cannot be priced. `field` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UnknownAccount(BillingError):
    def __init__(self, account_id: str) -> None:
        super().__init__(f"unknown account {account_id!r}")
        self.account_id = account_id


class InsufficientCredits(BillingError):
    """A hold asked for more than is available. Carries both numbers for a 402 body."""

    def __init__(self, kind: str, needed: int, available: int) -> None:
        super().__init__(f"insufficient {kind} credits: needed {needed}, available {available}")
        self.kind = kind
        self.needed = needed
        self.available = available


class HoldAlreadyResolved(BillingError):
    """A second commit/release/expire of a hold. Nothing was changed."""

    def __init__(self, reference: str, status: str) -> None:
        super().__init__(f"hold {reference!r} is already {status}")
        self.reference = reference
        self.status = status


class UnknownHold(BillingError):
    def __init__(self, reference: str) -> None:
        super().__init__(f"no hold with reference {reference!r}")
        self.reference = reference


class UnknownGrant(BillingError):
    def __init__(self, reference: str) -> None:
        super().__init__(f"no grant with reference {reference!r}")
        self.reference = reference


class ReferenceConflict(BillingError):
    """An idempotency reference reused for a different request (other account/kind/amount)."""

    def __init__(self, reference: str, detail: str) -> None:
        super().__init__(f"reference {reference!r} already used for {detail}")
        self.reference = reference


class InvalidAmount(BillingError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
