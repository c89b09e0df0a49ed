"""The fair order (pure, no I/O): start-time fair queuing (SFQ, Goyal, Vin & Cheng 1996)
over accounts, per queue, with plan weights, per-account running caps and aging.

Each account with queued jobs on a queue is a *flow*. Only its head (oldest queued job)
carries a tag, so the state per (queue, account) is a few numbers:

- the head's start tag `S = max(V, F)`, where `V` is the queue's virtual time (the largest
  start tag dispatched so far) and `F` the flow's finish tag (`S + 1/weight` of the job it
  dispatched last). An account that was idle, or held back by its cap, re-enters at `V`;
  a backlogged one advances by `1/weight` per job, so weights share the slots 1:4:16.
- aging: the order key is `S + aging_per_s * head_since_s` (the wall-clock second the job
  became its account's head). Subtracting the common `aging_per_s * now`, that is the tag
  minus `aging_per_s` per second of waiting as head, so a head that is passed over gains
  one weight-1 job's worth of priority every `1 / aging_per_s` seconds.
- caps: a flow with `running >= cap` is not eligible; it re-enters at `max(V, F)` when a
  slot of its own frees (so a capped account cannot bank priority while held back).
- ties: equal keys go to the head that waited longer, then by account id.

Guarantees (per queue, picks in key order, cost 1 per job):
- FIFO within an account; never more than `cap` running per account.
- Between backlogged accounts the number of jobs dispatched over any interval is
  proportional to the weights, within one job per account (SFQ's fairness bound
  |W_a/w_a - W_b/w_b| <= 1/w_a + 1/w_b).
- No starvation: a head with start tag S (S <= V + 1/w when it became head) is passed over
  only by heads that became heads less than `1 / (w * aging_per_s)` seconds after it, each
  at most `(key_j - key_b) * w_b + 1` times; so with finitely many arrivals in that window
  its wait is bounded, and every queued job is at most (jobs ahead in its account + 1)
  such waits away.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Final

MIN_WEIGHT: Final = 1e-6


@dataclass(frozen=True)
class Flow:
    """One account's state on one queue."""

    account_id: str
    weight: float
    cap: int
    running: int
    queued: int
    finish_tag: float
    head_tag: float
    head_since_s: float

    @property
    def eligible(self) -> bool:
        return self.queued > 0 and self.running < self.cap


@dataclass(frozen=True)
class Picks:
    """The accounts whose heads go next, in order (an account appears once per job), the
    flows afterwards, and the queue's virtual time afterwards."""

    order: list[str]
    flows: dict[str, Flow]
    vtime: float


def sort_key(head_tag: float, head_since_s: float, aging_per_s: float) -> float:
    return head_tag + aging_per_s * head_since_s


def flow_key(flow: Flow, aging_per_s: float) -> tuple[float, float, str]:
    """The total order of heads (the index order of the SQL side)."""
    return (
        sort_key(flow.head_tag, flow.head_since_s, aging_per_s),
        flow.head_since_s,
        flow.account_id,
    )


def entering(flow: Flow, vtime: float, now_s: float) -> Flow:
    """A flow whose head becomes eligible now (first job queued, or a slot of its own freed
    under its cap): its head starts at max(V, F)."""
    return replace(flow, head_tag=max(vtime, flow.finish_tag), head_since_s=now_s)


def dispatched(flow: Flow, vtime: float, now_s: float) -> tuple[Flow, float]:
    """The flow after its head was dispatched, and the new virtual time."""
    vtime = max(vtime, flow.head_tag)
    finish = flow.head_tag + 1.0 / max(flow.weight, MIN_WEIGHT)
    after = replace(flow, running=flow.running + 1, queued=flow.queued - 1, finish_tag=finish)
    return replace(after, head_tag=max(vtime, finish), head_since_s=now_s), vtime


def pick(flows: list[Flow], free: int, vtime: float, now_s: float, aging_per_s: float) -> Picks:
    """Up to `free` heads in fair order. Reading only the `free` smallest eligible flows by
    `flow_key` gives the same picks as reading all: a flow's key only grows when it is
    picked, so an unread flow can never come before one of the first `free`."""
    state = {f.account_id: f for f in flows}
    heap = [(flow_key(f, aging_per_s), f.account_id) for f in flows if f.eligible]
    heapq.heapify(heap)
    order: list[str] = []
    while heap and len(order) < max(0, free):
        _, account = heapq.heappop(heap)
        flow, vtime = dispatched(state[account], vtime, now_s)
        state[account] = flow
        order.append(account)
        if flow.eligible:
            heapq.heappush(heap, (flow_key(flow, aging_per_s), account))
    return Picks(order, state, vtime)


def jobs_ahead(own_ahead: int, own: Flow, others: list[Flow], aging_per_s: float) -> int:
    """An estimate of how many jobs run before the job that has `own_ahead` jobs of its own
    account before it: its own, plus each other flow's queued jobs whose keys come first
    if every flow stays backlogged (running caps and future arrivals ignored)."""
    step = 1.0 / max(own.weight, MIN_WEIGHT)
    key = sort_key(own.head_tag + own_ahead * step, own.head_since_s, aging_per_s)
    ahead = own_ahead
    for flow in others:
        if flow.queued <= 0 or flow.account_id == own.account_id:
            continue
        first = sort_key(flow.head_tag, flow.head_since_s, aging_per_s)
        if first > key:
            continue
        before = int((key - first) * max(flow.weight, MIN_WEIGHT)) + 1
        ahead += min(flow.queued, before)
    return ahead
