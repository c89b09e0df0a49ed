"""Worker metric labels: a phase that hands the job on (a tune's training ends in
`rendering`) counts as `succeeded`, inside the documented outcome set; the latency
histograms read the timings orchestrator.execution returns."""

from __future__ import annotations

from prometheus_client import REGISTRY

from workers import metrics


def _sample(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_outcomes_stay_in_the_documented_set() -> None:
    for status in ("rendering", "awaiting_credits", "training"):
        assert metrics.outcome_of({"status": status}, "SUCCESS") == "succeeded"
    for status in ("succeeded", "failed", "canceled", "skipped"):
        assert metrics.outcome_of({"status": status}, "SUCCESS") == status
    assert metrics.outcome_of(None, "FAILURE") == "error"


def test_latency_histograms_from_a_task_result() -> None:
    waits = {"family": "tune"}
    ends = {"family": "tune", "outcome": "succeeded"}
    before_wait = _sample("tollgate_worker_queue_wait_seconds_count", waits)
    before_end = _sample("tollgate_worker_job_latency_seconds_count", ends)
    # Training: first start (a queue wait), not an end.
    metrics.observe_latency({"job_type": "tune", "status": "rendering", "queue_wait_s": 2.0})
    # Render: not a first start, the end (end to end).
    metrics.observe_latency(
        {"job_type": "tune", "status": "succeeded", "queue_wait_s": None, "latency_s": 90.0}
    )
    assert _sample("tollgate_worker_queue_wait_seconds_count", waits) == before_wait + 1
    assert _sample("tollgate_worker_job_latency_seconds_count", ends) == before_end + 1
    metrics.observe_latency({"status": "skipped", "job_id": "job_x"})  # nothing to observe
    assert _sample("tollgate_worker_job_latency_seconds_count", ends) == before_end + 1
