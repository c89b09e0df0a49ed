"""The fair order (orchestrator.scheduling.fairness), pure: weights, caps, aging, ties, and the
property the SQL side relies on (reading the `free` smallest flows is enough)."""

from __future__ import annotations

import random
from collections import Counter
from functools import partial

from orchestrator.scheduling.fairness import Flow, dispatched, entering, flow_key, jobs_ahead, pick
from orchestrator.scheduling.slots import Pool, WorkerSlots, buffer_for, pools

NOW = 1_000_000.0
AGING = 0.01


def flow(account: str, weight: float = 1, cap: int = 100, queued: int = 1000, **kw: float) -> Flow:
    values = {"running": 0, "finish_tag": 0.0, "head_tag": 0.0, "head_since_s": NOW, **kw}
    return Flow(account, weight, cap, int(values.pop("running")), queued, **values)


def drain(flows: list[Flow], rounds: int, per_round: int = 1) -> Counter[str]:
    """Dispatch `per_round` at a time, finishing each job at once (slots stay free)."""
    counts: Counter[str] = Counter()
    vtime = 0.0
    state = {f.account_id: f for f in flows}
    for _ in range(rounds):
        picks = pick(list(state.values()), per_round, vtime, NOW, AGING)
        vtime = picks.vtime
        for account in picks.order:
            counts[account] += 1
        state = {
            a: Flow(
                f.account_id, f.weight, f.cap, 0, f.queued, f.finish_tag, f.head_tag, f.head_since_s
            )
            for a, f in picks.flows.items()
        }
    return counts


def test_weights_share_in_proportion() -> None:
    counts = drain([flow("free", 1), flow("standard", 4), flow("business", 16)], 210)
    assert abs(counts["standard"] - 4 * counts["free"]) <= 4
    assert abs(counts["business"] - 4 * counts["standard"]) <= 16
    assert sum(counts.values()) == 210


def test_equal_weights_alternate() -> None:
    picks = pick([flow("a"), flow("b"), flow("c")], 9, 0.0, NOW, AGING)
    assert picks.order == ["a", "b", "c"] * 3


def test_fifo_counts_and_virtual_time() -> None:
    picks = pick([flow("a", 4, queued=3)], 10, 0.0, NOW, AGING)
    assert picks.order == ["a", "a", "a"]  # no more than it has queued
    after = picks.flows["a"]
    assert (after.queued, after.running) == (0, 3)
    assert after.finish_tag == 0.75 and picks.vtime == 0.5


def test_caps_bound_running() -> None:
    picks = pick([flow("free", 1, cap=2), flow("std", 4, cap=8, running=7)], 20, 0.0, NOW, AGING)
    assert Counter(picks.order) == {"free": 2, "std": 1}
    assert picks.flows["free"].running == 2 and picks.flows["std"].running == 8
    assert pick([flow("full", cap=2, running=2)], 5, 0.0, NOW, AGING).order == []


def test_a_capped_account_reenters_at_virtual_time() -> None:
    held = flow("held", finish_tag=3.0, head_tag=3.0, running=2, cap=2)
    back = entering(held, vtime=50.0, now_s=NOW)
    assert back.head_tag == 50.0  # no priority banked while it was held back
    assert entering(held, vtime=1.0, now_s=NOW).head_tag == 3.0  # nor any lost


def test_newcomer_goes_before_a_flood() -> None:
    """A flood has advanced its own tags; a new account enters at V and runs next."""
    flood, vtime = flow("flood"), 0.0
    for _ in range(50):
        flood, vtime = dispatched(flood, vtime, NOW)
        flood = Flow(
            flood.account_id, 1, 100, 0, flood.queued, flood.finish_tag, flood.head_tag, NOW
        )
    newcomer = entering(flow("new", 4, queued=5), vtime, NOW + 1)
    picks = pick([flood, newcomer], 6, vtime, NOW + 1, AGING)
    # weight 4 against 1: four of the newcomer's jobs, then the flood's turn, then the fifth
    assert picks.order == ["new"] * 4 + ["flood", "new"]


def test_aging_lets_an_old_head_pass() -> None:
    young = flow("young", head_tag=10.0, head_since_s=NOW)
    old = flow("old", head_tag=12.0, head_since_s=NOW - 300)  # 300 s * 0.01 = 3 tags earlier
    assert pick([young, old], 1, 10.0, NOW, AGING).order == ["old"]
    assert pick([young, old], 1, 10.0, NOW, 0.0).order == ["young"]  # without aging


def test_ties_go_to_the_longer_wait_then_account_id() -> None:
    a = flow("a", head_tag=1.0, head_since_s=NOW)
    b = flow("b", head_tag=1.0 + AGING, head_since_s=NOW - 1)  # same key, waited longer
    assert pick([a, b], 1, 0.0, NOW, AGING).order == ["b"]
    assert pick([flow("y"), flow("x")], 2, 0.0, NOW, AGING).order == ["x", "y"]


def test_reading_the_first_free_flows_is_enough() -> None:
    rng = random.Random(7)
    for _ in range(200):
        flows = [
            flow(
                f"acc{i}",
                rng.choice([1, 4, 16]),
                cap=rng.randint(1, 4),
                queued=rng.randint(0, 5),
                running=rng.randint(0, 3),
                head_tag=rng.uniform(0, 5),
                head_since_s=NOW - rng.uniform(0, 600),
            )
            for i in range(30)
        ]
        free = rng.randint(1, 12)
        full = pick(flows, free, 2.0, NOW, AGING)
        eligible = sorted((f for f in flows if f.eligible), key=lambda f: flow_key(f, AGING))
        assert pick(eligible[:free], free, 2.0, NOW, AGING).order == full.order


def test_position_estimate() -> None:
    own = flow("own", 4, queued=4, head_tag=1.0)
    others = [flow("flood", 1, queued=500, head_tag=1.0), flow("idle", 1, queued=0)]
    # own's 3rd job (2 ahead) has tag 1.5: flood's heads at 1.0 go first (1 job of tag <= 1.5)
    assert jobs_ahead(2, own, others, AGING) == 2 + 1
    assert jobs_ahead(0, own, [], AGING) == 0


def test_a_worker_on_several_queues_counts_its_slots_once() -> None:
    workers = [
        WorkerSlots("both", ("gpu.post", "gpu.txt2img", "tollgate.callbacks"), 2),
        WorkerSlots("txt", ("gpu.txt2img",), 4),
        WorkerSlots("tune", ("gpu.tune",), 1),
    ]
    got = pools(workers, 1, only={"gpu.post", "gpu.txt2img", "gpu.tune"})
    assert got == [
        Pool(("gpu.post", "gpu.txt2img"), {"gpu.post": 3, "gpu.txt2img": 8}, 8),
        Pool(("gpu.tune",), {"gpu.tune": 2}, 2),
    ]


def test_short_jobs_get_a_buffer_of_lookahead_seconds_and_passes_wait_for_half() -> None:
    queue_of = {"txt2img": "gpu.txt2img", "upscale": "gpu.post", "tune": "gpu.tune"}
    worker = WorkerSlots("w", ("gpu.post", "gpu.txt2img"), 2)
    size = partial(buffer_for, base=1, lookahead_s=0.05, most=16, queue_of=queue_of)
    assert size(worker, {}) == 1  # no run time known yet
    assert size(worker, {"tune": 0.001}) == 1  # a queue it does not serve
    assert size(worker, {"txt2img": 0.1}) == 1  # 2 x 0.05 / 0.1 = 1 (the noisy-neighbour case)
    assert size(worker, {"txt2img": 0.098}) == 1  # rounded down
    assert size(worker, {"txt2img": 0.01}) == 10
    assert size(worker, {"txt2img": 0.01, "upscale": 0.02}) == 5  # the longest known family
    assert size(worker, {"txt2img": 0.0001}) == 16  # at most `most`
    assert size(worker, {"txt2img": 0.001}, lookahead_s=0) == 1
    workers = [worker, WorkerSlots("tune", ("gpu.tune",), 1)]
    got = pools(workers, partial(size, run_s={"txt2img": 0.01}), base_buffer=1)
    assert got == [
        Pool(("gpu.post", "gpu.txt2img"), {"gpu.post": 12, "gpu.txt2img": 12}, 12, min_free=4),
        Pool(("gpu.tune",), {"gpu.tune": 2}, 2, min_free=1),
    ]
