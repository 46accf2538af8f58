"""How a trial's workers take a step together: the engine protocol, for DDP and DeepSpeed.

The loop never branches on the strategy. It asks its engine for four things:

    backward(batch, divisor, last)  forward and backward of one micro-batch
    step()                          clip, optimizer step, zero the gradients
    save(folder, meta)              this rank's part of a checkpoint
    load(folder)                    this rank's state back from a checkpoint

``DDPEngine`` wraps the model with Ray Train's ``prepare_model`` (DDP for more
than one worker) and steps tunefleet's AdamW itself; ``DeepSpeedEngine`` hands
the same AdamW to a DeepSpeed engine (ZeRO), which accumulates, clips and steps.
Both leave the learning rate to the loop (``trainers.optim.set_lr`` on
``engine.optimizer`` before each step): the schedule is a pure function of the
step, never engine state.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from trainers import adapters, ds_engine, precision
from trainers.checkpoint import STATE_FILE, load_trainer_state, save_checkpoint
from trainers.config import HParams, WorkerConfig
from trainers.context import WorkerContext
from trainers.model import unwrap


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite: the trial cannot go on.

    Checked at every optimizer step (one host sync, free on a CPU). Under DDP every rank
    raises it at the same step: the gradients are all-reduced, so a NaN on one rank makes
    the norm NaN on all of them.
    """


class OutOfMemory(RuntimeError):
    """The worker's device could not allocate what a batch needs: at this batch size and
    sequence length the trial cannot go on (retrying it would fail the same way)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory, or the CPU allocator refusing (``can't allocate memory``)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "CUDA out of memory" in text


@contextlib.contextmanager
def out_of_memory_as_error(what: str, device: Any, shape: str, advice: str) -> Iterator[None]:
    """Turn the device running out of memory inside the block into ``OutOfMemory`` that
    says what ran out (``what``, on ``device``, for a batch of ``shape``) and what to do."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OutOfMemory(
            f"out of memory in {what} on {device} (a batch of {shape}): {advice} ({first})"
        ) from None


@dataclass(frozen=True)
class CheckpointMeta:
    """What the loop knows about a checkpoint beyond the engine's own state."""

    tokenizer: Any
    step: int
    epoch: float
    hp: HParams
    metrics: Mapping[str, Any]
    trained: frozenset[str]  # parameters that differ from the base model
    base_model: str
    label_names: list[str]
    weights_only: bool = False  # no optimizer or RNG state: an export, not a resume point
    task: str = "sequence_classification"  # model.task: how the export rebuilds the model
    precision: str = "fp32"  # the arithmetic the trial trained and evaluated in (its device's)


class Engine(Protocol):
    """One rank's side of data-parallel training."""

    model: Any  # what the forward pass runs on (DDP wrapper, DeepSpeed engine, bare model)
    optimizer: torch.optim.Optimizer  # tunefleet's AdamW (the LR is written on its groups)
    every_rank_saves: bool  # does every rank write part of a checkpoint?

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context every forward pass runs in, evaluation included (the precision)."""

    def backward(self, batch: Mapping[str, torch.Tensor], divisor: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; ``last`` closes the accumulation group.
        Returns the (detached) loss divided by ``divisor``."""

    def step(self) -> None:
        """Clip, take the optimizer step, zero the gradients."""

    def save(self, folder: str, meta: CheckpointMeta) -> None:
        """Write this rank's part of a checkpoint into ``folder``."""

    def load(self, folder: str) -> str:
        """Load this rank's optimizer (and RNG) state; weights are loaded before the engine
        is built (``trainers.loop.build_state``). Returns a line for the log."""


def write_checkpoint(
    folder: str,
    meta: CheckpointMeta,
    model: Any,
    optimizer: torch.optim.Optimizer,
    layout: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """``trainers.checkpoint.save_checkpoint`` with what the loop knows (``meta``)."""
    save_checkpoint(
        folder,
        model=unwrap(model),
        tokenizer=meta.tokenizer,
        optimizer=optimizer,
        step=meta.step,
        epoch=meta.epoch,
        hparams=meta.hp.to_dict(),
        metrics=meta.metrics,
        layout=layout,
        trained=meta.trained,
        base_model=meta.base_model,
        label_names=meta.label_names,
        extra=extra,
        weights_only=meta.weights_only and layout != "deepspeed",
        task=meta.task,
        precision=meta.precision,
    )


def requires_grad_names(model: Any) -> list[str]:
    """Names of the parameters that train now, sorted."""
    return sorted(n for n, p in unwrap(model).named_parameters() if p.requires_grad)


class DDPEngine:
    """PyTorch data parallel (or one plain process): tunefleet steps AdamW itself."""

    every_rank_saves = False

    def __init__(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer,
        cfg: WorkerConfig,
        hp: HParams,
        ctx: WorkerContext,
        arithmetic: precision.Precision = "fp32",
    ) -> None:
        self.model = ctx.prepare_model(model)  # to the device; DDP when world_size > 1
        self.model.train()
        self.optimizer = optimizer
        self.max_grad_norm = hp.max_grad_norm
        # under LoRA a checkpoint holds the adapter (the trained tensors) whatever was asked
        self.layout = "trained" if adapters.enabled(hp.adapter) else cfg.checkpoint_weights
        self.arithmetic, self.device = arithmetic, ctx.device
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return precision.autocast(self.arithmetic, self.device)

    def backward(self, batch: Mapping[str, torch.Tensor], divisor: int, last: bool) -> torch.Tensor:
        # Gradients are all-reduced only on the group's last micro-batch.
        sync = last or not hasattr(self.model, "no_sync")
        with torch.enable_grad(), contextlib.nullcontext() if sync else self.model.no_sync():
            with self.autocast():  # the forward only: backward follows the forward's dtypes
                loss = self.model(**batch).loss / divisor
            loss.backward()
        return loss.detach()

    def step(self) -> None:
        # one norm kernel over all gradients, not one per tensor; clipped if asked
        if self.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.max_grad_norm, foreach=True)
        else:
            grads = [p.grad for p in self._trainable if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if not bool(torch.isfinite(norm)):  # before the step: the weights stay finite
            raise TrainingDiverged(f"the gradient norm is {float(norm)}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: str, meta: CheckpointMeta) -> None:
        layout = "trained" if self.layout == "trained" else "full"
        write_checkpoint(folder, meta, self.model, self.optimizer, layout)

    def load(self, folder: str) -> str:
        if not os.path.exists(os.path.join(folder, STATE_FILE)):
            return "weights only (an export checkpoint): the optimizer starts fresh"
        kept, fresh = load_trainer_state(folder, self.optimizer)  # and the RNG state
        return f"optimizer state kept for {kept} tensors, {fresh} start fresh"


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO 0-3) over tunefleet's AdamW: it accumulates, clips and steps."""

    every_rank_saves = True

    def __init__(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer,
        cfg: WorkerConfig,
        hp: HParams,
        ctx: WorkerContext,
        arithmetic: precision.Precision = "fp32",
    ) -> None:
        del arithmetic  # the engine's own bf16/fp16 config (distributed.deepspeed.precision)
        self.settings = cfg.distributed.deepspeed
        self.world_size = ctx.world_size
        self.rank = ctx.rank
        self.optimizer = optimizer  # the client AdamW: ZeRO shares its param groups
        self.model = ds_engine.initialize(
            model, optimizer, hp.to_dict(), self.settings.to_dict(), ctx.world_size, ctx.device
        )
        self.model.train()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # the engine casts its weights itself

    @staticmethod
    def resumes(
        manifest: Mapping[str, Any], model: Any, cfg: WorkerConfig, world_size: int
    ) -> bool:
        """Can this checkpoint go back into an engine of this shape whole (weights and ZeRO
        optimizer state)? Otherwise its shards are merged into the module's weights."""
        return (
            manifest.get("weights") == "deepspeed"
            and manifest.get("trainable") == requires_grad_names(model)
            and manifest.get("world_size") == world_size
            and manifest.get("zero_stage") == cfg.distributed.deepspeed.zero_stage
        )

    def backward(self, batch: Mapping[str, torch.Tensor], divisor: int, last: bool) -> torch.Tensor:
        # The engine steps at the boundary we set; the loss is averaged over the group
        # exactly as in the DDP path.
        self.model.set_gradient_accumulation_boundary(last)
        loss = self.model(**batch).loss.float() / divisor
        self.model.backward(loss, scale_wrt_gas=False)
        return loss.detach()

    def step(self) -> None:
        self.model.step()

    def save(self, folder: str, meta: CheckpointMeta) -> None:
        ds_engine.save(self.model, folder)  # a collective: every rank writes its shards
        if self.rank != 0:
            return
        extra = {
            "world_size": self.world_size,
            "zero_stage": self.settings.zero_stage,
            "trainable": requires_grad_names(self.model),
        }
        write_checkpoint(folder, meta, self.model, self.optimizer, "deepspeed", extra)

    def load(self, folder: str) -> str:
        ds_engine.load(self.model, folder)
        return "DeepSpeed engine state restored (weights and ZeRO optimizer state)"


def build_engine(
    model: Any,
    optimizer: torch.optim.Optimizer,
    cfg: WorkerConfig,
    hp: HParams,
    ctx: WorkerContext,
    arithmetic: precision.Precision = "fp32",
) -> Engine:
    """The engine ``distributed.strategy`` names, over a model that holds its weights;
    ``arithmetic``: the resolved ``distributed.precision`` (DDP only)."""
    cls = DeepSpeedEngine if cfg.deepspeed else DDPEngine
    return cls(model, optimizer, cfg, hp, ctx, arithmetic)
