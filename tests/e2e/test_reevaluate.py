"""``search.reevaluate``: the sweep's best configs trained again on new seeds, on the
sweep's warm groups, the choice by the mean, the export the chosen config's best seed.

Mechanics, so the tiny random BERT (tests/tiny_models.py) on real Rotten Tomatoes rows:
three learning rates, the top two trained again on two new seeds each (four trainings,
two at once, each on a one-worker Train group the sweep started).
"""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from tests.e2e.conftest import tunefleet
from trainers import metrics as M
from tune_jobs.report_log import read_reports

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _spec(model: str) -> dict:
    return {
        "model": {"name_or_path": model, "max_length": 32},
        "data": {"max_train_samples": 128, "max_eval_samples": 64, "max_test_samples": 64},
        "training": {"max_steps": 8, "per_device_train_batch_size": 16, "eval_steps": 4},
        "search": {
            "metric": "eval_loss",
            "num_samples": 1,
            "start_with_defaults": False,
            "space": {"learning_rate": {"grid": [1.0e-4, 1.0e-3, 3.0e-3]}},
            "reevaluate": {"top_k": 2, "seeds": 2},
        },
        "scheduler": {"type": "fifo"},
        "resources": {
            "trial_mode": "train",
            "num_workers": 1,
            "cpus_per_worker": 0.49,
            "max_concurrent_trials": 2,
        },
        "run": {"name": "reeval", "seed": 0},
    }


@pytest.fixture(scope="module")
def reevaluated(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("reeval")
    (root / "job.yaml").write_text(yaml.safe_dump(_spec(tiny_bert)))
    proc = tunefleet("run", str(root / "job.yaml"), f"run.storage_path={root}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / "reeval"
    return run_dir, json.loads((run_dir / "summary.json").read_text()), proc.stdout


def _best_loss(rows: list[dict]) -> float:
    return min(r[M.EVAL_LOSS] for r in rows)


def test_the_top_configs_are_trained_again_on_new_seeds_and_chosen_by_the_mean(reevaluated):
    run_dir, summary, stdout = reevaluated
    again = summary["reevaluation"]
    assert again["seeds"] == [1, 2]  # run.seed + 1, + 2
    # the candidates: the sweep's two best trials by their reported loss, best first
    ranked = sorted(summary["trials"], key=lambda t: t["best"][M.EVAL_LOSS])
    assert [c["trial"] for c in again["configs"]] == [t["trial"] for t in ranked[:2]]
    assert again["sweep_choice"] == ranked[0]["trial"]
    # each (config, seed) trained to the end, on the seed it was given, from its own reports
    here = str(run_dir / "reevaluate")
    means = {}
    for c in again["configs"]:
        mine = {
            name: t
            for name, t in again["trials"].items()
            if t["config"]["reevaluates"] == c["trial"]
        }
        assert sorted(t["config"]["seed"] for t in mine.values()) == [1, 2]
        assert all(
            t["config"]["learning_rate"] == c["config"]["learning_rate"] for t in mine.values()
        )
        by_seed = {}
        for name, t in mine.items():
            rows = read_reports(here, name)
            assert rows[-1][M.STEP] == 8
            by_seed[str(t["config"]["seed"])] = _best_loss(rows)
        assert c["seeds"] == pytest.approx(by_seed)
        assert by_seed["1"] != by_seed["2"]  # the seed reached the trial: another head, order
        assert c["mean"] == pytest.approx(statistics.fmean(by_seed.values()))
        assert c["sd"] == pytest.approx(statistics.stdev(by_seed.values()))
        means[c["trial"]] = c["mean"]
    chosen = min(means, key=means.get)
    assert again["chosen"] == chosen and summary["best"]["trial"] == chosen
    assert summary["best"]["chosen_by"] == "reevaluation"
    runner_up = max(means, key=means.get)
    assert again["lead"] == pytest.approx(means[runner_up] - means[chosen])
    assert isinstance(again["lead_exceeds_noise"], bool)
    assert "reevaluate: the top 2 config(s) x 2 new seeds [1, 2] = 4 trainings" in stdout
    assert f"  {chosen}: sweep " in stdout and "<- chosen" in stdout


def test_the_export_is_the_chosen_configs_best_seed_reloaded_and_rescored(reevaluated):
    run_dir, summary, _ = reevaluated
    again, best = summary["reevaluation"], summary["best"]
    chosen = next(c for c in again["configs"] if c["trial"] == again["chosen"])
    seed = min(chosen["seeds"], key=chosen["seeds"].get)
    exported = again["export"]
    assert exported["seed"] == int(seed) == best["exported_seed"]
    assert best["exported_trial"] == f"reevaluate/{exported['trial']}"
    assert again["trials"][exported["trial"]]["config"]["seed"] == int(seed)
    assert best["reloaded_validation"][M.EVAL_LOSS] == pytest.approx(
        chosen["seeds"][seed], abs=1e-5
    )
    assert (run_dir / "best_model" / "model.safetensors").exists()
    # the other trainings' checkpoints are gone once exported; the exported one's stays
    kept = sorted(p.name for p in (run_dir / "reevaluate" / "train_runs").glob("trial_*"))
    assert kept == [exported["trial"]]


def test_the_retraining_ran_on_the_sweeps_warm_groups(reevaluated):
    run_dir, summary, _ = reevaluated
    sweep_groups = {
        r[M.TRAIN_RUN] for t in summary["trials"] for r in read_reports(str(run_dir), t["trial"])
    }
    again = {
        r[M.TRAIN_RUN]
        for name in summary["reevaluation"]["trials"]
        for r in read_reports(str(run_dir / "reevaluate"), name)
    }
    assert again and again <= sweep_groups  # no group started for it


def test_the_report_and_the_model_card_say_how_the_model_was_chosen(reevaluated):
    run_dir, summary, _ = reevaluated
    again = summary["reevaluation"]
    report = (run_dir / "report.md").read_text()
    assert "## A choice that survives seeds" in report
    section = report.split("## A choice that survives seeds", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {again['chosen']} |"))
    assert row.endswith("| yes |")
    card = (run_dir / "best_model" / "README.md").read_text()
    assert f"this model is its best seed, {again['export']['seed']}" in card
    assert "the retraining on new seeds" in card
