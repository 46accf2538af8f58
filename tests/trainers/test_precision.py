"""distributed.precision: bf16 autocast really runs the matrix products in bf16, keeps
the weights, gradients and optimizer in fp32, and trains as well as fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import worker_config
from trainers import metrics as M
from trainers import precision
from trainers.config import WorkerConfig
from trainers.context import LocalContext
from trainers.data import batches
from trainers.loop import Worker, build_state, run_local
from trainers.tasks import Rows
from trainers.tasks.classification import score


def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16():
    native = precision.native_bf16("cpu")
    assert precision.resolve("auto", "cpu") == ("bf16" if native else "fp32")
    assert precision.resolve("fp32", "cpu") == "fp32"
    assert precision.resolve("bf16", "cpu") == "bf16"  # asked for: emulated if not native
    with pytest.raises(ValueError, match="distributed.precision"):
        precision.resolve("fp16", "cpu")
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    if flags:  # the probe agrees with the CPU's own flags
        assert native == ("avx512_bf16" in flags or "amx_tile" in flags)


@pytest.mark.parametrize(
    ("capability", "native"),
    [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)],
    ids=["V100", "T4", "A100", "L4", "H100"],
)
def test_auto_on_nvidia_gpus_goes_by_compute_capability(monkeypatch, capability, native):
    """No GPU here: torch's device query is stubbed (the decision is what is under test).
    A V100 or T4 would get bf16 from ``is_bf16_supported()``, which counts emulation."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.native_bf16("cuda:0") is native
    assert precision.resolve("auto", "cuda") == ("bf16" if native else "fp32")


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
    ids=["neither", "avx512-bf16", "amx", "both"],
)
def test_auto_on_cpus_goes_by_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, native):
    """The CPU's probes stubbed: each combination of the two instruction sets."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision.native_bf16("cpu") is native
    assert precision.resolve("auto", "cpu") == ("bf16" if native else "fp32")


def test_auto_on_rocm_asks_torch_without_emulation(monkeypatch):
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return not including_emulation  # True only to the question without emulation

    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert precision.native_bf16("cuda") is True and asked == [False]


def _state(splits, setting):
    cfg = WorkerConfig.from_dict(
        worker_config(splits, {"precision": setting}, max_steps=2, per_device_train_batch_size=8)
    )
    worker = Worker(cfg, LocalContext(device="cpu"))
    return worker, build_state(worker, cfg, cfg.hp, 0)[0]


@pytest.mark.parametrize("setting, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_forward_runs_in_the_precision_and_the_state_stays_fp32(rt_small, setting, dtype):
    worker, state = _state(rt_small, setting)
    seen = []
    first = state.model.bert.encoder.layer[0].attention.self.query
    hook = first.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        rows = Rows(worker.data.train.ids[:8], worker.data.train.targets[:8])
        batch = next(batches(rows.ids, rows.targets, range(8), 8, worker.data.pad_id))
        state.engine.backward(batch, 1, last=True)  # training forward
        score(
            state.engine.model,
            rows,
            2,
            8,
            worker.data.pad_id,
            "cpu",
            state.engine.autocast,
        )  # evaluation forward
    finally:
        hook.remove()
    assert seen == [dtype, dtype]
    params = [p for p in state.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.grad.dtype == torch.float32 for p in params if p.grad is not None)
    state.engine.step()
    moments = [s["exp_avg"] for s in state.engine.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)


@pytest.mark.skipif(
    not precision.native_bf16("cpu"),
    reason="this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it (measured on an "
    "AVX2-only CPU: 269 s for these 60 steps), and auto never picks bf16 here",
)
def test_bf16_trains_as_well_as_fp32_on_the_same_steps(rt_small, tmp_path):
    """Same seed, same 60 steps (3 epochs): different arithmetic (so different losses), the same
    learning: both well above the majority baseline and within a few points."""
    hp = dict(max_steps=60, per_device_train_batch_size=8, learning_rate=2e-4, eval_steps=60)
    runs = {
        s: run_local(worker_config(rt_small, {"precision": s}, **hp), str(tmp_path / s)).reports[-1]
        for s in ("bf16", "fp32")
    }
    assert runs["bf16"][M.TRAIN_LOSS] != runs["fp32"][M.TRAIN_LOSS]  # bf16 really ran
    baseline = rt_small.majority_baseline()
    for report in runs.values():
        assert report[M.EVAL_ACCURACY] > baseline + 0.05
    assert abs(runs["bf16"][M.EVAL_ACCURACY] - runs["fp32"][M.EVAL_ACCURACY]) <= 0.08
