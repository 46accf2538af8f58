"""The LR as a pure function of the step, checked against transformers' schedulers; LR groups."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.config import HParams
from trainers.optim import (
    POLYNOMIAL_LR_END,
    POLYNOMIAL_POWER,
    SLANTED_TRIANGULAR,
    STLR_RATIO,
    build_optimizer,
    lr_at,
    lr_multiplier,
    lr_scale_by_name,
    param_groups,
    set_lr,
    warmup_steps,
)
from tune_jobs.spec import LrSchedulerType, TrainingSpec

SCHEDULES = list(LrSchedulerType.__args__)
TOTAL, PEAK = 100, 3e-4


def _hp(**kw) -> HParams:
    return HParams.from_dict({**TrainingSpec().model_dump(), "learning_rate": PEAK, **kw})


def _lrs(schedule: str, warmup_ratio: float) -> tuple[list[float], int]:
    """The LR of each step by the reference: transformers' ``get_scheduler`` for its shapes
    (ULMFiT's slanted triangular is ours alone: its own test below)."""
    hp = _hp(lr_scheduler_type=schedule, warmup_ratio=warmup_ratio)
    warmup = warmup_steps(hp, TOTAL)
    if schedule == SLANTED_TRIANGULAR:
        return [lr_at(hp, step, TOTAL) for step in range(TOTAL)], warmup
    from transformers import get_scheduler

    opt = build_optimizer(torch.nn.Linear(2, 2), hp)
    kwargs = (
        {"lr_end": POLYNOMIAL_LR_END * PEAK, "power": POLYNOMIAL_POWER}
        if schedule == "polynomial"
        else None
    )
    sched = get_scheduler(
        schedule,
        optimizer=opt,
        num_warmup_steps=warmup,
        num_training_steps=TOTAL,
        scheduler_specific_kwargs=kwargs,
    )
    lrs = []
    for _ in range(TOTAL):
        lrs.append(opt.param_groups[-1]["lr"])  # LR used by the next optimizer step
        opt.step()
        sched.step()
    return lrs, warmup


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scheduler_follows_the_pure_formula(schedule):
    lrs, warmup = _lrs(schedule, 0.1)
    for step in (0, 1, 5, 10, 11, 37, 50, 99):
        assert lrs[step] == pytest.approx(
            PEAK * lr_multiplier(schedule, step, TOTAL, warmup), rel=1e-6, abs=1e-12
        ), step


def test_known_values_of_each_shape():
    w = 10
    assert lr_multiplier("linear", 5, TOTAL, w) == pytest.approx(0.5)  # half-way up the warmup
    assert lr_multiplier("linear", 55, TOTAL, w) == pytest.approx(0.5)  # half-way down
    assert lr_multiplier("cosine", 55, TOTAL, w) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 10 + 90 // 4 * 1, TOTAL, w) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 22 / 90))
    )
    assert lr_multiplier("constant", 0, TOTAL, w) == 1.0
    assert lr_multiplier("constant_with_warmup", 5, TOTAL, w) == pytest.approx(0.5)
    assert lr_multiplier("constant_with_warmup", 80, TOTAL, w) == 1.0
    assert lr_multiplier("inverse_sqrt", 40, TOTAL, w) == pytest.approx(1 / math.sqrt(40 / 10))
    assert lr_multiplier("polynomial", 55, TOTAL, w) == pytest.approx(0.5, abs=1e-6)


def test_slanted_triangular_is_ulmfit_eq3():
    # Howard & Ruder (2018): cut = T * cut_frac; p rises to 1 at cut, falls to 0 at T; lr = max * (1 + p(ratio-1)) / ratio
    T, cut_frac = 100, 0.1
    cut = math.floor(T * cut_frac)
    for t in range(T):
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
        assert lr_multiplier("slanted_triangular", t, T, cut) == pytest.approx(
            (1 + p * (STLR_RATIO - 1)) / STLR_RATIO
        )
    lrs, _ = _lrs("slanted_triangular", 0.1)
    assert max(lrs) == pytest.approx(PEAK) and lrs.index(max(lrs)) == cut
    assert lrs[0] == pytest.approx(PEAK / STLR_RATIO)


def test_the_lr_at_a_step_needs_no_history():
    """A restore or an exploit at step 40 writes the LR of step 40: nothing to replay."""
    hp = _hp(lr_scheduler_type="cosine", warmup_ratio=0.1)
    opt = torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 0.5},
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 1.0},
        ]
    )
    set_lr(opt, lr_at(hp, 40, TOTAL))
    peak_now = PEAK * lr_multiplier("cosine", 40, TOTAL, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([peak_now / 2, peak_now])


def test_layerwise_lr_decay_scales_each_block_down():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 4)
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
            self.head = torch.nn.Linear(4, 2)

    model = Toy()
    names = [n for n, _ in model.named_parameters()]
    blocks = [[f"blocks.{i}.weight", f"blocks.{i}.bias"] for i in range(3)]
    scale = lr_scale_by_name(names, blocks, ["embed.weight"], 0.5)
    hp = _hp(learning_rate=1e-3)
    lr_of = {n: g["lr"] for g in param_groups(model, hp, scale) for n in g["names"]}
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    assert lr_of["blocks.2.weight"] == pytest.approx(1e-3)  # top block
    assert lr_of["blocks.1.weight"] == pytest.approx(5e-4)
    assert lr_of["blocks.0.bias"] == pytest.approx(2.5e-4)
    assert lr_of["embed.weight"] == pytest.approx(1.25e-4)
    groups = param_groups(model, hp, scale)
    assert groups[-1]["lr_scale"] == 1.0  # the reported LR is the head's
