"""PBT with multi-worker trials: each trial a Ray Train ``TorchTrainer`` of 2 DDP workers.

An exploit here restarts the recipient's worker group: the trial's driver gets
the donor's Tune checkpoint (a pointer to the donor's Train checkpoint) and
starts a new Train run whose workers restore it with the recipient's mutated
hyperparameters.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.e2e.conftest import tunefleet
from tests.e2e.pbt_checks import after_exploit, donor_report
from tune_jobs.report_log import read_reports

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVERY = 4
SPEC = {
    "model": {"max_length": 48},
    "data": {"max_train_samples": 128, "max_eval_samples": 64, "max_test_samples": 64},
    "training": {"max_steps": 12, "per_device_train_batch_size": 16, "eval_steps": EVERY},
    "search": {
        "num_samples": 1,  # x the grid: a population of 2
        "start_with_defaults": False,
        "space": {"learning_rate": {"grid": [1.0e-6, 2.0e-4]}},
    },
    "scheduler": {
        "type": "pbt",
        "time_attr": "step",
        "perturbation_interval": EVERY,
        "quantile_fraction": 0.5,
        "resample_probability": 0.5,
        "synch": True,
        "mutations": {
            "learning_rate": {"loguniform": [1.0e-5, 5.0e-4]},
            "unfreeze_depth": {"choice": [1, 6]},
        },
    },
    # The whole population at once: 2 trials x (2 workers x 0.49 CPU + a 0.01 CPU driver).
    "resources": {"trial_mode": "train", "num_workers": 2, "cpus_per_worker": 0.49},
    "run": {"name": "pbt-workers", "seed": 0, "fingerprint_weights": True},
}


@pytest.fixture(scope="module")
def pbt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pbtw")
    (root / "job.yaml").write_text(yaml.safe_dump(SPEC))
    proc = tunefleet("run", str(root / "job.yaml"), f"run.storage_path={root}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / "pbt-workers"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {}
    for trial in summary["trials"]:
        rows[trial["trial"]] = read_reports(str(run_dir), trial["trial"])
    return run_dir, summary, rows


def test_exploits_restore_the_donors_weights_in_a_new_worker_group(pbt_run):
    run_dir, summary, rows = pbt_run
    assert summary["exploits"], "no exploit in a population of 2 with synch=True"
    for exploit in summary["exploits"]:
        first = after_exploit(rows, exploit)
        donor = donor_report(rows, exploit, first)
        assert first["restored_weights_sha256"] == donor["weights_sha256"]
        assert first["restored_from_step"] == donor["step"] == exploit["step"]
        assert first["step"] == min(donor["step"] + EVERY, 12)
        assert first["config"] == exploit["new_config"]
        assert first["trial_id"] != donor["trial_id"]
        # a new Train run (worker group) of the recipient's own, not the donor's
        assert first["train_run"].startswith(exploit["recipient"] + "-start")
        assert first["train_run"] != rows[exploit["recipient"]][0]["train_run"]
        depth_one = first["trainable_params"] < 10_000_000
        assert depth_one == (exploit["new_config"]["unfreeze_depth"] == 1)


def test_every_report_is_attributed_to_its_own_trial(pbt_run):
    _, summary, rows = pbt_run
    for trial, reports in rows.items():
        # no report lost across the pauses and restores of synch PBT
        assert [r["training_iteration"] for r in reports] == list(range(1, len(reports) + 1))
        assert len({r["trial_id"] for r in reports}) == 1
        assert all(r["train_run"].startswith(trial + "-start") for r in reports)
    assert summary["checkpoints"]["weights"] == "trained"
