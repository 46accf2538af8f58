"""Start small: the same pipeline on a small subset, a few steps, one or two trials.

Catches bad specs, bad data, out-of-memory (the real per-trial resources are
used), metric-name mistakes and checkpoint/restore problems in about a minute,
before a sweep spends hours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster import storage
from cluster.connect import disconnect
from tune_jobs import layout
from tune_jobs.spec import JobSpec, parse_spec

if TYPE_CHECKING:
    from tune_jobs.budget import TrialCost


class SmokeError(RuntimeError):
    """The smoke pass failed; the message says which stage and why."""


@dataclass(frozen=True)
class SmokeOutcome:
    """What the smoke pass proved."""

    seconds: float
    trials: int
    report_steps: list[int]
    resumed_steps: list[int]
    run_dir: str
    #: one trial's cost as measured here (what ``search.budget`` is checked against)
    cost: TrialCost | None = None


def smoke_spec(spec: JobSpec) -> JobSpec:
    """The job shrunk to a smoke pass (same model, data source, resources and metric)."""
    raw = spec.to_dict()
    sm = spec.smoke

    def cap(current: int | None, limit: int) -> int:
        return min(current, limit) if current else limit

    raw["data"].update(
        max_train_samples=cap(spec.data.max_train_samples, sm.max_train_samples),
        max_eval_samples=cap(spec.data.max_eval_samples, sm.max_eval_samples),
        max_test_samples=cap(spec.data.max_test_samples, sm.max_eval_samples),
    )
    raw["training"].update(
        max_steps=sm.max_steps,
        eval_strategy="steps",
        eval_steps=sm.max_steps // 2,
        checkpoint_every_s=0,  # every evaluation resumable: the restore check needs one
    )
    # grids would multiply the trials: sample from their values instead; budgets are fixed by max_steps
    space = {
        k: ({"choice": v["grid"]} if isinstance(v, dict) and "grid" in v else v)
        for k, v in spec.search.space.items()
        if k not in ("num_train_epochs", "max_steps", "gradual_unfreeze_every")
    }
    # no budget (the pass is what prices a trial for it), no probe (the sweep runs it), no
    # retraining on seeds
    raw["search"].update(
        space=space,
        num_samples=sm.trials,
        algorithm="random",
        budget={},
        probe=False,
        reevaluate={"top_k": 0},
    )
    raw["scheduler"] = {"type": "fifo"}
    raw["run"].update(name=f"{spec.run.name}-smoke", if_exists="overwrite")
    raw["smoke"]["enabled"] = False
    return parse_spec(raw, source="smoke pass")


def run_smoke(
    spec: JobSpec, echo: Callable[[str], None] = print, keep_ray: bool = False
) -> SmokeOutcome:
    """Run the smoke pass; ``SmokeError`` on any failure. Bad input still raises its own error (exit 2)."""
    from tune_jobs.run import run_job

    started = time.monotonic()
    small = smoke_spec(spec)
    echo(
        f"smoke pass: {small.search.num_samples} trial(s) x {small.training.max_steps} steps on "
        f"{small.data.max_train_samples} rows, then a checkpoint restore"
    )
    try:
        outcome = run_job(small, echo=echo, keep_ray=True, report=False)
        summary = outcome.summary
        metric = small.search.metric
        broken = [t for t in summary["trials"] if t["status"] == "ERROR"]
        if broken:
            raise SmokeError(f"smoke pass: trial {broken[0]['trial']} failed: {broken[0]['error']}")
        missing = [t["trial"] for t in summary["trials"] if metric not in t["last"]]
        if missing:
            raise SmokeError(
                f"smoke pass: trials {missing} never reported search.metric={metric!r}"
            )
        steps = [t["last"]["step"] for t in summary["trials"]]
        if any(s != small.training.max_steps for s in steps):
            raise SmokeError(
                f"smoke pass: trials stopped at steps {steps}, expected {small.training.max_steps}"
            )
        resumed = _restore_check(small, outcome.run_dir, summary, outcome.data_ref)
    finally:
        if not keep_ray:
            disconnect()
    seconds = time.monotonic() - started
    cost = measured_cost(outcome.run_dir)
    echo(
        f"smoke pass ok in {seconds:.0f} s: reports at steps {steps}, restore continued at steps {resumed}"
        + (
            f"; a trial starts in {cost.startup_s:.1f} s and trains at "
            f"{cost.per_example_s * 1000:.2f} ms per example"
            if cost
            else ""
        )
    )
    return SmokeOutcome(seconds, len(summary["trials"]), steps, resumed, outcome.run_dir, cost)


def measured_cost(run_dir: str) -> TrialCost | None:
    """A trial's start-up seconds and seconds per training example, from the smoke trials'
    reports (each trial's clock at its two reports, and the examples its steps took)."""
    from tune_jobs.budget import TrialCost
    from tune_jobs.report_log import read_all_reports

    return TrialCost.of_reports(read_all_reports(run_dir))


def _restore_check(
    small: JobSpec, run_dir: str, summary: dict[str, Any], data_ref: Any
) -> list[int]:
    """Resume the best trial's last checkpoint for two more steps in a new Train run
    (on the run's own data, still in the object store)."""
    from tune_jobs.groups import resume_check
    from tune_jobs.run import trial_resources
    from tune_jobs.space import trial_hparams
    from tune_jobs.trial import TrialPlan

    best = summary["best"]
    if not best or not best.get("checkpoint"):
        raise SmokeError(
            "smoke pass: no checkpoint was written (training.save_checkpoints is off?)"
        )
    plan = TrialPlan(small, data_ref, layout.train_runs(run_dir), trial_resources(small))
    trial_dir = storage.join(plan.train_storage, best["trial"])
    latest = layout.latest_checkpoint(trial_dir)
    if latest is None:
        raise SmokeError(f"smoke pass: trial {best['trial']} left no checkpoint under {trial_dir}")
    hp = trial_hparams(small, best["config"])
    steps = resume_check(plan, hp, latest, extra_steps=2)
    expected = [small.training.max_steps + 2]
    if steps != expected:
        raise SmokeError(f"smoke pass: restored run reported steps {steps}, expected {expected}")
    return steps
