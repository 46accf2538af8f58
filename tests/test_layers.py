"""The layer rule (STYLE.md): tune_jobs -> cluster, tune_jobs -> trainers; nothing else."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "trainers": ("tune_jobs", "cluster", "ray.tune"),
    "cluster": ("tune_jobs", "trainers", "ray.tune"),
}


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upward(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if (path, name) == RAY_INTERNALS_HOME:
                continue
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


#: The one exception: the home of Ray's internals reads Tune's list of propagated
#: environment variables (a module global of Tune's execution layer, no Tune API)
RAY_INTERNALS_HOME = (ROOT / "cluster" / "ray_private.py", "ray.tune.execution")


def test_nothing_imports_main():
    for path in ROOT.glob("*/*.py"):
        if path.parts[-2] in ("tune_jobs", "trainers", "cluster"):
            assert "tune_jobs.__main__" not in _imports(path), path


#: Ray's non-public modules: only ``cluster/ray_private.py`` may import them (it says why
#: for each, and tests/cluster/test_ray_private.py checks each against the pinned Ray)
RAY_PRIVATE = ("ray._private", "ray._raylet", "ray.train._internal", "ray.tune.execution")


def test_only_ray_private_imports_rays_internals():
    offenders = []
    for package in ("tune_jobs", "trainers", "cluster"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "cluster" / "ray_private.py":
                continue
            for name in _imports(path):
                if any(name == p or name.startswith(p + ".") for p in RAY_PRIVATE):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


#: Modules whose classes are Ray actors that never train: each actor is a process that
#: imports its class's module, and torch with transformers cost 3-5 CPU-seconds there
#: (measured: the mailbox's process 6.3 CPU-seconds to start when it imported them, 2.4
#: without). ``tune_jobs.warm``: a warm trial's actor drives a group of workers elsewhere.
LIGHT_ACTOR_MODULES = ("tune_jobs.mailbox", "tune_jobs.leader", "tune_jobs.warm")


def test_actors_that_never_train_do_not_import_torch():
    import subprocess
    import sys

    heavy = ("torch", "transformers", "deepspeed", "peft")
    code = (
        f"import sys; import {', '.join(LIGHT_ACTOR_MODULES)}; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"], out.stdout
