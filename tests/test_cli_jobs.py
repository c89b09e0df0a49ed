"""The job CLI end to end: `tollgate submit` through Redis with a running intake, and
`tollgate jobs show/list/cancel` and direct submission against PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from orchestrator.execution import protocol as execution
from orchestrator.jobs import service as jobs
from orchestrator.jobs import states
from orchestrator.scheduling.dispatch import Publisher
from orchestrator.scheduling.outbox import relay_quietly
from orchestrator.storage import Storage
from tests.intake_helpers import (
    REPO_ROOT,
    TXT2IMG,
    cli_command,
    job_cli,
    jobs_of,
    wait_for,
)
from tests.ledger_helpers import available, grant, new_account

# --- CLI end to end ---------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("announced_slots")


def _cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*cli_command(), *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_submit_via_redis_with_a_running_intake(
    pg_engine: Engine, service_env: dict[str, str]
) -> None:
    owner = new_account(pg_engine)
    grant(pg_engine, owner, 10)
    spec = json.dumps(TXT2IMG)
    intake = _cli(service_env, "intake", "--name", "cli-test", "--block-ms", "200")
    try:
        plain = _cli(service_env, "submit", spec, "--account", owner, "--via", "redis")
        out, err = plain.communicate(timeout=30)
        assert plain.returncode == 0, err
        key = json.loads(out)["idempotency_key"]
        first = wait_for(
            lambda: next((r for r in jobs_of(pg_engine, owner) if r.idempotency_key == key), 0),
            20,
            "the intake to submit the job",
        )
        assert first.source == "redis"
        wait_for(
            lambda: jobs.get(pg_engine, owner, first.id)["status"] == states.DISPATCHED,
            10,
            "the relay to dispatch it",
        )

        waiting = _cli(
            service_env, "submit", spec, "--account", owner, "--wait", "--idempotency-key", "w1"
        )  # default --via: redis, since TOLLGATE_REDIS_URL is set
        second = wait_for(
            lambda: next((r for r in jobs_of(pg_engine, owner) if r.idempotency_key == "w1"), 0),
            20,
            "the waited job",
        )
        jobs.cancel(pg_engine, owner, second.id)
        relay_quietly(pg_engine, Publisher(service_env["TOLLGATE_REDIS_URL"]), second.id)
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 1, (out, err)  # canceled
        assert json.loads(out)["status"] == states.CANCELED
        assert f"{second.id}: canceled" in err

        refused = _cli(service_env, "submit", spec, "--account", "acct_nobody", "--wait")
        out, err = refused.communicate(timeout=30)
        assert refused.returncode == 2 and "unknown account" in err
        jobs.cancel(pg_engine, owner, first.id)  # leave no task for a later test's worker
    finally:
        intake.send_signal(signal.SIGTERM)
        _out, intake_err = intake.communicate(timeout=20)
    assert intake.returncode == 0, intake_err
    assert "stopped: 2 accepted, 1 dead-lettered" in intake_err


@pytest.mark.usefixtures("settings_env")
def test_cli_jobs_show_list_cancel_and_direct_submit(pg_engine: Engine) -> None:
    owner = new_account(pg_engine)
    grant(pg_engine, owner, 10)
    cli, runner = job_cli(), CliRunner()
    direct = runner.invoke(
        cli, ["submit", json.dumps(TXT2IMG), "--account", owner, "--via", "direct"]
    )
    assert direct.exit_code == 0, direct.output
    job_id = json.loads(direct.stdout)["id"]

    shown = runner.invoke(cli, ["jobs", "show", job_id, "--json"])
    assert json.loads(shown.stdout)["status"] == states.DISPATCHED
    listed = runner.invoke(cli, ["jobs", "list", "--account", owner, "--json"])
    assert [j["id"] for j in json.loads(listed.stdout)] == [job_id]
    table = runner.invoke(cli, ["jobs", "list", "--account", owner, "--status", "dispatched"])
    assert job_id in table.stdout and "txt2img" in table.stdout
    canceled = runner.invoke(cli, ["jobs", "cancel", job_id])
    assert canceled.exit_code == 0 and "canceled (refunded 1)" in canceled.stdout
    assert runner.invoke(cli, ["jobs", "show", "job_nope"]).exit_code == 2
    assert runner.invoke(cli, ["jobs", "cancel", job_id]).exit_code == 0  # already canceled
    assert available(pg_engine, owner) == 10

    refused = runner.invoke(
        cli, ["submit", json.dumps(TXT2IMG), "--account", "acct_nobody", "--via", "direct"]
    )
    assert refused.exit_code == 2 and "unknown account" in refused.stderr

    hooked = runner.invoke(
        cli,
        [
            "submit",
            json.dumps(TXT2IMG),
            "--account",
            owner,
            "--via",
            "direct",
            "--callback-url",
            "http://127.0.0.1:9/hook",
            "--webhook-events",
            "completed,start",
        ],
    )
    assert hooked.exit_code == 0, hooked.output
    hooked_id = json.loads(hooked.stdout)["id"]
    assert json.loads(hooked.stdout)["webhook"]["events"] == ["start", "completed"]
    assert runner.invoke(cli, ["jobs", "cancel", hooked_id]).exit_code == 0
    bad = runner.invoke(
        cli,
        ["submit", json.dumps(TXT2IMG), "--account", owner, "--webhook-events", "finished"],
    )
    assert bad.exit_code == 2 and "webhook_events_filter" in bad.stderr


@pytest.mark.usefixtures("settings_env")
def test_cli_jobs_show_lists_attempts(pg_engine: Engine, storage: Storage) -> None:
    owner = new_account(pg_engine)
    grant(pg_engine, owner, 10)
    job_id = jobs.submit(pg_engine, storage, owner, dict(TXT2IMG)).job["id"]
    attempt = execution.begin(pg_engine, job_id, "cli-test-worker")
    assert attempt is not None
    execution.finish(pg_engine, attempt, states.FAILED, "scripted")
    shown = CliRunner().invoke(job_cli(), ["jobs", "show", job_id])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    row = lines[lines.index("attempts") + 2].split()
    assert (row[0], row[1], row[2], row[-1]) == ("1", "running", "cli-test-worker", "failed")
    as_json = json.loads(CliRunner().invoke(job_cli(), ["jobs", "show", job_id, "--json"]).stdout)
    assert [(a["number"], a["outcome"]) for a in as_json["attempts"]] == [(1, "failed")]


@pytest.mark.usefixtures("settings_env")
def test_cli_direct_submit_wait_exits_1_when_the_job_is_canceled(pg_engine: Engine) -> None:
    owner = new_account(pg_engine)
    grant(pg_engine, owner, 10)

    def cancel_when_queued() -> None:
        row = wait_for(lambda: jobs_of(pg_engine, owner), what="the job")[0]
        jobs.cancel(pg_engine, owner, row.id)

    canceler = threading.Thread(target=cancel_when_queued, daemon=True)
    canceler.start()
    args = ["submit", json.dumps(TXT2IMG), "--account", owner, "--via", "direct", "--wait"]
    waited = CliRunner().invoke(job_cli(), args)
    canceler.join(10)

    assert waited.exit_code == 1, waited.output
    assert json.loads(waited.stdout)["status"] == states.CANCELED
    assert ": canceled" in waited.stderr
