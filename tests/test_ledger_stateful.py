"""Random grant/hold/commit/partial-commit/release/expire/void sequences against a
plain-Python model of the ledger. After every step the balances agree with the model and
verify() is clean.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from sqlalchemy import Engine

from billing import HoldAlreadyResolved, InsufficientCredits, ledger
from billing.clock import utcnow
from billing.db import run_transaction
from billing.verify import verify

_counter = itertools.count()


@dataclass
class ModelGrant:
    seq: int
    amount: int
    expires_at: datetime | None
    free: int  # neither reserved, consumed, expired nor voided
    reference: str = ""
    voided: int = 0
    shortfall: int = 0  # asked for by voids but not there; held credits pay it off later


@dataclass
class ModelHold:
    amount: int
    expires_at: datetime
    status: str = "open"
    parts: list[tuple[ModelGrant, int]] = field(default_factory=list)


def make_machine(engine: Engine) -> type[RuleBasedStateMachine]:
    class LedgerMachine(RuleBasedStateMachine):
        holds = Bundle("holds")

        def __init__(self) -> None:
            super().__init__()
            self.now = utcnow()
            self.account = run_transaction(engine, lambda c: ledger.create_account(c, "h", "free"))
            self.grants: list[ModelGrant] = []
            self.model_holds: dict[str, ModelHold] = {}

        def live(self) -> list[ModelGrant]:
            return sorted(
                (g for g in self.grants if g.expires_at is None or g.expires_at > self.now),
                key=lambda g: (g.expires_at is None, g.expires_at or self.now, g.seq),
            )

        def model_available(self) -> int:
            return sum(g.free for g in self.live())

        def model_held(self) -> int:
            return sum(h.amount for h in self.model_holds.values() if h.status == "open")

        def give_back(self, h: ModelHold, committed: int) -> None:
            for g, take in sorted(
                h.parts,
                key=lambda p: (p[0].expires_at is None, p[0].expires_at or self.now, p[0].seq),
            ):
                used = min(take, committed)
                committed -= used
                g.free += take - used
            for g, _ in h.parts:  # returned credits owed to a refund are voided (live grants)
                if g.expires_at is None or g.expires_at > self.now:
                    n = min(g.free, g.shortfall)
                    g.free -= n
                    g.voided += n
                    g.shortfall -= n

        @rule(amount=st.integers(1, 20), expires_in_s=st.none() | st.integers(1, 3600))
        def grant(self, amount: int, expires_in_s: int | None) -> None:
            expires_at = (
                None if expires_in_s is None else self.now + timedelta(seconds=expires_in_s)
            )
            reference = f"sg-{next(_counter)}-{self.account}"
            run_transaction(
                engine,
                lambda c: ledger.grant(
                    c,
                    self.account,
                    "image",
                    amount,
                    source="promo",
                    reference=reference,
                    expires_at=expires_at,
                    now=self.now,
                ),
            )
            self.grants.append(
                ModelGrant(len(self.grants), amount, expires_at, amount, reference=reference)
            )

        @rule(pick=st.integers(0, 1000), amount=st.none() | st.integers(1, 25))
        def void(self, pick: int, amount: int | None) -> None:
            if not self.grants:
                return
            g = self.grants[pick % len(self.grants)]
            open_ = g.amount - g.voided - g.shortfall
            try:
                done = run_transaction(
                    engine, lambda c: ledger.void(c, g.reference, amount, now=self.now)
                )
            except ledger.InvalidAmount:
                assert amount is not None and amount > open_
                return
            requested = open_ if amount is None else amount
            assert requested <= open_
            live = g.expires_at is None or g.expires_at > self.now
            voided = min(requested, g.free) if live else 0
            assert (done.requested, done.voided, done.shortfall) == (
                requested,
                voided,
                requested - voided,
            )
            g.free -= voided
            g.voided += voided
            g.shortfall += requested - voided

        @rule(target=holds, amount=st.integers(1, 25), ttl_s=st.integers(1, 3600))
        def hold(self, amount: int, ttl_s: int) -> str:
            reference = f"sh-{next(_counter)}-{self.account}"
            expected_ok = self.model_available() >= amount
            try:
                run_transaction(
                    engine,
                    lambda c: ledger.hold(
                        c,
                        self.account,
                        "image",
                        amount,
                        reference=reference,
                        ttl_s=ttl_s,
                        now=self.now,
                    ),
                )
            except InsufficientCredits as exc:
                assert not expected_ok
                assert exc.available == self.model_available()
                return reference
            assert expected_ok
            h = ModelHold(amount, self.now + timedelta(seconds=ttl_s))
            need = amount
            for g in self.live():
                take = min(g.free, need)
                if take:
                    g.free -= take
                    h.parts.append((g, take))
                    need -= take
            self.model_holds[reference] = h
            return reference

        @rule(reference=consumes(holds), fraction=st.floats(0, 1))
        def commit(self, reference: str, fraction: float) -> None:
            h = self.model_holds.get(reference)
            amount = int((h.amount if h else 1) * fraction)
            try:
                run_transaction(engine, lambda c: ledger.commit(c, reference, amount, now=self.now))
            except HoldAlreadyResolved:
                assert h is not None and h.status != "open"
                return
            except ledger.UnknownHold:
                assert h is None
                return
            assert h is not None and h.status == "open"
            h.status = "committed"
            self.give_back(h, amount)

        @rule(reference=consumes(holds))
        def release(self, reference: str) -> None:
            h = self.model_holds.get(reference)
            try:
                run_transaction(engine, lambda c: ledger.release(c, reference, now=self.now))
            except HoldAlreadyResolved:
                assert h is not None and h.status != "open"
                return
            except ledger.UnknownHold:
                assert h is None
                return
            assert h is not None and h.status == "open"
            h.status = "released"
            self.give_back(h, 0)

        @rule(seconds=st.integers(1, 2000))
        def advance_clock_and_sweep(self, seconds: int) -> None:
            self.now += timedelta(seconds=seconds)
            due = run_transaction(engine, lambda c: ledger.due_holds(c, self.now, limit=10_000))
            mine = [r for r in due if r in self.model_holds]
            for reference in mine:
                run_transaction(engine, lambda c, r=reference: ledger.expire(c, r, now=self.now))
                self.model_holds[reference].status = "expired"
                self.give_back(self.model_holds[reference], 0)
            run_transaction(engine, lambda c: ledger.expire_grants(c, now=self.now))

        @invariant()
        def agrees_with_model(self) -> None:
            b = run_transaction(
                engine, lambda c: ledger.get_balance(c, self.account, "image", now=self.now)
            )
            assert b.available == self.model_available()
            assert b.held == self.model_held()
            assert b.balance == b.available + b.held
            assert run_transaction(engine, verify) == []

    return LedgerMachine


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_ledger_matches_model(backend: str, request: pytest.FixtureRequest) -> None:
    engine = request.getfixturevalue("pg_engine" if backend == "postgresql" else "sqlite_engine")
    machine = make_machine(engine)
    machine.TestCase.settings = settings(
        max_examples=25,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine.TestCase().runTest()
