"""Spec search space -> Tune domains; the trial's hyperparameters."""

from __future__ import annotations

from ray import tune

from tune_jobs.space import param_space, trial_hparams
from tune_jobs.spec import parse_spec


def test_space_forms_map_to_tune_domains():
    spec = parse_spec(
        {
            "search": {
                "space": {
                    "learning_rate": {"loguniform": [1e-5, 1e-3]},
                    "weight_decay": {"uniform": [0.0, 0.1]},
                    "per_device_train_batch_size": {"choice": [8, 16]},
                    "gradient_accumulation_steps": {"randint": [1, 4]},
                    "lr_scheduler_type": {"grid": ["linear", "cosine"]},
                    "warmup_ratio": 0.06,
                }
            }
        }
    )
    space = param_space(spec)
    assert isinstance(space["learning_rate"], tune.search.sample.Float)
    assert space["learning_rate"].lower == 1e-5 and space["learning_rate"].upper == 1e-3
    assert isinstance(space["per_device_train_batch_size"], tune.search.sample.Categorical)
    assert space["gradient_accumulation_steps"].upper == 5  # inclusive bound in the spec
    assert space["lr_scheduler_type"] == {"grid_search": ["linear", "cosine"]}
    assert space["warmup_ratio"] == 0.06


def test_trial_hparams_overlay_training_defaults():
    spec = parse_spec({"training": {"learning_rate": 1e-5, "weight_decay": 0.05}})
    hp = trial_hparams(spec, {"learning_rate": 2e-4})
    assert hp["learning_rate"] == 2e-4
    assert hp["weight_decay"] == 0.05
    assert hp["per_device_train_batch_size"] == 16
