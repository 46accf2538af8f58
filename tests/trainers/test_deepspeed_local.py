"""The DeepSpeed engine in one plain process (world size 1, gloo, DS_ACCELERATOR=cpu).

What ``scripts/gpu_check.py`` runs on a GPU, here on the CPU: ZeRO-2 with the
optimizer offloaded to the CPU takes the same steps as the plain loop.
"""

from __future__ import annotations

import pytest

from tests.conftest import worker_config
from trainers import metrics as M
from trainers.loop import run_local


@pytest.fixture
def process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29533"),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
    ):
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _config(splits, distributed=None):
    return worker_config(
        splits,
        distributed,
        max_steps=4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
        eval_steps=2,
        save_checkpoints=False,
    )


def test_zero2_with_optimizer_offload_matches_the_plain_loop(rt_small, process_group):
    plain = run_local(_config(rt_small, {"precision": "fp32"}))  # fp32 on both sides
    offload = run_local(
        _config(
            rt_small,
            {
                "strategy": "deepspeed",
                "deepspeed": {
                    "zero_stage": 2,
                    "offload_optimizer": True,
                    "offload_params": False,
                    "precision": "fp32",
                    "config": {},
                },
            },
        )
    )
    assert [r[M.STEP] for r in offload.reports] == [2, 4]
    for a, b in zip(plain.reports, offload.reports, strict=True):
        assert b[M.TRAIN_LOSS] == pytest.approx(a[M.TRAIN_LOSS], abs=1e-6)
        assert b[M.EVAL_LOSS] == pytest.approx(a[M.EVAL_LOSS], abs=1e-6)
        assert b[M.LR] == pytest.approx(a[M.LR], rel=1e-9)
