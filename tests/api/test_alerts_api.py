"""The alerts routes: PUT/GET /v1/alerts for the caller, PUT /v1/accounts/{id}/alerts for
operators; bad input is a 422 naming the field."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api_helpers import ADMIN, Headers


def test_user_sets_reads_and_clears_alerts(client: TestClient, user: tuple[str, Headers]) -> None:
    _, headers = user
    body = {"thresholds": {"image": 5}, "webhook_url": "https://hooks.example.test/tollgate"}
    res = client.put("/v1/alerts", json=body, headers=headers)
    assert res.status_code == 200, res.text
    assert res.json() == {
        "webhook_url": "https://hooks.example.test/tollgate",
        "thresholds": {"image": 5},
        "armed": {"image": True},  # 20 available
    }
    res = client.put("/v1/alerts", json={"thresholds": {"tune": 1}}, headers=headers)
    assert res.json()["webhook_url"] == "https://hooks.example.test/tollgate"  # kept
    assert res.json()["thresholds"] == {"image": 5, "tune": 1}
    assert res.json()["armed"]["tune"] is False  # no tune credits: below already
    res = client.put(
        "/v1/alerts", json={"thresholds": {"image": None}, "webhook_url": None}, headers=headers
    )
    assert res.json() == {"webhook_url": None, "thresholds": {"tune": 1}, "armed": {"tune": False}}
    assert client.get("/v1/alerts", headers=headers).json() == res.json()


def test_bad_alert_input_names_the_field(client: TestClient, user: tuple[str, Headers]) -> None:
    _, headers = user
    for body, field in (
        ({"thresholds": {"gold": 1}}, "thresholds.gold"),
        ({"thresholds": {"image": -1}}, "thresholds.image"),
        ({"thresholds": {"image": "ten"}}, "thresholds.image"),
        ({"webhook_url": "ftp://example.test"}, "webhook_url"),
    ):
        res = client.put("/v1/alerts", json=body, headers=headers)
        assert res.status_code == 422, (body, res.text)
        assert res.json()["field"] == field, res.json()
    assert client.put("/v1/alerts", json={}).status_code == 401


def test_admin_sets_an_accounts_alerts(client: TestClient, user: tuple[str, Headers]) -> None:
    account, headers = user
    res = client.put(
        f"/v1/accounts/{account}/alerts", json={"thresholds": {"image": 30}}, headers=ADMIN
    )
    assert res.status_code == 200, res.text
    assert res.json()["armed"] == {"image": False}
    assert client.get("/v1/alerts", headers=headers).json()["thresholds"] == {"image": 30}
    assert client.put("/v1/accounts/acc_nope/alerts", json={}, headers=ADMIN).status_code == 404
    assert client.put(f"/v1/accounts/{account}/alerts", json={}, headers=headers).status_code in (
        401,
        403,
    )
