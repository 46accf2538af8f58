"""Offline checks of rendered Kubernetes manifests; each returns a list of problems.

The ray.io kinds are checked against the KubeRay v1.7.0 CRD schemas in ``crds/`` with
``jsonschema`` and a strict walk (the CRDs do not set ``additionalProperties: false``, so
jsonschema alone lets a misspelt field through, which ``kubectl apply`` with strict field
validation would reject). Built-in kinds go to ``kubernetes-validate --strict``. The
rest is house policy: non-root containers, requests = limits, secrets by reference only,
string rayStartParams, versions equal to the pins, entrypoints that name real commands.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).parent / "crds"
#: Kubernetes version the built-in kinds are validated against (kubectl is v1.32).
K8S_VERSION = "1.32"
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob", "RayService"}
#: The v1.7 CRD types spec.submissionMode as a plain string (no enum); these are the
#: JobSubmissionMode values the v1.7 operator accepts. An enum in the CRD wins.
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
VERSION = re.compile(r"\d+\.\d+\.\d+")


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every version of every CRD in ``crds/``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def strict_walk(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Unknown fields, the way kubectl's strict field validation finds them: an object whose
    schema lists ``properties`` and neither preserves unknown fields nor gives an
    ``additionalProperties`` schema may hold only those properties."""
    if schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        return []
    problems: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                problems += strict_walk(item, props[key], where)
            elif isinstance(extra, dict):
                problems += strict_walk(item, extra, where)
            elif props is not None and extra is None:
                problems.append(f"{where}: unknown field (not in the schema)")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += strict_walk(item, schema["items"], f"{path}[{i}]")
    return problems


def check_metadata(doc: dict[str, Any]) -> list[str]:
    """apiVersion, kind and a DNS-1123 metadata.name; string labels and annotations."""
    problems = [f"{k}: missing" for k in ("apiVersion", "kind") if not doc.get(k)]
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return [*problems, "metadata: missing"]
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS1123.match(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 name")
    for field in ("labels", "annotations"):
        for key, val in (meta.get(field) or {}).items():
            if not isinstance(val, str):
                problems.append(f"metadata.{field}.{key}: {val!r} is not a string")
    return problems


def check_crd_kind(doc: dict[str, Any]) -> list[str]:
    """A ray.io object against its CRD version's schema: jsonschema, then the strict walk."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = crd_schemas().get(key)  # type: ignore[arg-type]
    if schema is None:
        return [f"{key[0]} {key[1]}: no CRD schema for this apiVersion and kind"]
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    return problems + strict_walk(doc, schema)


def check_builtin_kind(doc: dict[str, Any]) -> list[str]:
    """A built-in kind with kubernetes-validate in strict mode (unknown fields are errors)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "<root>"
        return [f"{doc.get('kind')} {where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{doc.get('kind')}: no schema in kubernetes-validate ({e})"]
    return []


def cluster_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, RayClusterSpec) in a RayCluster, RayJob, RayService or RayCronJob."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        yield "spec", spec
    elif kind == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]
    elif kind == "RayService" and isinstance(spec.get("rayClusterConfig"), dict):
        yield "spec.rayClusterConfig", spec["rayClusterConfig"]
    elif kind == "RayCronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        if isinstance(job.get("rayClusterSpec"), dict):
            yield "spec.jobTemplate.spec.rayClusterSpec", job["rayClusterSpec"]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, PodSpec) of every pod the object makes."""
    for where, cs in cluster_specs(doc):
        head = (cs.get("headGroupSpec") or {}).get("template") or {}
        yield f"{where}.headGroupSpec.template.spec", head.get("spec") or {}
        for i, group in enumerate(cs.get("workerGroupSpecs") or []):
            yield (
                f"{where}.workerGroupSpecs[{i}].template.spec",
                (group.get("template") or {}).get("spec") or {},
            )
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob" and isinstance(spec.get("submitterPodTemplate"), dict):
        yield "spec.submitterPodTemplate.spec", spec["submitterPodTemplate"].get("spec") or {}
    if doc.get("kind") == "Pod":
        yield "spec", spec
    template = spec.get("template") if isinstance(spec, dict) else None
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job") and template:
        yield "spec.template.spec", template.get("spec") or {}


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(path, container, pod securityContext) of every container, the autoscaler included."""
    for where, pod in pod_specs(doc):
        pod_sec = pod.get("securityContext") or {}
        for field in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(field) or []):
                yield f"{where}.{field}[{i}]", c, pod_sec
    for where, cs in cluster_specs(doc):
        if cs.get("enableInTreeAutoscaling"):
            yield f"{where}.autoscalerOptions", cs.get("autoscalerOptions") or {}, {}


def check_container_policy(doc: dict[str, Any]) -> list[str]:
    """Non-root, no privilege escalation, all capabilities dropped, requests == limits."""
    problems: list[str] = []
    for where, c, pod_sec in containers(doc):
        sec = {**pod_sec, **(c.get("securityContext") or {})}
        if sec.get("runAsNonRoot") is not True:
            problems.append(f"{where}: securityContext.runAsNonRoot must be true")
        if sec.get("runAsUser") in (None, 0):
            problems.append(f"{where}: securityContext.runAsUser must be a non-zero uid")
        csec = c.get("securityContext") or {}
        if csec.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
        if csec.get("privileged"):
            problems.append(f"{where}: securityContext.privileged must not be set")
        if "ALL" not in ((csec.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{where}: securityContext.capabilities.drop must hold ALL")
        if (csec.get("capabilities") or {}).get("add"):
            problems.append(f"{where}: securityContext.capabilities.add must be empty")
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        for name in ("cpu", "memory"):
            if name not in lim:
                problems.append(f"{where}: resources.limits.{name} missing")
        if str_map(req) != str_map(lim):
            problems.append(f"{where}: resources.requests {req} != limits {lim}")
    return problems


def str_map(m: dict[str, Any]) -> dict[str, str]:
    """Quantities compared as strings ("2" and 2 are the same request)."""
    return {k: str(v) for k, v in m.items()}


def check_secrets(doc: dict[str, Any]) -> list[str]:
    """No env var whose name says KEY/SECRET/TOKEN/PASSWORD has a literal value."""
    problems: list[str] = []
    for where, c, _ in containers(doc):
        for i, env in enumerate(c.get("env") or []):
            name = str(env.get("name", "")).upper()
            if any(w in name for w in SECRET_WORDS) and "value" in env:
                problems.append(
                    f"{where}.env[{i}] {env.get('name')}: a literal value; use valueFrom.secretKeyRef"
                )
    return problems


def check_ray_fields(doc: dict[str, Any], ray_version: str) -> list[str]:
    """String rayStartParams, rayVersion and image tags at the pinned Ray version, a known
    submissionMode."""
    problems: list[str] = []
    for where, cs in cluster_specs(doc):
        if cs.get("rayVersion") != ray_version:
            problems.append(f"{where}.rayVersion: {cs.get('rayVersion')!r} != ray {ray_version}")
        groups = [("headGroupSpec", cs.get("headGroupSpec") or {})] + [
            (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cs.get("workerGroupSpecs") or [])
        ]
        for gname, group in groups:
            for key, val in (group.get("rayStartParams") or {}).items():
                if not isinstance(val, str):
                    problems.append(
                        f"{where}.{gname}.rayStartParams.{key}: {val!r} must be a string"
                    )
        image = (cs.get("autoscalerOptions") or {}).get("image")
        if image:
            problems += check_image_tag(f"{where}.autoscalerOptions.image", image, ray_version)
    for where, c, _ in containers(doc):
        if c.get("image"):
            problems += check_image_tag(f"{where}.image", c["image"], ray_version)
    if doc.get("kind") == "RayJob":
        mode = (doc.get("spec") or {}).get("submissionMode")
        if mode is not None and mode not in allowed_submission_modes(doc.get("apiVersion", "")):
            problems.append(
                f"spec.submissionMode: {mode!r} not one of {allowed_submission_modes(doc.get('apiVersion', ''))}"
            )
    return problems


def allowed_submission_modes(api_version: str) -> tuple[str, ...]:
    """The CRD's enum for spec.submissionMode where it has one, else SUBMISSION_MODES."""
    schema = crd_schemas().get((api_version, "RayJob")) or {}
    field = schema.get("properties", {}).get("spec", {}).get("properties", {})
    return tuple(field.get("submissionMode", {}).get("enum") or SUBMISSION_MODES)


def check_image_tag(where: str, image: str, ray_version: str) -> list[str]:
    """The image's tag names the pinned Ray version (e.g. ``...:ray2.60.0-py311-cpu``)."""
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    found = VERSION.search(tag)
    if not found or found.group(0) != ray_version:
        return [f"{where}: tag of {image!r} does not name ray {ray_version}"]
    return []


def check_entrypoints(doc: dict[str, Any], subcommands: set[str]) -> list[str]:
    """Each RayJob entrypoint is ``python -m tune_jobs <subcommand> ...`` with a real subcommand."""
    jobs = []
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        jobs.append(("spec.entrypoint", spec.get("entrypoint")))
    if doc.get("kind") == "RayCronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        jobs.append(("spec.jobTemplate.spec.entrypoint", job.get("entrypoint")))
    problems = []
    for where, entry in jobs:
        words = shlex.split(entry or "")
        if words[:3] != ["python", "-m", "tune_jobs"] or len(words) < 4:
            problems.append(f"{where}: {entry!r} is not `python -m tune_jobs <command> ...`")
        elif words[3] not in subcommands:
            problems.append(
                f"{where}: {words[3]!r} is not a tune_jobs command {sorted(subcommands)}"
            )
    return problems


def check_docs(docs: list[dict[str, Any]], ray_version: str, subcommands: set[str]) -> list[str]:
    """Every check on every rendered document; problems are prefixed with kind/name."""
    problems: list[str] = []
    for doc in docs:
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        found = check_metadata(doc)
        if doc.get("kind") in RAY_KINDS:
            found += check_crd_kind(doc)
        else:
            found += check_builtin_kind(doc)
        found += check_container_policy(doc)
        found += check_secrets(doc)
        found += check_ray_fields(doc, ray_version)
        found += check_entrypoints(doc, subcommands)
        problems += [f"{name}: {p}" for p in found]
    return problems
