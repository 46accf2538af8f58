"""The DeepSpeed engine in one plain process (world size 1, gloo, DS_ACCELERATOR=cpu).

What ``scripts/gpu_check.py`` runs on a GPU, here on the CPU: ZeRO-2 with the
optimizer offloaded to the CPU takes the same steps as the plain loop.
"""

from __future__ import annotations

import pytest

from tests.conftest import worker_config
from trainers import metrics as M
from trainers.loop import run_local


@pytest.fixture(scope="module")
def process_group():
    """One gloo group of one for the module: DeepSpeed keeps the groups it derives from the
    first one it sees, so a second group in the same process would not be registered."""
    import os

    import torch.distributed as dist

    values = {
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29533",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


class _Payload:
    """What a tampered checkpoint would carry: unpickling it runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_a_deepspeed_checkpoint_does_not_run(rt_small, process_group, tmp_path):
    """A ZeRO-2 checkpoint whose optimizer-state file is replaced by a pickle that runs a
    command when loaded, its manifest's SHA-256 rewritten to match (as a tamperer would):
    the resume and the export both refuse it, and the command never runs. The same file
    read the way DeepSpeed reads it, without tunefleet's guard, does run it."""
    import glob
    import json
    import pickle
    from pathlib import Path

    import torch

    from trainers.checkpoint import MANIFEST, file_digests, materialize

    ds = {"zero_stage": 2, "offload_optimizer": False, "offload_params": False}
    ds = {**ds, "precision": "fp32", "config": {}}
    cfg = {
        **_config(rt_small, {"strategy": "deepspeed", "deepspeed": ds}),
        "checkpoint_weights": "full",
    }
    cfg["hp"] = {**cfg["hp"], "save_checkpoints": True, "max_steps": 2}
    (checkpoint,) = run_local(cfg, checkpoint_root=str(tmp_path / "run")).checkpoints
    (optim,) = glob.glob(f"{checkpoint}/deepspeed/*/*optim_states.pt")
    marker = tmp_path / "payload-ran"
    torch.save({"optimizer_state_dict": _Payload(str(marker)), "ds_version": "0"}, optim)
    manifest_path = Path(checkpoint) / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = file_digests(checkpoint)
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_local(cfg, resume_from=checkpoint)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        materialize(checkpoint, str(tmp_path / "export"))
    assert not marker.exists()
    torch.load(optim, weights_only=False)  # DeepSpeed's own call, unguarded
    assert marker.exists()
