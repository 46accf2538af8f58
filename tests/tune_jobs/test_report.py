"""The run report on run folders written here (no Ray): what it says, in what order, what it
draws, and what it does with a run that is not finished or not a run at all.

The report of real sweeps (ASHA, PBT, failed trials), opened in a real browser, is in the
end-to-end modules that run them (``tests/e2e/browser.py``).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import yaml

from trainers import metrics as M
from tune_jobs.report import REPORT_ASSETS, REPORT_HTML, REPORT_MD, read_run, write_report
from tune_jobs.report.card import model_card
from tune_jobs.report.collect import FINISHED, IN_PROGRESS, NOT_STARTED
from tune_jobs.report.importance import MIN_TRIALS, fanova
from tune_jobs.report.plots import runs_of
from tune_jobs.spec import parse_spec

SPACE = {
    "learning_rate": {"loguniform": [1.0e-5, 1.0e-3]},
    "weight_decay": {"uniform": [0.0, 0.1]},
}
TOTAL = 20


def _spec(**search):
    return parse_spec(
        {
            "model": {"max_length": 32},
            "training": {"max_steps": TOTAL, "eval_steps": 5, "warmup_ratio": 0.2},
            "search": {"metric": "eval_accuracy", "num_samples": 8, "space": SPACE, **search},
            "scheduler": {"type": "asha", "time_attr": "step"},
            "run": {"name": "rep"},
        }
    )


def _rows(config: dict, final: float, steps: int = TOTAL) -> list[dict]:
    """A trial's reports every 5 steps, its accuracy rising to ``final``."""
    out = []
    for i, step in enumerate(range(5, steps + 1, 5), start=1):
        acc = 0.5 + (final - 0.5) * step / TOTAL
        out.append(
            {
                M.STEP: step,
                M.TOTAL_STEPS: TOTAL,
                M.EVAL_ACCURACY: acc,
                M.EVAL_F1: acc - 0.01,
                M.EVAL_LOSS: 1.0 - acc,
                M.TRAIN_LOSS: 0.9 - acc,
                M.LOSS_GAP: 0.1,
                M.LR: config["learning_rate"],
                M.RESTORED_FROM_STEP: -1,
                "training_iteration": i,
                "time_total_s": 2.0 * i,
                "trial_id": "x",
                "config": config,
            }
        )
    return out


def write_run(root: Path, trials: dict[str, list[dict]], summary: bool = True, failed=()) -> Path:
    """A run folder as a sweep leaves it: the spec, every trial's reports, the failures,
    and (``summary``) summary.json."""
    run = root / "rep"
    (run / "reports").mkdir(parents=True)
    (run / "job_spec.yaml").write_text(_spec().to_yaml())
    for trial, rows in trials.items():
        (run / "reports" / f"{trial}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for trial in failed:
        (run / "failures").mkdir(exist_ok=True)
        (run / "failures" / f"{trial}.json").write_text(
            json.dumps({"trial": trial, "error": "Traceback ...\nValueError: bad weights"})
        )
    if summary:
        best = max(
            (t for t in trials if trials[t]),
            key=lambda t: max(r[M.EVAL_ACCURACY] for r in trials[t]),
        )
        doc = {
            "run": "rep",
            "run_dir": str(run),
            "metric": M.EVAL_ACCURACY,
            "mode": "max",
            "task": "sequence_classification",
            "data": {"rows": 1000, "train": 600, "validation": 200, "test": 200},
            "majority_baseline": {"validation_accuracy": 0.52, "test_accuracy": 0.5},
            "best": {
                "trial": best,
                "config": trials[best][0]["config"],
                "metrics": trials[best][-1],
                "export_dir": str(run / "best_model"),
                "test": {M.EVAL_ACCURACY: 0.81},
            },
            "trials": [
                {
                    "trial": t,
                    "status": "ERROR" if t in failed else "TERMINATED",
                    "config": rows[0]["config"],
                    "best": rows[-1],
                    "last": rows[-1],
                    "reports": len(rows),
                    "stopped_early": rows[-1][M.STEP] < TOTAL,
                }
                for t, rows in trials.items()
                if rows
            ],
            "failed_trials": {},
            "exploits": [],
            "wall_time_s": 60.0,
        }
        (run / "summary.json").write_text(json.dumps(doc))
    return run


def _sweep(n: int, seed: int = 0, stopped: bool = True) -> dict[str, list[dict]]:
    """``n`` trials whose accuracy depends on the learning rate alone (peak at 1e-4),
    not on the weight decay; (``stopped``) every third stopped at half its budget."""
    rng = random.Random(seed)
    trials = {}
    for i in range(n):
        lr = 10 ** rng.uniform(-5, -3)
        config = {"learning_rate": lr, "weight_decay": rng.uniform(0.0, 0.1)}
        final = 0.9 - 0.15 * abs(math.log10(lr) + 4)
        trials[f"trial_{i:05d}"] = _rows(config, final, 10 if stopped and i % 3 == 0 else TOTAL)
    return trials


def test_a_finished_run_reports_best_first_with_every_picture(tmp_path):
    trials = _sweep(8)
    run = write_run(tmp_path, trials)
    files = write_report(str(run))
    assert files.view.state == FINISHED
    page = (run / REPORT_HTML).read_text()
    order = sorted(trials, key=lambda t: -max(r[M.EVAL_ACCURACY] for r in trials[t]))
    positions = [page.index(f"<td>{t}") for t in order]
    assert positions == sorted(positions)  # the leaderboard: best first
    ids = {"curves", "lr", "loss_gap", "hparams", "parallel", "importance"}
    for name in ids:
        assert f'id="{name}"' in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # the Markdown's pictures are files beside it, each a PNG
    md = (run / REPORT_MD).read_text()
    for name in ids:
        picture = run / REPORT_ASSETS / f"{name}.png"
        assert f"]({REPORT_ASSETS}/{name}.png)" in md
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stopped early (asha)" in md and "budget spent" in md
    assert "0.52" in md and "200 validation rows" in md  # how sure: baseline, rows


def test_importance_finds_the_key_that_matters_and_says_on_how_many_trials(tmp_path):
    view = read_run(str(write_run(tmp_path, _sweep(12, stopped=False))))
    found = fanova(view)
    assert found.trials == 12
    assert found.scores["learning_rate"] > 0.8 > found.scores["weight_decay"]
    assert "12 finished trials" in found.note and "rough hint" in found.note


def test_importance_is_not_guessed_from_too_few_trials(tmp_path):
    view = read_run(str(write_run(tmp_path, _sweep(MIN_TRIALS - 1))))
    found = fanova(view)
    assert found.scores == {} and f"needs at least {MIN_TRIALS}" in found.note


def test_a_run_in_progress_gives_a_partial_report_that_says_so(tmp_path):
    run = write_run(tmp_path, _sweep(3), summary=False)
    files = write_report(str(run))
    assert files.view.state == IN_PROGRESS
    page = (run / REPORT_HTML).read_text()
    assert "Partial report" in page and "tunefleet resume" in page
    assert page.count("<td>trial_0000") == 3 and "running" in page


def test_a_run_with_no_report_yet_says_so(tmp_path):
    run = write_run(tmp_path, {}, summary=False)
    files = write_report(str(run))
    assert files.view.state == NOT_STARTED
    assert "No trial has reported yet" in (run / REPORT_HTML).read_text()


def test_failed_trials_are_listed_with_their_reason(tmp_path):
    trials = _sweep(3)
    trials["trial_00003"] = []
    run = write_run(tmp_path, trials, failed=("trial_00003",))
    write_report(str(run))
    md = (run / REPORT_MD).read_text()
    assert "| trial_00003 | ValueError: bad weights |" in md
    assert "failed: ValueError: bad weights" in md  # in the leaderboard too


def test_report_of_a_folder_that_is_no_run_exits_2_and_writes_nothing(tmp_path, capsys):
    from tune_jobs.cli import main

    folder = tmp_path / "not-a-run"
    folder.mkdir()
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "RUN_DIR" in err and "not a tunefleet run folder" in err
    assert list(folder.iterdir()) == []


def test_a_restore_breaks_the_line_instead_of_joining_two_models():
    rows = [
        {M.STEP: 4, "v": 1.0, "training_iteration": 1},
        {M.STEP: 8, "v": 2.0, "training_iteration": 2},
        {M.STEP: 8, "v": 3.0, "training_iteration": 3, M.RESTORED_FROM_STEP: 4},  # exploit
        {M.STEP: 12, "v": 4.0, "training_iteration": 4},
    ]
    assert list(runs_of(rows, "v")) == [([4, 8], [1.0, 2.0]), ([8, 12], [3.0, 4.0])]


def test_the_model_card_says_what_was_chosen_scored_and_how_to_reproduce(tmp_path):
    trials = _sweep(4)
    run = write_run(tmp_path, trials)
    summary = json.loads((run / "summary.json").read_text())
    summary["best"]["reloaded_validation"] = {M.EVAL_ACCURACY: 0.8}
    text = model_card(_spec(), summary)
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["pipeline_tag"] == "text-classification" and "tunefleet" in meta["tags"]
    results = meta["model-index"][0]["results"][0]["metrics"]
    assert {(r["name"], r["value"]) for r in results} == {
        ("validation eval_accuracy", 0.8),
        ("test eval_accuracy", 0.81),
    }
    best = summary["best"]["config"]
    assert f"`learning_rate`: {best['learning_rate']:.3g}" in body
    assert "majority baseline (test accuracy): 0.5" in body
    assert f"tunefleet run {run / 'best_model' / 'job_spec.yaml'} run.name=rep-again" in body


@pytest.mark.parametrize("state", ["finished", "in progress"])
def test_the_report_reads_a_bucket_like_a_folder(tmp_path, state, s3_root):
    """The same run folder uploaded to an S3 bucket (moto): the same report, written there."""
    from cluster import storage

    run = write_run(tmp_path, _sweep(3), summary=state == "finished")
    uri = storage.join(s3_root, state.replace(" ", "-"), "rep")
    local = str(run)
    for dirpath, _, names in os.walk(local):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local).replace(os.sep, "/")
            storage.write_text(storage.join(uri, rel), Path(path).read_text())
    files = write_report(uri)
    assert files.view.state == state
    assert storage.exists(storage.join(uri, REPORT_HTML))
    assert storage.exists(storage.join(uri, REPORT_ASSETS, "curves.png"))
