"""Local paths in a job spec: what each one means, and that it is there for whoever reads it.

A spec may name local files and folders: ``model.name_or_path`` (a model folder or a
GGUF file) and ``data.path``, ``data.validation_path``, ``data.test_path``,
``data.promotion_path``. The driver reads the data and the model (its preflight); the
trials' workers read the model again, in processes whose working directory is Ray's
session folder, not the user's; a resume or ``tunefleet replay`` reads the run's saved
spec, perhaps from another directory. So:

- **The driver makes every local path absolute, once** (``with_absolute_paths``),
  relative to the directory the command runs in, before anything reads it. Workers, the
  saved ``job_spec.yaml`` and a resume see absolute paths only.
- **``tunefleet submit`` keeps relative paths relative**: the job's driver resolves them
  in the uploaded working dir, so each must lie in that dir and be uploaded (not
  ignored): ``check_shipped`` refuses the submission otherwise. An absolute path must
  exist on the cluster; the job's own preflight checks that.
- **On a cluster of several nodes** the trials' workers may run on any node, so the
  model's folder (or its ``package:``) must be at the same path on each:
  ``check_on_every_node`` runs a 0-CPU task pinned to every alive node (in the job's
  runtime env, so a working dir is unpacked there first) before the first trial, and
  refuses the run naming the nodes that lack it. A model shipped in a submitted working
  dir passes where every node unpacks it at the same path (one Ray temp dir for all)
  and is refused where not; the model is never copied by tunefleet. Nodes an
  autoscaler adds later cannot be checked then: a model that is not in the image
  belongs on a mount every node has, or use a hub name.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from cluster import storage
from trainers.model import PACKAGE_PREFIX, is_local_path
from tune_jobs.spec import JobSpec, Problem, SpecError

MODEL_KEY = "model.name_or_path"
DATA_PATH_KEYS = ("path", "validation_path", "test_path", "promotion_path")
#: how long a node may take to answer (a fresh worker process, the job's runtime env)
NODE_CHECK_TIMEOUT_S = 120.0


def local_paths(spec: JobSpec, cwd: str | None = None) -> dict[str, str]:
    """The spec's local paths by key (``model.name_or_path``, ``data.<key>``), as written;
    a bare model name is a path when it exists under ``cwd`` (default: here)."""
    out: dict[str, str] = {}
    if is_local_path(spec.model.name_or_path, cwd):
        out[MODEL_KEY] = spec.model.name_or_path
    for key in DATA_PATH_KEYS:
        value = getattr(spec.data, key)
        if value and not storage.is_uri(value):
            out[f"data.{key}"] = value
    return out


def _absolute(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def with_absolute_paths(spec: JobSpec, cwd: str | None = None) -> JobSpec:
    """``spec`` with every local path absolute, relative to ``cwd`` (default: this
    process's working directory). Absolute paths and hub names are left as they are."""
    cwd = cwd or os.getcwd()
    found = local_paths(spec, cwd)
    if not found:
        return spec
    model, data = {}, {}
    for key, value in found.items():
        section, field = key.split(".", 1)
        (model if section == "model" else data)[field] = _absolute(value, cwd)
    return spec.model_copy(
        update={
            "model": spec.model.model_copy(update=model),
            "data": spec.data.model_copy(update=data),
        }
    )


def check_shipped(spec: JobSpec, working_dir: str, uploaded: set[Path]) -> None:
    """``tunefleet submit``: every relative local path lies in ``working_dir`` and each of
    its files is among ``uploaded`` (what Ray uploads, after its ignore rules);
    ``SpecError`` naming the key otherwise. Nothing is submitted then."""
    root = Path(working_dir).absolute()
    problems = []
    for key, value in local_paths(spec, str(root)).items():
        if os.path.isabs(os.path.expanduser(value)):
            continue  # must exist on the cluster: the job's preflight says if it does not
        path = Path(_absolute(value, str(root)))
        where = f"the job reads relative paths in the uploaded working dir ({root})"
        if not path.is_relative_to(root):
            problems.append(
                Problem(
                    key,
                    value,
                    f"outside the working dir that is uploaded; {where}. Move it under "
                    f"{root}, or give a path every node of the cluster has"
                    + (", a hub name or package:<module>" if key == MODEL_KEY else ""),
                )
            )
        elif not path.exists():
            problems.append(Problem(key, value, f"no such file or folder; {where}"))
        else:
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            left_out = [p for p in files if p.absolute() not in uploaded]
            if left_out:
                problems.append(
                    Problem(
                        key,
                        value,
                        f"{left_out[0].relative_to(root)}"
                        + (f" and {len(left_out) - 1} more files" if len(left_out) > 1 else "")
                        + " would not be uploaded: a .gitignore, .rayignore or tunefleet's upload "
                        "excludes leave it out; un-ignore it, or give a path every node of the "
                        "cluster has",
                    )
                )
    if problems:
        raise SpecError(problems)


def _missing_here(kind: str, value: str) -> bool:
    """True when this node lacks the model: a path that does not exist, a module that is
    not installed."""
    if kind == "module":
        return importlib.util.find_spec(value) is None
    return not os.path.exists(value)


def check_on_every_node(spec: JobSpec) -> None:
    """The model's local path (or ``package:`` module) is on every alive node of the
    connected cluster; ``SpecError`` naming the nodes that lack it. One node: nothing to
    check (the preflight read it). A node that does not answer in time is not refused."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = spec.model.name_or_path
    if is_local_path(name):
        kind, value = "path", name
    elif name.startswith(PACKAGE_PREFIX):
        kind, value = "module", name[len(PACKAGE_PREFIX) :]
    else:
        return  # a hub name: every node fetches it (or reads its own hub cache)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(_missing_here)
    refs = {
        n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(kind, value)
        for n in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=NODE_CHECK_TIMEOUT_S)
    lacking = [node for node, ref in refs.items() if ref in ready and ray.get(ref)]
    if lacking:
        what = "folder or file" if kind == "path" else f"module {value!r}"
        raise SpecError(
            [
                Problem(
                    MODEL_KEY,
                    name,
                    f"the {what} is missing on {len(lacking)} of the cluster's {len(nodes)} "
                    f"nodes: {', '.join(lacking)}; the trials' workers may run on any node. "
                    "Put the model at one path on every node (a mount they all have, or the "
                    "image), or use a hub name or package:<module> installed on every node",
                )
            ]
        )
