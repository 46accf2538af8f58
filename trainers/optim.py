"""AdamW parameter groups and learning-rate schedules, built from the trial's hyperparameters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def is_no_decay(param_name: str, module: torch.nn.Module) -> bool:
    """Biases and normalization weights are not decayed (standard AdamW practice)."""
    return param_name.endswith("bias") or "norm" in type(module).__name__.lower()


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the *trainable* parameters: decayed and not decayed."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if is_no_decay(name, module) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, hp: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; frozen ones never reach the optimizer."""
    return torch.optim.AdamW(
        [g for g in decay_groups(model, hp["weight_decay"]) if g["params"]],
        lr=hp["learning_rate"],
        betas=(hp["adam_beta1"], hp["adam_beta2"]),
        eps=hp["adam_epsilon"],
    )


def warmup_steps(hp: Mapping[str, Any], total_steps: int) -> int:
    """Warmup length in optimizer steps: ``warmup_steps`` if set, else ratio x total."""
    if hp.get("warmup_steps"):
        return int(hp["warmup_steps"])
    return math.ceil(hp.get("warmup_ratio", 0.0) * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], total_steps: int
) -> Any:
    """The LR schedule named by ``lr_scheduler_type`` (``transformers.get_scheduler``)."""
    from transformers import get_scheduler

    return get_scheduler(
        hp["lr_scheduler_type"],
        optimizer=optimizer,
        num_warmup_steps=warmup_steps(hp, total_steps),
        num_training_steps=total_steps,
    )
