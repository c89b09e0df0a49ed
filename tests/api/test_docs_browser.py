"""/docs in a real headless Chromium with every host but 127.0.0.1 unresolvable (an
air-gapped cluster): Swagger UI loads from the API's own assets and renders the operation
list. CI installs Debian's `chromium` (.ci/run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.api_helpers import api_server

CHROMIUM_TIMEOUT_S = 90
VIRTUAL_TIME_BUDGET_MS = 15_000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (.ci/run installs it)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def _dump_dom(url: str, profile: Path) -> str:
    out = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            # Offline: nothing but the API resolves (a CDN request would fail).
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_docs_render_the_operation_list_offline(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    with api_server(service_env, tmp_path / "api.log") as base:
        dom = _dump_dom(f"{base}/docs", tmp_path / "profile")
    paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    for expected in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/quote", "/v1/images", "/healthz"):
        assert expected in paths, (expected, sorted(paths), dom[:2000])
    assert "Tollgate" in dom
