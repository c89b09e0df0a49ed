"""`tollgate ledger verify`: check every ledger invariant and name each violation.

Invariants, per (account, kind) unless said otherwise:
1. cached balance = sum(entries.delta_balance); cached held = sum(entries.delta_held)
2. held = sum of open holds' amounts; available = balance - held >= 0
3. balance - held = sum of grants' remaining (every credit is somewhere)
4. per grant: 0 <= remaining <= amount and amount = remaining + expired + voided + reserved
   by open holds + consumed by commits; exactly one `grant` entry of its amount; its `void`
   entries add up to -voided; voided, void_shortfall >= 0 and voided + void_shortfall <= amount
5. per hold: one `hold` entry; at most one resolution entry, exactly one iff resolved;
   committed <= held; allocations add up to the amount and to the committed amount
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import Connection, case, func, select

from billing.tables import RESOLUTION_TYPES, balances, entries, grants, hold_allocations, holds


def _sums(conn: Connection, stmt) -> dict[tuple[str, str], tuple[int, ...]]:  # type: ignore[no-untyped-def]
    return {(r[0], r[1]): tuple(int(v or 0) for v in r[2:]) for r in conn.execute(stmt)}


def verify(conn: Connection) -> list[str]:
    problems: list[str] = []
    problems += _check_balances(conn)
    problems += _check_grants(conn)
    problems += _check_holds(conn)
    return problems


def _check_balances(conn: Connection) -> Iterable[str]:
    cached = _sums(
        conn, select(balances.c.account_id, balances.c.kind, balances.c.balance, balances.c.held)
    )
    from_entries = _sums(
        conn,
        select(
            entries.c.account_id,
            entries.c.kind,
            func.sum(entries.c.delta_balance),
            func.sum(entries.c.delta_held),
        ).group_by(entries.c.account_id, entries.c.kind),
    )
    open_held = _sums(
        conn,
        select(holds.c.account_id, holds.c.kind, func.sum(holds.c.amount))
        .where(holds.c.status == "open")
        .group_by(holds.c.account_id, holds.c.kind),
    )
    remaining = _sums(
        conn,
        select(grants.c.account_id, grants.c.kind, func.sum(grants.c.remaining)).group_by(
            grants.c.account_id, grants.c.kind
        ),
    )
    for key in sorted(set(cached) | set(from_entries)):
        if key not in cached:
            yield f"{key[0]}/{key[1]}: entries exist but no balance row"
            continue
        balance, held = cached[key]
        e_balance, e_held = from_entries.get(key, (0, 0))
        where = f"{key[0]}/{key[1]}"
        if balance != e_balance:
            yield f"{where}: cached balance {balance} != sum of entries {e_balance}"
        if held != e_held:
            yield f"{where}: cached held {held} != sum of entry holds {e_held}"
        if held != open_held.get(key, (0,))[0]:
            yield f"{where}: held {held} != open holds {open_held.get(key, (0,))[0]}"
        if balance - held < 0:
            yield f"{where}: available {balance - held} < 0"
        if balance - held != remaining.get(key, (0,))[0]:
            yield (
                f"{where}: balance - held = {balance - held} != "
                f"grants' remaining {remaining.get(key, (0,))[0]}"
            )


def _check_grants(conn: Connection) -> Iterable[str]:
    used = defaultdict(int)
    stmt = (
        select(
            hold_allocations.c.grant_id,
            func.sum(
                case(
                    (holds.c.status == "open", hold_allocations.c.amount),
                    else_=hold_allocations.c.committed,
                )
            ),
        )
        .join(holds, holds.c.id == hold_allocations.c.hold_id)
        .group_by(hold_allocations.c.grant_id)
    )
    for grant_id, amount in conn.execute(stmt):
        used[grant_id] = int(amount or 0)
    grant_entries = {
        r.grant_id: (int(r.n), int(r.total or 0))
        for r in conn.execute(
            select(
                entries.c.grant_id,
                func.count().label("n"),
                func.sum(entries.c.delta_balance).label("total"),
            )
            .where(entries.c.type == "grant")
            .group_by(entries.c.grant_id)
        )
    }
    void_entries = {
        r[0]: int(r[1] or 0)
        for r in conn.execute(
            select(entries.c.grant_id, func.sum(entries.c.delta_balance))
            .where(entries.c.type == "void")
            .group_by(entries.c.grant_id)
        )
    }
    for g in conn.execute(select(grants)):
        where = f"grant {g.reference}"
        if not 0 <= g.remaining <= g.amount:
            yield f"{where}: remaining {g.remaining} outside 0..{g.amount}"
        if g.expired < 0:
            yield f"{where}: negative expired {g.expired}"
        accounted = g.remaining + g.expired + g.voided + used[g.id]
        if accounted != g.amount:
            yield (
                f"{where}: amount {g.amount} != remaining {g.remaining} + expired {g.expired}"
                f" + voided {g.voided} + reserved/consumed {used[g.id]}"
            )
        if g.voided < 0 or g.void_shortfall < 0 or g.voided + g.void_shortfall > g.amount:
            yield (
                f"{where}: voided {g.voided} + shortfall {g.void_shortfall} outside 0..{g.amount}"
            )
        if -void_entries.get(g.id, 0) != g.voided:
            yield f"{where}: void entries {-void_entries.get(g.id, 0)} != voided {g.voided}"
        if grant_entries.get(g.id) != (1, g.amount):
            found = grant_entries.get(g.id)
            yield f"{where}: expected one grant entry of {g.amount}, found {found}"


def _check_holds(conn: Connection) -> Iterable[str]:
    counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    charged: dict[int, int] = defaultdict(int)
    for r in conn.execute(
        select(entries.c.hold_id, entries.c.type, func.count(), func.sum(entries.c.delta_balance))
        .where(entries.c.hold_id.is_not(None))
        .group_by(entries.c.hold_id, entries.c.type)
    ):
        counts[r[0]][r[1]] = int(r[2])
        charged[r[0]] += -int(r[3] or 0)
    allocs = {
        r[0]: (int(r[1] or 0), int(r[2] or 0))
        for r in conn.execute(
            select(
                hold_allocations.c.hold_id,
                func.sum(hold_allocations.c.amount),
                func.sum(hold_allocations.c.committed),
            ).group_by(hold_allocations.c.hold_id)
        )
    }
    for h in conn.execute(select(holds)):
        where = f"hold {h.reference}"
        c = counts[h.id]
        resolutions = sum(c[t] for t in RESOLUTION_TYPES)
        if c["hold"] != 1:
            yield f"{where}: {c['hold']} hold entries, expected 1"
        if resolutions > 1:
            yield f"{where}: resolved {resolutions} times"
        if (h.status == "open") != (resolutions == 0):
            yield f"{where}: status {h.status} with {resolutions} resolution entries"
        if not 0 <= h.committed <= h.amount:
            yield f"{where}: committed {h.committed} outside 0..{h.amount}"
        if h.status != "committed" and h.committed:
            yield f"{where}: {h.status} hold has committed {h.committed}"
        if charged[h.id] != h.committed:
            yield f"{where}: entries charged {charged[h.id]} != committed {h.committed}"
        if allocs.get(h.id, (0, 0)) != (h.amount, h.committed):
            yield (
                f"{where}: allocations {allocs.get(h.id)} != (amount, committed) "
                f"({h.amount}, {h.committed})"
            )
