"""Population Based Training on a local Ray: real MiniLM, real data, single-process trials.

Checks what an exploit must do: the recipient continues from the donor's
checkpointed weights and step, with its own mutated hyperparameters, and Tune
attributes every metric to the right trial.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.e2e.conftest import tunefleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVERY = 4  # steps between evaluations (and checkpoints)
SPEC = {
    "model": {"max_length": 48},
    "data": {"max_train_samples": 128, "max_eval_samples": 64, "max_test_samples": 64},
    "training": {
        "max_steps": 24,
        "per_device_train_batch_size": 16,
        "eval_steps": EVERY,
        "warmup_ratio": 0.25,
    },
    "search": {
        "num_samples": 4,
        "start_with_defaults": False,
        "space": {"learning_rate": {"loguniform": [1.0e-5, 5.0e-4]}},
    },
    "scheduler": {
        "type": "pbt",
        "time_attr": "step",
        "perturbation_interval": 8,
        "quantile_fraction": 0.25,
        "resample_probability": 0.5,
        "synch": True,  # every interval, the worst trial clones the best: exploits are certain
        "mutations": {
            "learning_rate": {"loguniform": [1.0e-5, 5.0e-4]},
            "lr_scheduler_type": {"choice": ["linear", "cosine", "constant_with_warmup"]},
            "unfreeze_depth": {"choice": [1, 6]},
        },
    },
    "resources": {"trial_mode": "single_process", "cpus_per_worker": 1},
    "run": {"name": "pbt", "seed": 0, "fingerprint_weights": True},
}


@pytest.fixture(scope="module")
def pbt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pbt")
    (root / "job.yaml").write_text(yaml.safe_dump(SPEC))
    proc = tunefleet("run", str(root / "job.yaml"), f"run.storage_path={root}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / "pbt"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {}
    for trial in summary["trials"]:
        lines = (run_dir / trial["trial"] / "result.json").read_text().splitlines()
        rows[trial["trial"]] = [json.loads(line) for line in lines]
    return run_dir, summary, rows, proc.stdout


def _after_exploit(rows, exploit):
    """The recipient's first report after this exploit (its config is the new one)."""
    return next(
        r
        for r in rows[exploit["recipient"]]
        if r["training_iteration"] > exploit["recipient_iteration"]
        and all(r["config"][k] == v for k, v in exploit["new_config"].items())
    )


def _donor_report(rows, exploit, first):
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


def test_population_exploits(pbt_run):
    _, summary, _, stdout = pbt_run
    assert summary["exploits"], "no exploit in a population of 4"
    assert "PBT exploits" in stdout


def test_recipient_continues_from_the_donors_weights_and_step(pbt_run):
    _, summary, rows, _ = pbt_run
    for exploit in summary["exploits"]:
        first = _after_exploit(rows, exploit)
        donor_row = _donor_report(rows, exploit, first)
        # the recipient's weights right after the exploit are the donor's checkpointed weights
        assert first["restored_weights_sha256"] == donor_row["weights_sha256"]
        assert first["restored_from_step"] == donor_row["step"]
        # the step count continues from the donor's (an exploit at the end of the budget re-evaluates)
        assert first["step"] == min(donor_row["step"] + EVERY, 24)
        # Tune attributes the report to the recipient, with its mutated hyperparameters
        assert first["trial_id"] != donor_row["trial_id"]
        assert first["config"] == exploit["new_config"]


def test_mutated_schedule_and_depth_take_effect(pbt_run):
    from trainers.optim import lr_multiplier

    _, summary, rows, _ = pbt_run
    for exploit in summary["exploits"]:
        first = _after_exploit(rows, exploit)
        config = exploit["new_config"]
        # the LR actually used follows the recipient's own schedule at the current step: no jump back to warmup
        expected = config["learning_rate"] * lr_multiplier(
            config["lr_scheduler_type"], first["step"], 24, 6
        )
        assert first["lr"] == pytest.approx(expected, rel=1e-6)
        assert first["unfreeze_depth"] == config["unfreeze_depth"]
        depth_one = first["trainable_params"] < 10_000_000
        assert depth_one == (config["unfreeze_depth"] == 1)


@pytest.mark.xfail(
    strict=False,
    reason="issue 4, open: Tune's PBT replay of a synch population does not reliably start from "
    "the lineage's root config (seen in 2 of 5 runs); under investigation",
)
def test_replay_follows_the_trials_schedule(pbt_run):
    from ray.tune.schedulers import PopulationBasedTrainingReplay

    from tune_jobs.replay import config_schedule

    run_dir, summary, rows, _ = pbt_run
    trial = summary["exploits"][-1]["recipient"]  # the most recently exploited: the longest lineage
    proc = tunefleet("replay", str(run_dir), trial)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    policy = PopulationBasedTrainingReplay(
        str(run_dir / f"pbt_policy_{rows[trial][0]['trial_id']}.txt")
    )
    replay_dir = run_dir.parent / f"pbt-replay-{trial}"
    replay_rows = [
        json.loads(line)
        for line in (replay_dir / "trial_00000" / "result.json").read_text().splitlines()
    ]
    # The replay goes through the lineage's configs, in order, changing at the recorded
    # iterations. A change recorded at the budget's last evaluation may or may not be
    # replayed: the replayed trial can finish before Tune pauses it there.
    last_iteration = 24 // EVERY
    replayable = [(at, conf) for at, conf in policy._policy if at < last_iteration]
    got = config_schedule(replay_rows)
    full = [policy.config] + [conf for _, conf in policy._policy]
    assert got in (full, [policy.config] + [conf for _, conf in replayable])
    for change_at, conf in replayable:
        first = next(r for r in replay_rows if r["config"] == conf)
        assert first["training_iteration"] == change_at + 1
    if got == full:
        assert replay_rows[-1]["config"] == rows[trial][-1]["config"]
    assert replay_rows[-1]["step"] == 24
