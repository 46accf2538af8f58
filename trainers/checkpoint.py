"""What a checkpoint holds and how it is written and read.

Layout of one checkpoint folder::

    model/                      save_pretrained model + tokenizer (loadable as is)
    trainer_state.pt            optimizer, LR schedule, RNG state
    tunefleet_checkpoint.json   step, epoch, hyperparameters, metrics (human-readable)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

MODEL_DIR = "model"
STATE_FILE = "trainer_state.pt"
MANIFEST = "tunefleet_checkpoint.json"


def save_checkpoint(
    path: str,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    epoch: float,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> None:
    """Write everything needed to continue training, and a loadable model folder."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(os.path.join(path, MODEL_DIR))
    tokenizer.save_pretrained(os.path.join(path, MODEL_DIR))
    torch.save(
        {
            # AdamW state keyed by parameter name, so a restore with another
            # trainable set (a new unfreeze depth) keeps what still applies.
            "optimizer_by_name": optimizer_state_by_name(optimizer),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        os.path.join(path, STATE_FILE),
    )
    with open(os.path.join(path, MANIFEST), "w") as fh:
        json.dump(
            {"step": step, "epoch": epoch, "hparams": dict(hparams), "metrics": dict(metrics)},
            fh,
            indent=2,
            default=str,
        )


def optimizer_state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Per-parameter optimizer state keyed by the names in each group's ``names`` list."""
    out = {}
    for group in optimizer.param_groups:
        for param, name in zip(group["params"], group["names"], strict=True):
            if param in optimizer.state:
                out[name] = {
                    k: v.detach().cpu() if torch.is_tensor(v) else v
                    for k, v in optimizer.state[param].items()
                }
    return out


def weights_fingerprint(tensors: Mapping[str, torch.Tensor], names: list[str]) -> str:
    """SHA-256 of the named tensors (float32, sorted by name): equal iff the weights are equal."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a checkpoint folder."""
    with open(os.path.join(path, MANIFEST)) as fh:
        return json.load(fh)


def load_weights(path: str, model: Any) -> None:
    """Load the checkpoint's model weights in place (strict, but for buffers)."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, MODEL_DIR, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}"
        )


def load_trainer_state(
    path: str, optimizer: torch.optim.Optimizer
) -> tuple[int, int, dict[str, Any]]:
    """Restore AdamW state for every parameter that still trains; the trial's own
    hyperparameters (LR, weight decay, groups) stay as built.

    Returns (tensors whose state was restored, tensors that start fresh, the
    saved scheduler state for callers that want to compare).
    """
    state = torch.load(os.path.join(path, STATE_FILE), weights_only=False)
    saved = state["optimizer_by_name"]
    kept = fresh = 0
    for group in optimizer.param_groups:
        for param, name in zip(group["params"], group["names"], strict=True):
            if name in saved:
                optimizer.state[param] = {
                    k: v.to(param.device) if torch.is_tensor(v) and v.dim() > 0 else v
                    for k, v in saved[name].items()
                }
                kept += 1
            else:
                fresh += 1
    torch.set_rng_state(state["torch_rng"])
    return kept, fresh, state["scheduler"]
