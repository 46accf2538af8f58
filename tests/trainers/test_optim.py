"""LR schedules as pure functions of the step, checked against the schedulers used; LR groups."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.optim import (
    STLR_RATIO,
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    lr_scale_by_name,
    param_groups,
    warmup_steps,
)
from tune_jobs.spec import LrSchedulerType, TrainingSpec

SCHEDULES = list(LrSchedulerType.__args__)
TOTAL, PEAK = 100, 3e-4


def _lrs(schedule: str, warmup_ratio: float) -> tuple[list[float], int]:
    hp = {
        **TrainingSpec().model_dump(),
        "learning_rate": PEAK,
        "lr_scheduler_type": schedule,
        "warmup_ratio": warmup_ratio,
    }
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, hp)
    sched = build_scheduler(opt, hp, TOTAL)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(opt.param_groups[-1]["lr"])  # LR used by the next optimizer step
        opt.step()
        sched.step()
    return lrs, warmup_steps(hp, TOTAL)


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


def test_no_jump_when_a_schedule_is_rebuilt_mid_run():
    hp = {
        **TrainingSpec().model_dump(),
        "learning_rate": PEAK,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
    }
    opt = build_optimizer(torch.nn.Linear(2, 2), hp)
    sched = build_scheduler(opt, hp, TOTAL, start_step=40)
    assert sched.last_epoch == 40
    assert opt.param_groups[0]["lr"] == pytest.approx(PEAK * lr_multiplier("cosine", 40, TOTAL, 10))


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
    hp = {**TrainingSpec().model_dump(), "learning_rate": 1e-3}
    lr_of = {n: g["lr"] for g in param_groups(model, hp, scale) for n in g["names"]}
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    assert lr_of["blocks.2.weight"] == pytest.approx(1e-3)  # top block
    assert lr_of["blocks.1.weight"] == pytest.approx(5e-4)
    assert lr_of["blocks.0.bias"] == pytest.approx(2.5e-4)
    assert lr_of["embed.weight"] == pytest.approx(1.25e-4)
    groups = param_groups(model, hp, scale)
    assert groups[-1]["lr_scale"] == 1.0  # the reported LR is the head's
