"""``tunefleet replay RUN_DIR TRIAL``: retrain from scratch following a PBT trial's schedule.

The schedule of hyperparameters PBT discovered for a trial (its lineage: the
root ancestor's config, then each exploit's new config at its iteration) is
read from Tune's ``pbt_policy_<trial id>.txt`` and replayed with Tune's
``PopulationBasedTrainingReplay`` on a single trial of the same job spec.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from cluster import storage
from tune_jobs.run import RunOutcome, run_job
from tune_jobs.spec import JobSpec, Problem, SpecError, load_spec, parse_spec

SPEC_FILE = "job_spec.yaml"


def policy_path(run_dir: str, trial: str) -> tuple[str, list[dict[str, Any]]]:
    """The trial's PBT policy file and its result rows; ``SpecError`` naming what is missing."""
    results = storage.join(run_dir, trial, "result.json")
    if not storage.exists(results):
        trials = sorted(n for n in storage.list_names(run_dir) if n.startswith("trial_"))
        raise SpecError(
            [
                Problem(
                    "TRIAL",
                    trial,
                    f"no such trial in {run_dir}; trials: {', '.join(trials) or 'none'}",
                )
            ]
        )
    rows = [json.loads(line) for line in storage.read_text(results).splitlines() if line.strip()]
    if not rows:
        raise SpecError([Problem("TRIAL", trial, "the trial never reported")])
    return storage.join(run_dir, f"pbt_policy_{rows[0]['trial_id']}.txt"), rows


def replay_spec(spec: JobSpec, trial: str) -> JobSpec:
    """One trial of the same job, with no search and no smoke pass."""
    raw = spec.to_dict()
    raw["search"].update(num_samples=1, space={}, start_with_defaults=False, algorithm="random")
    raw["scheduler"] = {"type": "fifo", "time_attr": spec.scheduler.time_attr}
    raw["run"].update(name=f"{spec.run.name}-replay-{trial}", if_exists="overwrite")
    raw["smoke"]["enabled"] = False
    return parse_spec(raw, source="replay")


def replay(run_dir: str, trial: str, echo: Callable[[str], None] = print) -> RunOutcome:
    """Retrain ``trial`` of the run in ``run_dir`` from scratch along its PBT schedule."""
    from ray.tune.schedulers import PopulationBasedTrainingReplay

    run_dir = storage.normalize(run_dir)
    spec_file = storage.join(run_dir, SPEC_FILE)
    if not storage.exists(spec_file):
        raise SpecError(
            [Problem("RUN_DIR", run_dir, f"no {SPEC_FILE}: not a tunefleet run folder")]
        )
    policy, rows = policy_path(run_dir, trial)
    work = tempfile.mkdtemp(prefix="tunefleet-replay-")
    try:
        local_spec = os.path.join(work, SPEC_FILE)
        with open(local_spec, "w") as fh:
            fh.write(storage.read_text(spec_file))
        spec = replay_spec(load_spec(local_spec), trial)
        if storage.exists(policy):
            local_policy = os.path.join(work, os.path.basename(policy))
            with open(local_policy, "w") as fh:
                fh.write(storage.read_text(policy))
            scheduler = PopulationBasedTrainingReplay(local_policy)
            echo(
                f"replaying {trial}: {len(scheduler._policy)} change(s) of hyperparameters, from {scheduler.config}"
            )
        else:
            # Never exploited: its schedule is its own config throughout.
            scheduler = None
            raw = spec.to_dict()
            raw["search"]["space"] = dict(rows[0]["config"])  # fixed values
            spec = parse_spec(raw, source="replay")
            echo(f"{trial} was never exploited: replaying its config {rows[0]['config']}")
        return run_job(spec, echo=echo, scheduler=scheduler)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def config_schedule(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct configs a trial's reports went through, in order."""
    out: list[dict[str, Any]] = []
    for row in rows:
        if not out or row["config"] != out[-1]:
            out.append(row["config"])
    return out
