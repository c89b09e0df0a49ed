"""The scheduler's HTTP and CLI surface: per-account cap overrides, a queued job's place
(`queue: {position, eta_s}`), GET /v1/queue, `tollgate queue` and the metrics."""

from __future__ import annotations

import json

from click.testing import CliRunner
from fastapi.testclient import TestClient

from orchestrator.cli import main
from orchestrator.jobs import states
from tests.api_helpers import ADMIN, Headers, submit


def test_a_capped_account_waits_with_its_place_shown(
    client: TestClient, user: tuple[str, Headers]
) -> None:
    account, headers = user
    held = client.post(f"/v1/accounts/{account}/limits", json={"running_cap": 0}, headers=ADMIN)
    assert held.status_code == 200, held.text
    assert held.json() == {"account_id": account, "plan": "free", "running_cap": 0}
    first, second = (submit(client, headers).json() for _ in range(2))
    assert first["status"] == second["status"] == states.QUEUED  # slots free, but capped
    place = client.get(f"/v1/jobs/{second['id']}", headers=headers).json()["queue"]
    assert place["position"] == 1  # its own first job runs before it
    assert place["eta_s"] is None or place["eta_s"] >= 0  # 1000 announced slots: ~0
    assert client.get(f"/v1/jobs/{first['id']}", headers=headers).json()["queue"]["position"] == 0

    overview = client.get("/v1/queue", headers=ADMIN).json()["queues"]["gpu.txt2img"]
    assert overview["live_slots"] >= 1 and overview["queued"] >= 2
    mine = [a for a in overview["top_accounts"] if a["account_id"] == account]
    assert mine and (mine[0]["queued"], mine[0]["running"], mine[0]["cap"]) == (2, 0, 0)

    metrics = client.get("/metrics").text
    assert 'tollgate_scheduler_queue_depth{queue="gpu.txt2img"}' in metrics
    assert 'tollgate_queue_wait_seconds_bucket{le="+Inf",plan="free"}' in metrics

    cli = CliRunner().invoke(main, ["queue", "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["queues"]["gpu.txt2img"]["queued"] >= 2
    table = CliRunner().invoke(main, ["queue"])
    assert "gpu.txt2img" in table.stdout and account in table.stdout

    # Back to the plan's cap: the override's own nudge sends both at once.
    reset = client.post(f"/v1/accounts/{account}/limits", json={"running_cap": None}, headers=ADMIN)
    assert reset.json()["running_cap"] == 2
    for job in (first, second):
        got = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()
        assert got["status"] == states.DISPATCHED
    canceled = client.post(f"/v1/jobs/{first['id']}/cancel", headers=headers).json()
    assert canceled["status"] == states.CANCELED and canceled["refunded"] == 1


def test_cancel_while_queued_releases_at_once_and_leaves_the_line(
    client: TestClient, user: tuple[str, Headers]
) -> None:
    account, headers = user
    client.post(f"/v1/accounts/{account}/limits", json={"running_cap": 0}, headers=ADMIN)
    jobs_ = [submit(client, headers).json() for _ in range(3)]
    canceled = client.post(f"/v1/jobs/{jobs_[0]['id']}/cancel", headers=headers).json()
    assert (canceled["status"], canceled["refunded"]) == (states.CANCELED, 1)
    assert (
        client.get(f"/v1/jobs/{jobs_[2]['id']}", headers=headers).json()["queue"]["position"] == 1
    )
    overview = client.get("/v1/queue", headers=ADMIN).json()["queues"]["gpu.txt2img"]
    assert [a["queued"] for a in overview["top_accounts"] if a["account_id"] == account] == [2]


def test_limits_input_is_checked(client: TestClient) -> None:
    bad = client.post("/v1/accounts/acct_x/limits", json={"running_cap": -1}, headers=ADMIN)
    assert bad.status_code == 422 and "running_cap" in bad.text
    missing = client.post("/v1/accounts/acct_nobody/limits", json={"running_cap": 3}, headers=ADMIN)
    assert missing.status_code == 404
    assert client.post("/v1/accounts/acct_x/limits", json={"running_cap": 3}).status_code == 401
    assert client.get("/v1/queue").status_code == 401
