"""The DeepSpeed engine of a trial's workers: build, save, restore.

The engine wraps the model and takes tunefleet's own AdamW (over the trainable
parameters only: frozen ones never reach it) and LR schedule as client objects;
its config comes from ``trainers.ds_config``. On a CPU worker DeepSpeed runs
with ``DS_ACCELERATOR=cpu`` on the gloo process group Ray Train set up.

Checkpoints: every rank calls ``save_checkpoint`` into ``<folder>/deepspeed``
(ZeRO shards its optimizer state, and under stage 3 its parameters, by rank),
and every rank reports the folder, so Ray Train gathers the shards in one
checkpoint. A restore with the same trainable set, world size and ZeRO stage
loads everything; otherwise (PBT changed the unfreeze depth, say) the loop
merges the shards into the module's weights before the engine is built
(``trainers.checkpoint.load_weights``) and the optimizer starts fresh, logged.

Loading runs no code from the checkpoint. DeepSpeed reads its files with
``torch.load(weights_only=False)``, a full unpickler that can run whatever a
tampered file asks (the SHA-256 manifests catch corruption, and a tamperer can
rewrite them). Every load here runs inside ``weights_only_loads``, which makes
torch's restricted unpickler answer instead (torch's own
``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read at each call), with the three DeepSpeed
classes its checkpoints hold allowed by name (``safe_globals``); anything else in
the file is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from trainers.ds_config import deepspeed_config

DS_DIR = "deepspeed"
DS_TAG = "state"
RNG_DIR = "rng"  # rank_<r>.pt: each rank's RNG state


#: torch's switch that makes every ``torch.load`` weights-only, whatever the caller passes
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers:
    the loss scaler, the ZeRO stage and a fragment's address, found by loading ZeRO-2 and
    ZeRO-3 checkpoints in fp32 and bf16 with ``weights_only=True`` (stage 1 writes
    stage 2's format); and fp16's dynamic loss scaler, the same kind of object (fp16
    runs on GPUs only, not seen here). Plain data each: restoring one runs no code of
    the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's included) is weights-only: tensors, plain
    data and ``safe_globals()``; a file that asks for anything else is refused with
    ``pickle.UnpicklingError``. The switch is an environment variable (process-wide for
    the duration: a load in another thread is made safe too, never less safe)."""
    import torch.serialization

    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


def use_cpu_accelerator(device: Any) -> None:
    """Before deepspeed is imported: its CPU accelerator on a CPU worker."""
    if torch.device(device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def initialize(
    model: Any,
    optimizer: torch.optim.Optimizer,
    hp: Mapping[str, Any],
    settings: Mapping[str, Any],
    world_size: int,
    device: Any,
) -> Any:
    """A DeepSpeed engine over ``model`` with the client optimizer (no LR scheduler: the loop
    writes the LR on the optimizer's groups before every step)."""
    use_cpu_accelerator(device)
    import deepspeed

    device = torch.device(device)
    if device.type == "cuda":
        # Ray Train hands an indexed device; a bare "cuda" (one-process runs) means
        # this process's local rank, the GPU DeepSpeed will place the engine on.
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(hp, settings, world_size),
    )
    return engine


def is_engine(model: Any) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save(engine: Any, folder: str) -> None:
    """Every rank writes its part (a collective call) and its own RNG state (ranks draw
    different dropout masks, so an exact resume needs each one's)."""
    engine.save_checkpoint(os.path.join(folder, DS_DIR), tag=DS_TAG, save_latest=True)
    os.makedirs(os.path.join(folder, RNG_DIR), exist_ok=True)
    torch.save(
        {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        os.path.join(folder, RNG_DIR, f"rank_{_rank()}.pt"),
    )


def load(engine: Any, folder: str) -> None:
    """Load a DeepSpeed checkpoint (weights, ZeRO optimizer state, this rank's RNG) into a
    freshly initialized engine of the same shape."""
    with weights_only_loads():
        path, _ = engine.load_checkpoint(
            os.path.join(folder, DS_DIR),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # the LR is a function of the step (trainers.optim)
        )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}/{DS_DIR}")
    rng = os.path.join(folder, RNG_DIR, f"rank_{_rank()}.pt")
    if os.path.exists(rng):
        state = torch.load(rng, weights_only=True)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])


def gathered(model: Any) -> Any:
    """A context in which ZeRO-3 partitioned parameters are whole (a no-op otherwise)."""
    import contextlib

    params = list(model.parameters())
    if not any(hasattr(p, "ds_tensor") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def merged_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a checkpoint's ZeRO shards (DeepSpeed's zero_to_fp32)."""
    use_cpu_accelerator("cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(os.path.join(folder, DS_DIR), tag=DS_TAG)
