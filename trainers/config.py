"""The worker's config, typed: what one trial's workers are told, and nothing else.

The driver (``tune_jobs.trial.loop_config``) builds a ``WorkerConfig`` from the
job spec; the workers only read it. Its fields carry **no defaults** for anything
the job spec sets: the spec (``tune_jobs.spec``) is the one place a default is
written, so the worker can never disagree with it (it once did: warmup 0.0 here
against 0.1 in the spec, DeepSpeed fp32 here against bf16 there). The few
defaults below are the worker's own (a test's name, no resume, no replay).

``WorkerConfig.from_dict`` reads the plain-dict form (tests, benchmarks, and the
``train_loop_config`` of a ``TorchTrainer``, which must be a dict); a missing or
unknown key is an error naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal


class ConfigError(ValueError):
    """A worker config with missing or unknown keys (a driver bug, or a hand-written dict)."""


#: The training keys that set dropout (``HParams`` fields, spec ``training.<key>``), and
#: the knob each one sets in a model family (``trainers.model.DROPOUT_ATTRS``).
DROPOUT_KEYS: dict[str, str] = {
    "hidden_dropout": "hidden",
    "attention_dropout": "attention",
    "classifier_dropout": "classifier",
}


def _take(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The dataclass fields of ``cls`` out of ``values``; every required one must be there."""
    names = {f.name for f in fields(cls)}
    required = {
        f.name
        for f in fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(values))
    if missing:
        raise ConfigError(f"{where}: missing {missing}")
    return {k: v for k, v in values.items() if k in names}


@dataclass(frozen=True)
class HParams:
    """One trial's training hyperparameters (Hugging Face ``TrainingArguments`` names).

    Each field is described in ``tune_jobs.spec.TrainingSpec``, which holds its default.
    """

    learning_rate: float  # peak AdamW LR
    per_device_train_batch_size: int  # micro-batch per worker
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int  # micro-batches per optimizer step
    num_train_epochs: float
    max_steps: int | None  # budget in optimizer steps; overrides epochs
    weight_decay: float
    warmup_ratio: float  # share of total steps
    warmup_steps: int  # overrides warmup_ratio when > 0
    lr_scheduler_type: str
    max_grad_norm: float  # 0 = no clipping
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    eval_strategy: Literal["steps", "epoch", "rungs"]
    eval_steps: float  # steps between evaluations, or a share of the budget below 1
    hidden_dropout: float | None  # None = the model's own
    attention_dropout: float | None
    classifier_dropout: float | None
    unfreeze_depth: int | None  # top blocks that train; None = every parameter
    train_embeddings: bool | None
    gradual_unfreeze_every: float | None
    gradual_unfreeze_unit: Literal["epoch", "step"]
    layerwise_lr_decay: float  # 1 = off
    early_stopping_patience: int | None  # evaluations without a gain; None = off
    early_stopping_min_delta: float
    save_checkpoints: bool
    group_by_length: bool
    #: the ``adapter`` section as this trial has it (searched keys sampled); None: no adapter
    adapter: Mapping[str, Any] | None = None
    #: eval_strategy=rungs: where the evaluations fall (the scheduler's rungs), in eval_at_unit
    eval_at: tuple[float, ...] = ()
    eval_at_unit: Literal["epoch", "step"] = "epoch"
    #: evaluations up to screen_until (in eval_at_unit; not the last) score this many
    #: validation rows, a fixed sample (``trainers.data.screen_rows``); 0: every row
    screen_rows: int = 0
    screen_until: float = 0.0

    @classmethod
    def from_dict(cls, hp: Mapping[str, Any]) -> HParams:
        """From a dict with every field (extra keys, such as the spec's own, are ignored)."""
        return hp if isinstance(hp, HParams) else cls(**_take(cls, hp, "hp"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> HParams:
        return dataclasses.replace(self, **changes)

    @property
    def uses_layers(self) -> bool:
        """Does this trial freeze blocks or scale LRs per block (so the blocks must be found)?"""
        return (
            self.unfreeze_depth is not None
            or bool(self.gradual_unfreeze_every)
            or self.layerwise_lr_decay != 1.0
            or self.train_embeddings is not None
        )


@dataclass(frozen=True)
class DeepSpeedSettings:
    """``distributed.deepspeed`` of the spec (see ``tune_jobs.spec.DeepSpeedSpec``)."""

    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    precision: Literal["bf16", "fp16", "fp32"]
    config: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Distributed:
    """How the workers train together (``distributed`` of the spec)."""

    strategy: Literal["ddp", "deepspeed"]
    precision: Literal["auto", "bf16", "fp32"]  # DDP and single-process (trainers.precision)
    activation_checkpointing: bool
    deepspeed: DeepSpeedSettings

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Distributed) -> Distributed:
        if isinstance(d, Distributed):
            return d
        values = _take(cls, d, "distributed")
        values["deepspeed"] = DeepSpeedSettings(
            **_take(DeepSpeedSettings, d["deepspeed"], "distributed.deepspeed")
        )
        return cls(**values)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one trial's workers are told."""

    model: str  # model.name_or_path (a hub name, a folder, or package:<module>)
    max_length: int  # tokens per text
    data: Any  # trainers.data.Splits, or a Ray object ref to them
    hp: HParams
    metric: str  # the searched metric (early stopping watches it)
    mode: Literal["max", "min"]
    seed: int
    threads: int  # torch intra-op threads of this worker
    checkpoint_weights: Literal["full", "trained", "deepspeed"]
    distributed: Distributed
    name: str = "trial"  # log prefix
    fingerprint_weights: bool = False  # report the weights' SHA-256 at every evaluation
    #: ``(from_step, hp)`` switches of hyperparameters within the trial (a PBT replay)
    hp_schedule: tuple[tuple[int, HParams], ...] = ()
    resume_from: str | None = None  # a checkpoint path or URI to start from
    trust_remote_code: bool = False  # model.trust_remote_code: run the model's own code
    #: model.task (``trainers.tasks``); the spec's default too, for hand-written configs
    task: str = "sequence_classification"

    def __post_init__(self) -> None:
        steps = [s for s, _ in self.hp_schedule]
        if any(s < 0 for s in steps) or steps != sorted(steps):
            raise ConfigError(f"hp_schedule: steps must be >= 0 and sorted, got {steps}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | WorkerConfig) -> WorkerConfig:
        """From the plain-dict form; unknown keys are an error."""
        if isinstance(d, WorkerConfig):
            return d
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"worker config: unknown keys {unknown}")
        values = _take(cls, d, "worker config")
        values["hp"] = HParams.from_dict(d["hp"])
        values["distributed"] = Distributed.from_dict(d["distributed"])
        values["hp_schedule"] = tuple(
            sorted(
                ((int(s), HParams.from_dict(h)) for s, h in d.get("hp_schedule") or ()),
                key=lambda x: x[0],
            )
        )
        return cls(**values)

    def replace(self, **changes: Any) -> WorkerConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A shallow dict (a ``TorchTrainer``'s ``train_loop_config``); ``from_dict`` reads it back."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def deepspeed(self) -> bool:
        return self.distributed.strategy == "deepspeed"
