"""Parsing a `tollgate:jobs` message (pure) and the intake's configuration bounds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.ingress.messages import MalformedMessage, derived_key, parse_job
from orchestrator.ingress.streams import IntakeConfig
from tests.intake_helpers import (
    TXT2IMG,
    job_text,
)

# --- parsing (pure) ---------------------------------------------------------------------


def test_parse_job_takes_the_fields_and_derives_a_key_from_the_message_id() -> None:
    with_key = parse_job({"job": job_text("acct_1", key="k-1", callback_url=None)}, "1-0")
    assert (with_key.account_id, with_key.idempotency_key, with_key.key_derived) == (
        "acct_1",
        "k-1",
        False,
    )
    assert with_key.spec == TXT2IMG
    without = parse_job({"job": job_text("acct_1")}, "17-3")
    assert without.idempotency_key == derived_key("17-3") == "msg:17-3"
    assert without.key_derived


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, "missing field 'job'"),
        ({"job": "{not json"}, "not valid JSON"),
        ({"job": "[1, 2]"}, "must be a JSON object"),
        ({"job": json.dumps({"spec": TXT2IMG})}, "account_id: missing"),
        ({"job": json.dumps({"account_id": 7, "spec": TXT2IMG})}, "account_id: must be"),
        ({"job": json.dumps({"account_id": "a"})}, "spec: missing"),
        ({"job": json.dumps({"account_id": "a", "spec": "txt2img"})}, "spec: must be"),
        ({"job": job_text("a", key="")}, "idempotency_key: must be"),
        ({"job": job_text("a", callback_url=5)}, "callback_url: must be"),
        ({"job": job_text("a", priority=1)}, "unknown field(s): priority"),
    ],
)
def test_parse_job_refuses_malformed_messages(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_job(fields, "1-0")


def test_config_is_bounded() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        IntakeConfig(batch_size=10_000)
    with pytest.raises(ValueError, match="block_ms"):
        IntakeConfig(block_ms=0)
