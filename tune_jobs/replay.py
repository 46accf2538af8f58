"""``tunefleet replay RUN_DIR TRIAL``: retrain from scratch following a PBT trial's schedule.

The schedule of hyperparameters PBT discovered for a trial (its lineage: the
config its earliest ancestor trained from step 0, then each exploit's new config
from the step of the checkpoint it cloned) is read by ``tune_jobs.lineage`` and
replayed as one trial whose worker loop switches hyperparameters at those steps
(``hp_schedule``), rebuilding the trainable set, optimizer and LR schedule from
the current weights exactly as an exploit's restore does.

Tune's ``PopulationBasedTrainingReplay`` is not used: it switches at Tune's
logged training iterations, which under ``synch=True`` can lag the checkpoint
actually cloned, and its pause/restore of a function trainable was seen to write
the next checkpoint over the one restored and end the trial one iteration later
(docs/DECISIONS.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from cluster import storage
from tune_jobs.lineage import LineageError, Schedule, trial_schedule
from tune_jobs.report_log import read_all_reports
from tune_jobs.run import RunOutcome, run_job, run_spec
from tune_jobs.spec import JobSpec, Problem, SpecError, parse_spec

SCHEDULE_FILE = "replay_schedule.json"


def check_replayable(spec: JobSpec) -> None:
    """A run whose trials can be replayed (DDP: the loop switches hyperparameters in place)."""
    if spec.distributed.strategy == "deepspeed":
        raise SpecError(
            [
                Problem(
                    "distributed.strategy",
                    "deepspeed",
                    "replay switches hyperparameters inside the loop, which would rebuild the "
                    "DeepSpeed engine mid-run; not supported yet (replay a ddp run)",
                )
            ]
        )


def replay_spec(spec: JobSpec, trial: str, schedule: Schedule) -> JobSpec:
    """One trial of the same job with the schedule's first config, no search, no smoke pass."""
    check_replayable(spec)
    raw = spec.to_dict()
    raw["search"].update(
        num_samples=1,
        space=dict(schedule.root_config),  # fixed values
        start_with_defaults=False,
        algorithm="random",
    )
    raw["scheduler"] = {"type": "fifo", "time_attr": spec.scheduler.time_attr}
    raw["run"].update(name=f"{spec.run.name}-replay-{trial}", if_exists="overwrite")
    raw["smoke"]["enabled"] = False
    return parse_spec(raw, source="replay")


def load_schedule(run_dir: str, trial: str) -> Schedule:
    """The trial's schedule; ``SpecError`` naming RUN_DIR or TRIAL when it cannot be read."""
    reports = read_all_reports(run_dir)
    if not reports.get(trial):
        trials = sorted(reports)
        raise SpecError(
            [
                Problem(
                    "TRIAL",
                    trial,
                    f"no reports of such a trial in {run_dir}; trials: {', '.join(trials) or 'none'}",
                )
            ]
        )
    try:
        return trial_schedule(run_dir, trial, reports)
    except LineageError as exc:
        raise SpecError([Problem("TRIAL", trial, str(exc))]) from None


def replay(run_dir: str, trial: str, echo: Callable[[str], None] = print) -> RunOutcome:
    """Retrain ``trial`` of the run in ``run_dir`` from scratch along its PBT schedule."""
    run_dir = storage.normalize(run_dir)
    source = run_spec(run_dir)
    check_replayable(source)  # before reading the reports: the spec alone decides
    schedule = load_schedule(run_dir, trial)
    spec = replay_spec(source, trial, schedule)
    echo(f"replaying {trial}: from step 0 {schedule.root_config} (as {schedule.root_trial})")
    for step, config, owner in schedule.switches:
        echo(f"  from step {step}: {config} (as {owner})")
    outcome = run_job(
        spec,
        echo=echo,
        hp_schedule=tuple((step, config) for step, config, _ in schedule.switches),
    )
    storage.write_text(
        storage.join(outcome.run_dir, SCHEDULE_FILE),
        json.dumps({"source_run": run_dir, **schedule.to_dict()}, indent=2),
    )
    return outcome
