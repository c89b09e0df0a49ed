"""The packs file (`TOLLGATE_CREDIT_PACKS`, TOML or JSON): which provider price buys what.

    [prices.price_img_100]          # a pack: one kind of credits, optional expiry
    kind = "image"
    amount = 100
    expires_in_days = 365           # optional; absent: the credits never expire

    [prices.price_standard_month]   # a plan: the plan, and the credits of each month
    plan = "standard"
    monthly_credits = { image = 500, tune = 1, tune_image = 64 }

JSON is the same structure: {"prices": {"price_img_100": {"kind": "image", ...}}}. The file is
read again when it changes (its mtime).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from billing import CREDIT_KINDS
from billing.ledger import GRANT_AMOUNT_MAX, PLANS
from orchestrator.errors import OrchestratorError

PRICES_MAX: Final = 1000
EXPIRES_IN_DAYS_MAX: Final = 3660


class PacksError(OrchestratorError):
    """The packs file is missing, unreadable or invalid; `field` names the bad entry."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


@dataclass(frozen=True)
class Pack:
    price_id: str
    kind: str
    amount: int
    expires_in_days: int | None


@dataclass(frozen=True)
class Plan:
    price_id: str
    plan: str
    monthly_credits: dict[str, int]


@dataclass(frozen=True)
class Catalog:
    packs: dict[str, Pack]
    plans: dict[str, Plan]


def _int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PacksError(field, f"must be an integer in {lo}..{hi}, got {value!r}")
    return value


def parse(data: Any) -> Catalog:
    prices = data.get("prices") if isinstance(data, dict) else None
    if not isinstance(prices, dict):
        raise PacksError("prices", "the file must have a `prices` table")
    if len(prices) > PRICES_MAX:
        raise PacksError("prices", f"at most {PRICES_MAX} prices")
    packs: dict[str, Pack] = {}
    plans: dict[str, Plan] = {}
    for price_id, entry in prices.items():
        where = f"prices.{price_id}"
        if not isinstance(entry, dict):
            raise PacksError(where, "must be a table")
        if "plan" in entry:
            if entry["plan"] not in PLANS:
                raise PacksError(f"{where}.plan", f"must be one of {', '.join(PLANS)}")
            credits = entry.get("monthly_credits", {})
            if not isinstance(credits, dict) or not set(credits) <= set(CREDIT_KINDS):
                raise PacksError(
                    f"{where}.monthly_credits", f"must map kinds ({', '.join(CREDIT_KINDS)})"
                )
            plans[price_id] = Plan(
                price_id,
                entry["plan"],
                {
                    k: _int(f"{where}.monthly_credits.{k}", v, 1, GRANT_AMOUNT_MAX)
                    for k, v in credits.items()
                },
            )
            continue
        if entry.get("kind") not in CREDIT_KINDS:
            raise PacksError(f"{where}.kind", f"must be one of {', '.join(CREDIT_KINDS)}")
        days = entry.get("expires_in_days")
        if days is not None:
            days = _int(f"{where}.expires_in_days", days, 1, EXPIRES_IN_DAYS_MAX)
        amount = _int(f"{where}.amount", entry.get("amount"), 1, GRANT_AMOUNT_MAX)
        packs[price_id] = Pack(price_id, entry["kind"], amount, days)
    return Catalog(packs, plans)


_cache: dict[str, tuple[float, Catalog]] = {}


def load(path: Path | None) -> Catalog:
    if path is None:
        raise PacksError("TOLLGATE_CREDIT_PACKS", "not set: no prices are known")
    try:
        mtime = path.stat().st_mtime
        cached = _cache.get(str(path))
        if cached is not None and cached[0] == mtime:
            return cached[1]
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise PacksError("TOLLGATE_CREDIT_PACKS", f"cannot read {path}: {exc}") from exc
    catalog = parse(data)
    _cache[str(path)] = (mtime, catalog)
    return catalog
