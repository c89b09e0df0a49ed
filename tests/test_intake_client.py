"""orchestrator.client against a running intake thread: submit and wait follow a job to its
end; a dead-lettered message raises its reason."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import Engine

from orchestrator.client import DeadLettered, TollgateClient
from orchestrator.events import EVENTS_STREAM
from orchestrator.ingress.intake import Consumer
from orchestrator.ingress.streams import IntakeConfig
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.outbox import relay_quietly
from tests.intake_fixtures import *  # noqa: F403  (rc, config, consumer, account)
from tests.intake_helpers import (
    TXT2IMG,
    drain,
    jobs_of,
)

pytestmark = pytest.mark.usefixtures("announced_slots")


def test_client_submit_and_wait_follow_the_job_to_its_end(
    pg_engine: Engine,
    redis_url: str,
    rc: redis.Redis,
    config: IntakeConfig,
    consumer: Consumer,
    account: str,
) -> None:
    client = TollgateClient(redis_url, jobs_stream=config.stream, dead_stream=config.dead_stream)
    sub = client.submit(account, TXT2IMG)
    assert sub.idempotency_key.startswith("client-") and sub.message_id
    drain(consumer)
    [row] = jobs_of(pg_engine, account)
    assert row.idempotency_key == sub.idempotency_key
    rc.xadd(EVENTS_STREAM, {"job_id": row.id, "status": "running", "step": "3", "total": "10"})
    jobs.cancel(pg_engine, account, row.id)
    relay_quietly(pg_engine, Publisher(redis_url), row.id)

    progress: list[tuple[int, int]] = []
    statuses: list[str] = []
    outcome = client.wait(
        sub,
        timeout_s=10,
        on_progress=lambda step, total: progress.append((step, total)),
        on_status=lambda _job, status: statuses.append(status),
    )

    assert (outcome.job_id, outcome.status) == (row.id, states.CANCELED)
    assert outcome.event["refunded"] == "1" and not outcome.succeeded
    assert progress == [(3, 10)]
    assert statuses[0] == states.QUEUED  # from the accepted event
    assert statuses[-1] == states.CANCELED
    # By idempotency key and by job id too.
    assert client.wait(sub.idempotency_key, timeout_s=10).status == states.CANCELED
    assert client.wait(row.id, timeout_s=10).status == states.CANCELED
    client.close()


def test_client_wait_raises_the_dead_letter_reason(
    redis_url: str, config: IntakeConfig, consumer: Consumer
) -> None:
    client = TollgateClient(redis_url, jobs_stream=config.stream, dead_stream=config.dead_stream)
    sub = client.submit("acct_nobody", TXT2IMG, idempotency_key="mine")
    drain(consumer)

    with pytest.raises(DeadLettered, match="unknown account") as caught:
        client.wait(sub, timeout_s=10)
    assert caught.value.kind == "unknown_account"
    assert caught.value.fields["message_id"] == sub.message_id
    client.close()
