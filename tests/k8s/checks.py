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
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: KubeRay v1.7 refuses longer RayJob names: it appends 6 characters for the RayCluster,
#: whose name may have 53 (utils.MaxRayJobNameLength).
RAYJOB_NAME_MAX = 47
VERSION = re.compile(r"\d+\.\d+\.\d+")
#: A RayCronJob names each RayJob it creates ``<name>-<5 random characters>``.
RAYCRONJOB_SUFFIX = "-xxxxx"
#: All the RBAC a manifest here may grant: (apiGroup, resource) -> verbs. The CronJob
#: fallback creates the retrain's RayJob, watches it, and may delete it.
ALLOWED_RBAC = {("ray.io", "rayjobs"): frozenset({"create", "get", "list", "watch", "delete"})}
ALLOWED_RBAC_TEXT = "; ".join(
    f"{g}/{r}: {' '.join(sorted(v))}" for (g, r), v in ALLOWED_RBAC.items()
)
#: Subcommands whose first argument is a job spec file (which must be mounted).
SPEC_COMMANDS = frozenset({"run", "retrain", "smoke", "validate"})


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every version of every CRD in ``crds/``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    # libyaml's loader where PyYAML has it: the pure-Python one takes ~10 s on these files.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
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
    rayjob_name_ok = isinstance(name, str) and len(name) <= RAYJOB_NAME_MAX and DNS1035.match(name)
    if doc.get("kind") == "RayJob" and not rayjob_name_ok:
        problems.append(
            f"metadata.name: {name!r}: KubeRay wants a DNS-1035 label of at most "
            f"{RAYJOB_NAME_MAX} characters for a RayJob"
        )
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


def embedded_rayjobs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, RayJob) of the RayJobs an object holds: a RayCronJob's ``jobTemplate`` (a bare
    RayJob spec, named as the operator would name its RayJobs) and every ConfigMap value that
    is a RayJob manifest."""
    spec = doc.get("spec") or {}
    name = (doc.get("metadata") or {}).get("name", "")
    if doc.get("kind") == "RayCronJob" and isinstance(spec.get("jobTemplate"), dict):
        yield (
            "spec.jobTemplate",
            {
                "apiVersion": doc.get("apiVersion"),
                "kind": "RayJob",
                "metadata": {"name": f"{name}{RAYCRONJOB_SUFFIX}"},
                "spec": spec["jobTemplate"],
            },
        )
    if doc.get("kind") == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            try:
                manifest = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(manifest, dict) and manifest.get("kind") == "RayJob":
                yield f"data.{key}", manifest


def cluster_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, RayClusterSpec) in a RayCluster, RayJob or RayService (a RayCronJob's is in its
    embedded RayJob)."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        yield "spec", spec
    elif kind == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]
    elif kind == "RayService" and isinstance(spec.get("rayClusterConfig"), dict):
        yield "spec.rayClusterConfig", spec["rayClusterConfig"]


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
    if doc.get("kind") == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        yield "spec.jobTemplate.spec.template.spec", (job.get("template") or {}).get("spec") or {}


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
    """Non-root, no privilege escalation, all capabilities dropped, a read-only root
    filesystem, requests == limits, an image with a version tag."""
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
        if csec.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: securityContext.readOnlyRootFilesystem must be true")
        image = c.get("image")
        if image is not None:
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                problems.append(f"{where}: image {image!r} has no version tag")
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
    for where, c, _ in containers(doc) if doc.get("kind") in RAY_KINDS else ():
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
    """A RayJob's entrypoint is ``python -m tune_jobs <subcommand> ...`` with a real
    subcommand, and a job spec it names lies in a ConfigMap mounted on the head."""
    if doc.get("kind") != "RayJob":
        return []
    entry = (doc.get("spec") or {}).get("entrypoint")
    words = shlex.split(entry or "")
    if words[:3] != ["python", "-m", "tune_jobs"] or len(words) < 4:
        return [f"spec.entrypoint: {entry!r} is not `python -m tune_jobs <command> ...`"]
    if words[3] not in subcommands:
        return [f"spec.entrypoint: {words[3]!r} is not a tune_jobs command {sorted(subcommands)}"]
    if words[3] in SPEC_COMMANDS and len(words) > 4 and words[4].startswith("/"):
        folder = words[4].rsplit("/", 1)[0]
        if folder not in head_configmap_mounts(doc):
            return [
                f"spec.entrypoint: {words[4]} is not in a ConfigMap mounted on the head "
                f"(mounted: {sorted(head_configmap_mounts(doc))})"
            ]
    return []


def head_configmap_mounts(doc: dict[str, Any]) -> set[str]:
    """Mount paths of ConfigMap volumes in the head container of a RayJob's cluster."""
    cs = (doc.get("spec") or {}).get("rayClusterSpec") or {}
    pod = ((cs.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
    configmaps = {v.get("name") for v in pod.get("volumes") or [] if "configMap" in v}
    head = (pod.get("containers") or [{}])[0]
    return {
        m.get("mountPath", "").rstrip("/")
        for m in head.get("volumeMounts") or []
        if m.get("name") in configmaps
    }


def entrypoint_command(doc: dict[str, Any]) -> str | None:
    """The tune_jobs subcommand a RayJob runs, if its entrypoint is one."""
    words = shlex.split((doc.get("spec") or {}).get("entrypoint") or "")
    return words[3] if words[:3] == ["python", "-m", "tune_jobs"] and len(words) > 3 else None


def check_cronjob_policy(doc: dict[str, Any]) -> list[str]:
    """A CronJob never overlaps its previous run, keeps a bounded history, skips a run it
    could not start in time, and bounds each run's time and retries."""
    if doc.get("kind") != "CronJob":
        return []
    spec = doc.get("spec") or {}
    problems = []
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(
            f"spec.concurrencyPolicy: {spec.get('concurrencyPolicy')!r} must be Forbid "
            "(a run must not start while the previous one is active)"
        )
    for key in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit", "startingDeadlineSeconds"):
        if not isinstance(spec.get(key), int):
            problems.append(f"spec.{key}: must be set (an integer)")
    job = (spec.get("jobTemplate") or {}).get("spec") or {}
    for key in ("activeDeadlineSeconds", "backoffLimit"):
        if not isinstance(job.get(key), int):
            problems.append(f"spec.jobTemplate.spec.{key}: must be set (an integer)")
    return problems


def check_rbac(doc: dict[str, Any]) -> list[str]:
    """RBAC stays in the namespace (Role and RoleBinding, never their cluster-wide kinds),
    names every group, resource and verb (no ``*``), and grants only ``ALLOWED_RBAC``; a
    RoleBinding binds a Role to ServiceAccounts of its own namespace."""
    kind = doc.get("kind")
    if kind in ("ClusterRole", "ClusterRoleBinding"):
        return [f"{kind}: cluster-wide RBAC; use a Role and a RoleBinding in the namespace"]
    problems: list[str] = []
    if kind == "Role":
        for i, rule in enumerate(doc.get("rules") or []):
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                if "*" in (rule.get(field) or []):
                    problems.append(f"rules[{i}].{field}: wildcard '*'; name each one")
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    allowed = ALLOWED_RBAC.get((group, resource), frozenset())
                    for verb in rule.get("verbs") or []:
                        if verb != "*" and verb not in allowed:
                            problems.append(
                                f"rules[{i}]: {verb!r} on {group or 'core'}/{resource} is not "
                                f"allowed (only {ALLOWED_RBAC_TEXT})"
                            )
    if kind == "RoleBinding":
        ref = doc.get("roleRef") or {}
        if ref.get("kind") != "Role":
            problems.append(f"roleRef.kind: {ref.get('kind')!r} must be Role")
        own = (doc.get("metadata") or {}).get("namespace")
        for i, subject in enumerate(doc.get("subjects") or []):
            if subject.get("kind") != "ServiceAccount":
                problems.append(
                    f"subjects[{i}].kind: {subject.get('kind')!r} must be ServiceAccount"
                )
            if subject.get("namespace") not in (None, own):
                problems.append(
                    f"subjects[{i}].namespace: {subject.get('namespace')!r}; leave it out "
                    "(the RoleBinding's own namespace)"
                )
    return problems


def check_lock_ttl(docs: list[dict[str, Any]]) -> list[str]:
    """A retrain's registry lock outlasts every deadline that can stop the retrain.

    ``retrain.lock_ttl_s`` of each job spec ConfigMap (stated, not left to the default) must
    be >= the ``activeDeadlineSeconds`` of every RayJob that runs ``retrain`` (RayCronJob
    templates and RayJob manifests in ConfigMaps included) and of every CronJob's Job: a lock
    that expires under a live retrain lets the next one in beside it. Renders without a
    retrain have nothing to check."""
    deadlines: list[tuple[str, Any]] = []
    for doc in docs:
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        for where, job in [("", doc), *embedded_rayjobs(doc)]:
            if job.get("kind") == "RayJob" and entrypoint_command(job) == "retrain":
                at = f"{name} {where}.spec" if where else f"{name} spec"
                deadlines.append((at, (job.get("spec") or {}).get("activeDeadlineSeconds")))
        if doc.get("kind") == "CronJob":
            job = ((doc.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}
            deadlines.append((f"{name} spec.jobTemplate.spec", job.get("activeDeadlineSeconds")))
    if not deadlines:
        return []
    problems = [
        f"{where}.activeDeadlineSeconds: not set, so a retrain could outlive its lock"
        for where, seconds in deadlines
        if not isinstance(seconds, int)
    ]
    for doc in docs:
        if doc.get("kind") != "ConfigMap" or "job.yaml" not in (doc.get("data") or {}):
            continue
        name = f"ConfigMap/{(doc.get('metadata') or {}).get('name')}"
        ttl = ((yaml.safe_load(doc["data"]["job.yaml"]) or {}).get("retrain") or {}).get(
            "lock_ttl_s"
        )
        if not isinstance(ttl, (int, float)):
            problems.append(
                f"{name}: job.yaml retrain.lock_ttl_s is not set; state it next to the "
                "deadlines it must outlast"
            )
            continue
        problems += [
            f"{where}.activeDeadlineSeconds: {seconds} > retrain.lock_ttl_s {ttl:g} in {name}"
            for where, seconds in deadlines
            if isinstance(seconds, int) and seconds > ttl
        ]
    return problems


def check_doc(doc: dict[str, Any], ray_version: str, subcommands: set[str]) -> list[str]:
    """Every per-object check on one object, and on each RayJob it holds."""
    found = check_metadata(doc)
    if doc.get("kind") in RAY_KINDS:
        found += check_crd_kind(doc)
    else:
        found += check_builtin_kind(doc)
    found += check_container_policy(doc)
    found += check_secrets(doc)
    found += check_ray_fields(doc, ray_version)
    found += check_entrypoints(doc, subcommands)
    found += check_cronjob_policy(doc)
    found += check_rbac(doc)
    for where, job in embedded_rayjobs(doc):
        found += [f"{where}: {p}" for p in check_doc(job, ray_version, subcommands)]
    return found


def check_docs(docs: list[dict[str, Any]], ray_version: str, subcommands: set[str]) -> list[str]:
    """Every check on every rendered document; problems are prefixed with kind/name."""
    problems: list[str] = []
    for doc in docs:
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        problems += [f"{name}: {p}" for p in check_doc(doc, ray_version, subcommands)]
    return problems + check_lock_ttl(docs)
