"""Start small: the smoke pass on a local Ray, and its fast failure on bad data."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import tunefleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_smoke_pass_runs_defaults_first_and_restores_and_prices_a_trial(tmp_path):
    """The smoke pass before a run, then the run refused: its budget (2 s of trial time)
    cannot buy one trial as the smoke pass measured it (exit 2, nothing of the run written)."""
    proc = tunefleet(
        "run",
        "debug-local",
        "smoke.enabled=true",
        "search.budget.trial_hours=0.0005",
        f"run.storage_path={tmp_path}",
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "restore continued at steps [6]" in proc.stdout
    priced = re.search(
        r"a trial starts in ([\d.]+) s and trains at ([\d.]+) ms per example", proc.stdout
    )
    assert priced, proc.stdout[-3000:]
    startup_s, per_example_ms = float(priced[1]), float(priced[2])
    assert 0 < startup_s < 120 and 0 < per_example_ms < 1000
    # the shortest trial of debug-local: 2 epochs of 800 rows
    one = startup_s + 1600 * per_example_ms / 1000
    refused = re.search(
        r"search.budget.trial_hours: cannot buy one trial: one trial costs about (\d+) s",
        proc.stderr,
    )
    assert refused, proc.stderr[-3000:]
    assert abs(int(refused[1]) - one) <= 1 + 0.01 * one  # the printed figures, rounded
    assert "1600 examples" in proc.stderr and "(got 0.0005)" in proc.stderr
    assert not (tmp_path / "debug-local").exists()  # the run itself: nothing written
    summary = json.loads((tmp_path / "debug-local-smoke" / "summary.json").read_text())
    assert [t["last"]["step"] for t in summary["trials"]] == [4, 4]
    # the first trial ran the BERT-family defaults for the searched keys
    assert summary["defaults_trial"]["trial"] == "trial_00000"
    assert summary["trials"][0]["config"] == {
        "learning_rate": 3e-5,
        "per_device_train_batch_size": 32,
        "weight_decay": 0.01,
    }
    assert summary["best_vs_defaults"]["defaults"] == summary["trials"][0]["best"]["eval_accuracy"]


def test_smoke_on_a_broken_data_column_fails_fast(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("review,label\ngood film,1\nbad film,0\n" * 20)
    results = tmp_path / "results"
    proc = tunefleet(
        "smoke",
        "debug-local",
        "data.source=csv",
        f"data.path={data}",
        "data.text_column=sentence",
        f"run.storage_path={results}",
    )
    assert proc.returncode == 2
    assert (
        "data.text_column" in proc.stderr
        and "'sentence' not found" in proc.stderr
        and "review" in proc.stderr
    )
    assert "local Ray cluster started" not in proc.stdout + proc.stderr  # refused before Ray
    assert not results.exists()  # the run's own storage folder: nothing written
