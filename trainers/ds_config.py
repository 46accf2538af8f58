"""The DeepSpeed config of one trial, generated from its hyperparameters.

Pure functions (no ``deepspeed`` import): the driver validates a job spec with
them before anything starts, and every worker builds its engine's config with
them. The generated config is the single source of the numbers tunefleet tunes
or sets: batch sizes, gradient accumulation, clipping, ZeRO stage, offload and
precision. A user's extra keys (``distributed.deepspeed.config``) are merged in;
one that would change a generated value is a conflict, reported by its path.
The optimizer and LR schedule are tunefleet's own (the tuned AdamW and
schedule, handed to DeepSpeed as client objects), so ``optimizer`` and
``scheduler`` entries are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: DeepSpeed key path -> the spec key that sets it (what to change instead).
CONTROLLED: dict[str, str] = {
    "train_batch_size": "training.per_device_train_batch_size x "
    "training.gradient_accumulation_steps x resources.num_workers",
    "train_micro_batch_size_per_gpu": "training.per_device_train_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "gradient_clipping": "training.max_grad_norm",
    "zero_optimization.stage": "distributed.deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "distributed.deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "distributed.deepspeed.offload_params",
    "bf16.enabled": "distributed.deepspeed.precision",
    "fp16.enabled": "distributed.deepspeed.precision",
}

#: Top-level keys tunefleet owns outright.
REFUSED: dict[str, str] = {
    "optimizer": "tunefleet builds AdamW from training.learning_rate, weight_decay and adam_*",
    "scheduler": "tunefleet builds the LR schedule from training.lr_scheduler_type and warmup",
}


def train_batch_size(hp: Mapping[str, Any], world_size: int) -> int:
    """Samples per optimizer step: micro-batch x accumulation x data-parallel workers."""
    return (
        int(hp["per_device_train_batch_size"])
        * int(hp["gradient_accumulation_steps"])
        * int(world_size)
    )


def generated_config(
    hp: Mapping[str, Any], settings: Mapping[str, Any], world_size: int
) -> dict[str, Any]:
    """The config tunefleet writes for a trial (before the user's extra keys)."""
    stage = int(settings["zero_stage"])
    zero: dict[str, Any] = {"stage": stage}
    if settings["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if settings["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    precision = settings["precision"]
    return {
        "train_batch_size": train_batch_size(hp, world_size),
        "train_micro_batch_size_per_gpu": int(hp["per_device_train_batch_size"]),
        "gradient_accumulation_steps": int(hp["gradient_accumulation_steps"]),
        "gradient_clipping": float(hp.get("max_grad_norm") or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # the client optimizer is torch's AdamW (no fused op to compile on a CPU); with
        # optimizer offload DeepSpeed would insist on its own CPU Adam otherwise
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def conflicts(generated: Mapping[str, Any], user: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(path, user value, what to do) for each user key that fights a generated value."""
    found = []
    for key in user:
        if key in REFUSED:
            found.append((key, user[key], f"not allowed: {REFUSED[key]}"))
    flat_generated = flatten(generated)
    for path, value in flatten({k: v for k, v in user.items() if k not in REFUSED}).items():
        if path in CONTROLLED and path in flat_generated and flat_generated[path] != value:
            found.append(
                (
                    path,
                    value,
                    f"tunefleet sets it to {flat_generated[path]!r} from {CONTROLLED[path]}; "
                    "set that instead (or drop the key)",
                )
            )
        elif path in CONTROLLED and path not in flat_generated:
            found.append((path, value, f"set by {CONTROLLED[path]}; drop the key"))
    return found


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def deepspeed_config(
    hp: Mapping[str, Any], settings: Mapping[str, Any], world_size: int
) -> dict[str, Any]:
    """The trial's full DeepSpeed config; ``ValueError`` naming any conflicting user key."""
    generated = generated_config(hp, settings, world_size)
    user = settings.get("config") or {}
    bad = conflicts(generated, user)
    if bad:
        raise ValueError(
            "distributed.deepspeed.config: "
            + "; ".join(f"{path}={value!r}: {why}" for path, value, why in bad)
        )
    return _merge(generated, user)
