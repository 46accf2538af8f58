"""The retrain's pieces that need no Ray: what it requires, its names, its warm start."""

from __future__ import annotations

import pandas as pd
import pytest

from trainers.data import data_sha256
from tune_jobs.retrain import check_retrain_spec, next_number, run_name, warm_start_points
from tune_jobs.spec import SpecError, load_spec_text

SPACE = """
search:
  algorithm: {algorithm}
  num_samples: 4
  space:
    learning_rate: {{loguniform: [1.0e-5, 1.0e-3]}}
    per_device_train_batch_size: {{choice: [16, 32]}}
    weight_decay: 0.01
data: {{promotion_fraction: 0.1}}
retrain: {{top_k: 2}}
run: {{name: nightly}}
"""


def spec(algorithm: str = "optuna", overrides: tuple[str, ...] = ()):
    return load_spec_text(SPACE.format(algorithm=algorithm), overrides)


def test_a_retrain_needs_a_promotion_set_and_an_export():
    with pytest.raises(SpecError) as err:
        check_retrain_spec(
            spec(overrides=("data.promotion_fraction=0", "training.save_checkpoints=false"))
        )
    text = str(err.value)
    assert "data.promotion_fraction" in text and "e.g. 0.1" in text
    assert "training.save_checkpoints" in text
    check_retrain_spec(spec())  # a promotion fraction and checkpoints: fine


def test_run_names_are_numbered_by_the_history():
    assert next_number([]) == 1
    history = [{"retrain": 1}, {"retrain": 2}, {"decision": "rollback"}]
    assert next_number(history) == 3
    assert run_name(spec(), 3) == "nightly-retrain-0003"


def summary(*accuracies: float) -> dict:
    return {
        "metric": "eval_accuracy",
        "mode": "max",
        "trials": [
            {
                "trial": f"trial_{i:05d}",
                "config": {"learning_rate": 1e-4 * (i + 1), "per_device_train_batch_size": 16},
                "best": {"eval_accuracy": a} if a is not None else {},
            }
            for i, a in enumerate(accuracies)
        ],
    }


def test_warm_start_is_the_champion_then_the_previous_top_k():
    champion = {"config": {"learning_rate": 5e-4, "per_device_train_batch_size": 64}}
    # trial_00002 failed (no metric): never a warm-start point
    points = warm_start_points(spec(), champion, summary(0.71, 0.78, None, 0.75))
    assert points == [
        # fitted to today's space for Optuna: 64 is snapped to the nearest choice
        {"learning_rate": 5e-4, "per_device_train_batch_size": 32},
        {"learning_rate": 2e-4, "per_device_train_batch_size": 16},
        {"learning_rate": 4e-4, "per_device_train_batch_size": 16},
    ]
    # the champion is usually the previous best: no repeat; random search keeps values as found
    same = {"config": {"learning_rate": 2e-4, "per_device_train_batch_size": 16}}
    assert warm_start_points(spec("random"), same, summary(0.71, 0.78)) == [
        {"learning_rate": 2e-4, "per_device_train_batch_size": 16},
        {"learning_rate": 1e-4, "per_device_train_batch_size": 16},
    ]
    assert warm_start_points(spec(overrides=("retrain.warm_start=false",)), champion, None) == []
    assert warm_start_points(spec(), None, None) == []


def test_data_hash_ignores_row_order_and_sees_a_changed_label():
    frame = pd.DataFrame({"text": ["a b", "c d", "e f"], "label": ["pos", "neg", "pos"]})
    same = data_sha256([frame])
    assert data_sha256([frame.iloc[::-1]]) == same
    relabelled = frame.assign(label=["pos", "neg", "neg"])
    assert data_sha256([relabelled]) != same
