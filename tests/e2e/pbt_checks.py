"""What every PBT run's reports must show around an exploit (shared by the PBT e2e tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.conftest import tunefleet, tunefleet_in_terminal
from tune_jobs.report_log import read_reports

EVERY = 4  # steps between evaluations, checkpoints and perturbations

#: A population of 2 TorchTrainer trials (the grid) of 2 workers each, synch PBT: at every
#: interval the worse clones the better. It fits 2 CPUs: 2 x (2 x 0.49 + a 0.01 driver).
TWO_WORKER_POPULATION: dict[str, Any] = {
    "model": {"max_length": 48},
    "data": {"max_train_samples": 128, "max_eval_samples": 64, "max_test_samples": 64},
    "training": {"max_steps": 8, "per_device_train_batch_size": 16, "eval_steps": EVERY},
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
    "resources": {"trial_mode": "train", "num_workers": 2, "cpus_per_worker": 0.49},
    "run": {"name": "pbt-workers", "seed": 0, "fingerprint_weights": True},
}


def run_population(
    root: Path, spec: dict[str, Any], terminal: bool = False
) -> tuple[Path, dict, dict, str]:
    """``tunefleet run`` the spec under ``root``: (run folder, summary, reports by trial,
    stdout). ``terminal``: in an 80-column pseudo-terminal (the live console draws)."""
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    run = tunefleet_in_terminal if terminal else tunefleet
    proc = run("run", str(root / "job.yaml"), f"run.storage_path={root}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / spec["run"]["name"]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {t["trial"]: read_reports(str(run_dir), t["trial"]) for t in summary["trials"]}
    return run_dir, summary, rows, proc.stdout


def exploits_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's exploits; none is a failure (every check over them would pass vacuously)."""
    found = summary["exploits"]
    assert found, "no exploit in the run: the population checks would prove nothing"
    return found


def trains_at_depth(rows: dict[str, list[dict]], report: dict[str, Any], depth: int) -> bool:
    """Whether ``report`` trained at unfreeze depth ``depth``: it says so, and its trainable
    parameter count is the one every report at that depth has, fewer than at any greater
    depth and more than at any smaller one. (Not against "the full depth": PBT draws a
    member's first depth from the mutation list, so a population may never have run at
    the full depth; seen in CI, both members drawn at depth 1.)"""
    reports = [r for trial in rows.values() for r in trial]
    count = report["trainable_params"]
    same = {r["trainable_params"] for r in reports if r["unfreeze_depth"] == depth}
    return (
        report["unfreeze_depth"] == depth
        and same == {count}
        and all(count < r["trainable_params"] for r in reports if r["unfreeze_depth"] > depth)
        and all(count > r["trainable_params"] for r in reports if r["unfreeze_depth"] < depth)
    )


def after_exploit(rows: dict[str, list[dict]], exploit: dict[str, Any]) -> dict[str, Any]:
    """The recipient's first report after this exploit (its config is the new one)."""
    return next(
        r
        for r in rows[exploit["recipient"]]
        if r["training_iteration"] > exploit["recipient_iteration"]
        and all(r["config"][k] == v for k, v in exploit["new_config"].items())
    )


def donor_report(
    rows: dict[str, list[dict]], exploit: dict[str, Any], first: dict[str, Any]
) -> dict[str, Any]:
    """The donor's report whose checkpoint the recipient restored (linked by the weights' SHA-256).

    Tune's PBT log gives the donor's iteration too, but with synch=True it can
    lag the checkpoint actually cloned by one interval; the fingerprint cannot.
    """
    matches = [
        r for r in rows[exploit["donor"]] if r["weights_sha256"] == first["restored_weights_sha256"]
    ]
    assert matches, (
        f"{exploit['recipient']} restored weights that {exploit['donor']} never checkpointed"
    )
    return matches[0]


def check_exploit(
    rows: dict[str, list[dict]], exploit: dict[str, Any], last_step: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What every exploit must show; returns (the recipient's first report, the donor's)."""
    first = after_exploit(rows, exploit)
    donor = donor_report(rows, exploit, first)
    # the recipient's weights right after the exploit are the donor's checkpointed weights
    assert first["restored_weights_sha256"] == donor["weights_sha256"]
    assert first["restored_from_step"] == donor["step"] == exploit["step"]
    # the step count continues from the donor's (an exploit at the end of the budget re-evaluates)
    assert first["step"] == min(donor["step"] + EVERY, last_step)
    # Tune attributes the report to the recipient, with its mutated hyperparameters
    assert first["trial_id"] != donor["trial_id"]
    assert first["config"] == exploit["new_config"]
    return first, donor
