"""LoRA adapters through peft: attach, freeze, drop, save, merge.

Under ``adapter.type: lora`` the base model never trains: every trial attaches a fresh
adapter to the worker's one base model (loaded once, in bf16 where the device does bf16
natively: ``base_dtype``) and drops it again at the end, so "reset to the base model" is
dropping the adapter, with no copy. A checkpoint holds the adapter's tensors only (the
``trained`` layout, plus optimizer state for a resume); the export writes the adapter
folder and the merged model (``export``).

Settings (``adapter`` of the spec; ``r`` and ``target_modules`` fix the adapter's shape,
so PBT may not mutate them): ``r``, ``alpha`` (the update is scaled by alpha / r),
``dropout`` (on the adapter's input), ``target_modules`` (module names, or
``all-linear``: every linear layer but the output layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trainers.model import LayerMap, save_pretrained

NONE, LORA = "none", "lora"
ALL_LINEAR = "all-linear"
#: Settings that fix the adapter's tensors' shapes: a PBT exploit copies the donor's
#: tensors, which would not fit a recipient of another shape.
SHAPE_KEYS = ("r", "target_modules")


def enabled(adapter: Mapping[str, Any] | None) -> bool:
    """Does this trial train an adapter?"""
    return bool(adapter) and adapter.get("type", NONE) == LORA


def base_dtype(arithmetic: str) -> torch.dtype:
    """The frozen base's dtype: bf16 where the trial computes in bf16, else fp32 (a CPU
    without native bf16 would emulate it, slower and no smaller in its arithmetic)."""
    return torch.bfloat16 if arithmetic == "bf16" else torch.float32


def lora_config(adapter: Mapping[str, Any]) -> Any:
    """peft's ``LoraConfig`` for the spec's ``adapter`` settings."""
    from peft import LoraConfig

    targets = adapter["target_modules"]
    return LoraConfig(
        r=int(adapter["r"]),
        lora_alpha=float(adapter["alpha"]),
        lora_dropout=float(adapter["dropout"]),
        target_modules=targets if targets == ALL_LINEAR else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach(model: Any, adapter: Mapping[str, Any]) -> Any:
    """A fresh adapter on ``model`` (its A matrices drawn from the torch RNG, B zero: the
    model computes what the base does until it trains); the adapter's tensors are fp32
    whatever the base's dtype. Returns the peft model (the base is changed in place)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(adapter), autocast_adapter_dtype=True)


def detach(model: Any) -> Any:
    """The base model with any adapter removed (not merged): as it was loaded."""
    from peft import PeftModel

    return model.unload() if isinstance(model, PeftModel) else model


def is_adapter_param(name: str) -> bool:
    """Is this parameter part of a LoRA adapter?"""
    return ".lora_" in name


def apply_freezing(model: Any, lmap: LayerMap | None, depth: int | None) -> int:
    """Only adapter tensors train, and with ``depth`` only those in the top ``depth``
    blocks; returns how many elements train."""
    allowed: set[str] | None = None
    if lmap is not None and depth is not None:
        n = lmap.num_blocks
        allowed = {name for block in lmap.blocks[n - min(max(depth, 0), n) :] for name in block}
    count = 0
    for name, param in model.named_parameters():
        trains = is_adapter_param(name) and (allowed is None or name in allowed)
        param.requires_grad_(trains)
        count += param.numel() if trains else 0
    return count


def linear_module_names(model: Any) -> list[str]:
    """The short names of the linear layers LoRA can target (``q_proj``, ``down_proj``, ...)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return sorted(names)


def export(model: Any, dest: str, adapter_dir: str) -> None:
    """Write the adapter alone to ``adapter_dir`` and the merged model (base + adapter,
    one set of plain weights in the base's layout) to ``dest``."""
    model.save_pretrained(adapter_dir)
    merged = model.merge_and_unload()
    save_pretrained(merged, dest)
