"""The one place billing reads the wall clock; every function also takes `now=` to inject."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
