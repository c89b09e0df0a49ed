"""The Celery settings the orchestrator's exactly-once protocol relies on (issue: acks late,
requeue on a lost worker, one message at a time, a visibility timeout longer than any job,
per-family time limits, task events for Flower, per-family queues, stale periodic runs
dropped), read from the app the workers run."""

from __future__ import annotations

from orchestrator.jobs.families import FAMILIES, GPU_QUEUES, LONGEST_JOB_S
from orchestrator.settings import get_settings
from workers.celery_config import (
    OUTPUTS_INTERVAL_S,
    REAP_INTERVAL_S,
    REPUBLISH_INTERVAL_S,
    TUNES_INTERVAL_S,
    make_celery,
)

REDIS_URL = "redis://127.0.0.1:6379/0"  # only parsed: nothing connects in this test


def test_delivery_settings() -> None:
    conf = make_celery(REDIS_URL).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > LONGEST_JOB_S
    assert conf.worker_send_task_events and conf.task_send_sent_event
    # Job state lives in PostgreSQL; the result backend keeps failures only.
    assert conf.task_ignore_result and conf.task_store_errors_even_if_ignored
    assert conf.result_backend == REDIS_URL and conf.broker_url == REDIS_URL


def test_each_family_routes_to_its_queue_with_limits() -> None:
    conf = make_celery(REDIS_URL).conf
    queues = {q.name for q in conf.task_queues}
    assert set(GPU_QUEUES) <= queues and {"gpu.txt2img", "gpu.post", "gpu.train"} <= queues
    for family in FAMILIES.values():
        assert conf.task_routes[family.task_name] == {"queue": family.queue}
        assert 0 < family.soft_time_limit_s < family.time_limit_s <= LONGEST_JOB_S


def test_periodic_runs_expire_when_the_next_is_due() -> None:
    schedule = make_celery(REDIS_URL).conf.beat_schedule
    expected = {
        "reap": ("tollgate.reap", REAP_INTERVAL_S),
        "republish": ("tollgate.republish", REPUBLISH_INTERVAL_S),
        "leases": ("tollgate.leases", get_settings().lease_sweep_interval_s),
        "tunes": ("tollgate.tunes", TUNES_INTERVAL_S),
        "outputs": ("tollgate.outputs", OUTPUTS_INTERVAL_S),
        "dispatch": ("tollgate.dispatch", get_settings().dispatch_interval_s),
    }
    assert {
        name: (entry["task"], entry["schedule"]) for name, entry in schedule.items()
    } == expected
    assert all(entry["options"]["expires"] == entry["schedule"] for entry in schedule.values())
