"""The training loop, in parts a newcomer can read one at a time.

``train_loop`` runs one trial in a plain process (``run_local``: tests and
debugging, every evaluation written so any can be restored); a sweep's trials
(warm group workers, or a single-process trial's own process) are served command
by command (``trainers.serve``), which calls the same parts for trial after trial,
and the driver decides what each evaluation is worth writing
(``tune_jobs.warm.checkpoint_writes``). The config is a
``trainers.config.WorkerConfig``.

The parts, in the order a trial meets them:

    Worker          once per worker process: threads, tokenizer, the task, this rank's
                    tokenized shards, the base model (``BaseModels``: what is kept)
    Worker.start    a trial's TrainState: from the base model or a checkpoint
    build_state     builds or rebuilds the training state (start, restore,
                    exploit, replay switch, gradual unfreeze): model, frozen set,
                    optimizer, engine (``trainers.engine``), step
    TrialRun.train_to_next_evaluation
                    optimizer steps, the LR written before each one (a pure
                    function of the step, ``trainers.optim.lr_at``)
    TrialRun.evaluate_and_report
                    evaluation, early stopping, the report and its checkpoint
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from trainers import adapters, ds_engine, precision
from trainers import metrics as M
from trainers.checkpoint import (
    CorruptCheckpoint,
    folder_bytes,
    load_optimizer_state_by_name,
    load_weights,
    optimizer_state_by_name,
    restore_rng,
    trained_params,
    verify,
    weights_fingerprint,
)
from trainers.config import DROPOUT_KEYS, HParams, WorkerConfig
from trainers.context import LocalContext, WorkerContext
from trainers.data import Splits, screen_sample, shard
from trainers.engine import (
    CheckpointMeta,
    DeepSpeedEngine,
    Engine,
    TrainingDiverged,
    build_engine,
    out_of_memory_as_error,
    write_checkpoint,
)
from trainers.model import (
    LayerMap,
    ModelError,
    apply_freezing,
    build_model,
    build_tokenizer,
    layer_map,
    resolve_model_path,
    unwrap,
)
from trainers.optim import build_optimizer, lr_at, lr_scale_by_name, set_lr
from trainers.tasks import Rows, get_task


def train_loop(config: WorkerConfig | dict[str, Any], ctx: WorkerContext) -> None:
    """Fine-tune, evaluate and checkpoint; every evaluation is reported through ``ctx``."""
    cfg = WorkerConfig.from_dict(config)
    worker = Worker(cfg, ctx)
    with ctx.restore_dir() as restore:
        run = worker.start(cfg, restore)
    while not run.done:
        run.train_to_next_evaluation()
        run.evaluate_and_report()


# --- budget arithmetic (pure) ------------------------------------------------


def steps_per_epoch(n_train: int, hp: HParams, world_size: int) -> int:
    """Optimizer steps in one epoch, after the data is sharded across workers."""
    per_rank = n_train // world_size
    micro_batches = math.ceil(per_rank / hp.per_device_train_batch_size)
    return max(1, math.ceil(micro_batches / hp.gradient_accumulation_steps))


def total_steps(n_train: int, hp: HParams, world_size: int) -> int:
    """The trial's budget in optimizer steps: ``max_steps`` if set, else epochs x steps/epoch."""
    if hp.max_steps:
        return int(hp.max_steps)
    return math.ceil(hp.num_train_epochs * steps_per_epoch(n_train, hp, world_size))


def eval_interval(steps_in_epoch: int, last_step: int, hp: HParams) -> int:
    """Optimizer steps between evaluations: an epoch, ``eval_steps``, or that share of the budget."""
    if hp.eval_strategy == "epoch":
        return steps_in_epoch
    if hp.eval_strategy == "rungs":  # at the rungs (evaluation_points), else only at the end
        return last_step
    every = hp.eval_steps
    return max(1, math.ceil(every * last_step)) if every < 1 else int(every)


def evaluation_points(steps_in_epoch: int, last_step: int, hp: HParams) -> tuple[int, ...]:
    """``eval_strategy: rungs``: the steps of the evaluations before the end (each rung of
    ``eval_at``, in epochs or steps); empty otherwise."""
    if hp.eval_strategy != "rungs":
        return ()
    per = steps_in_epoch if hp.eval_at_unit == "epoch" else 1
    return tuple(
        sorted({s for s in (math.ceil(v * per - 1e-9) for v in hp.eval_at) if 0 < s < last_step})
    )


def screening_through(steps_in_epoch: int, last_step: int, hp: HParams) -> int:
    """The last step whose evaluation scores the screening sample (``hp.screen_rows`` rows,
    up to ``hp.screen_until`` in ``eval_at_unit``); 0: none does. Never the last step: a
    trial's final evaluation always scores every validation row."""
    if hp.screen_rows <= 0 or hp.screen_until <= 0:
        return 0
    per = steps_in_epoch if hp.eval_at_unit == "epoch" else 1
    # the step an evaluation at screen_until falls on (as evaluation_points rounds it)
    return min(last_step - 1, math.ceil(hp.screen_until * per - 1e-9))


def next_evaluation(step: int, interval: int, last_step: int, at: tuple[int, ...] = ()) -> int:
    """The step of the next evaluation after ``step``: the next of ``at`` (rungs) when
    given, else every ``interval`` steps; and the end."""
    if at:
        return min([s for s in at if s > step] + [last_step])
    return min(last_step, (step // interval + 1) * interval)


def depth_at(step: int, hp: HParams, steps_in_epoch: int, n_blocks: int) -> int | None:
    """Unfrozen top blocks at ``step``: ``unfreeze_depth``, plus one per gradual interval.

    A pure function of the step, so a restored or exploited trial lands on the
    same depth. ``None`` means every block trains.
    """
    every = hp.gradual_unfreeze_every
    if not every:
        return hp.unfreeze_depth
    every_steps = every * steps_in_epoch if hp.gradual_unfreeze_unit == "epoch" else every
    return min(n_blocks, (hp.unfreeze_depth or 0) + int(step // max(1.0, every_steps)))


def loss_gap_trend(history: list[tuple[float, float]]) -> float:
    """Least-squares slope of (eval_loss - train_loss) per epoch over the last 3 evaluations."""
    pts = history[-3:]
    if len(pts) < 2:
        return 0.0
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0


# --- once per worker ---------------------------------------------------------


def build_runtime(cfg: WorkerConfig) -> None:
    """Threads and seeds for this worker."""
    from transformers import logging as hf_logging

    torch.set_num_threads(max(1, int(cfg.threads)))
    torch.manual_seed(cfg.seed)
    hf_logging.set_verbosity_error()  # the expected "newly initialized classifier" report
    hf_logging.disable_progress_bar()  # per-shard load/save bars drown the trial logs


def resolve_data(data: Any) -> Splits:
    """The splits, fetched from the object store when passed by reference."""
    if isinstance(data, Splits):
        return data
    import ray

    return ray.get(data)


@dataclass(frozen=True)
class WorkerData:
    """This rank's tokenized shards: the training rows (equal counts across ranks, so every
    rank takes the same number of steps) and its part of the validation rows."""

    train: Rows
    val: Rows
    n_train: int  # training rows (or packed blocks) of all ranks: the budget's unit
    label_names: list[str]  # the classes, or a causal LM's answer set
    pad_id: int


def build_data(
    splits: Splits, tokenizer: Any, max_length: int, ctx: WorkerContext, task: Any = None
) -> WorkerData:
    """Tokenize this rank's shards the task's way, once per worker."""
    task = task or get_task("sequence_classification")
    train, n_train = task.encode_train(tokenizer, splits, max_length, ctx.rank, ctx.world_size)
    val_rows = shard(range(len(splits.validation)), ctx.rank, ctx.world_size, equal=False)
    val = task.encode_eval(tokenizer, splits.validation, val_rows, max_length, splits)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return WorkerData(train, val, n_train, list(splits.label_names), pad)


def build_key(hp: HParams) -> tuple[Any, ...]:
    """What is fixed when a model is built: its dropout, and its adapter's settings."""
    adapter = tuple(sorted((hp.adapter or {}).items())) if adapters.enabled(hp.adapter) else ()
    return (*(getattr(hp, f) for f in DROPOUT_KEYS), repr(adapter))


class BaseModels:
    """The base model a worker starts every trial from, per dropout setting (dropout is
    fixed when a model is built), without one copy per trial where it can be helped:

    - a classifier: the pristine model (its fresh head drawn from the seeded RNG, exactly
      as a cold trial would) is kept and copied for each trial;
    - a causal LM, fully fine-tuned: loaded again from its (memory-mapped) safetensors
      folder for each trial: no pristine copy beside the trained one;
    - under LoRA: one base, never trained, kept in ``base_dtype``; a trial attaches a
      fresh adapter and the next one drops it (``trainers.adapters``): no copy at all.

    ``rng_after_load[seed]`` is the RNG state right after the first load under that seed,
    which every trial of the seed starts from, so a trial on a warm worker trains exactly
    as on a fresh one. A trial's seed is the run's, or its own (a reevaluation,
    ``tune_jobs.reevaluate``): a pristine model per seed (its head drawn under it).
    """

    KEEP = 2  # dropout settings held in memory (PBT may mutate dropout)

    def __init__(
        self,
        path: str,
        label_names: list[str],
        seed: int,
        trust_remote_code: bool = False,
        task: str = "sequence_classification",
        lora_dtype: torch.dtype = torch.float32,
        share_base: bool = True,
    ) -> None:
        self.path, self.label_names, self.seed = path, label_names, seed
        self.trust_remote_code, self.task, self.lora_dtype = trust_remote_code, task, lora_dtype
        #: may trials share one base under LoRA? Not under ZeRO-3: its engine partitions the
        #: module's parameters in place, so each trial's engine needs a base of its own
        self.share_base = share_base
        self._models: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.rng_after_load: dict[int, torch.Tensor] = {}

    def fresh(self, hp: HParams, seed: int | None = None) -> Any:
        """A trainable model for ``hp`` (its adapter's A matrices drawn from the RNG)."""
        if adapters.enabled(hp.adapter) and not self.share_base:
            self.load(hp, seed)  # records the RNG state a trial starts from
            base = self._build(hp, self.lora_dtype).requires_grad_(False)
            return adapters.attach(base, hp.adapter)
        if adapters.enabled(hp.adapter):
            key = self._key(hp, seed)
            base = adapters.detach(self.load(hp, seed))  # the last trial's adapter dropped
            self._models[key] = base
            return adapters.attach(base, hp.adapter)
        if self.task != "sequence_classification":
            self.load(hp, seed)  # records the RNG state a trial starts from
            return self._build(hp, torch.float32)
        return copy.deepcopy(self.load(hp, seed))

    def _key(self, hp: HParams, seed: int | None) -> tuple[Any, ...]:
        seed = self.seed if seed is None else seed
        return (*(getattr(hp, f) for f in DROPOUT_KEYS), adapters.enabled(hp.adapter), seed)

    def _build(self, hp: HParams, dtype: torch.dtype) -> Any:
        return build_model(
            self.path, self.label_names, hp.to_dict(), self.trust_remote_code, self.task, dtype
        )

    def load(self, hp: HParams, seed: int | None = None) -> Any:
        """The pristine model for ``hp``'s dropout and ``seed`` (never trained: copy it to
        train). A fully fine-tuned causal LM keeps none (``None``): it is read again per trial."""
        seed = self.seed if seed is None else seed
        key = self._key(hp, seed)
        if key not in self._models:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lora = adapters.enabled(hp.adapter)
                model = None  # a causal LM draws nothing when it loads: nothing to keep
                if (lora and self.share_base) or self.task == "sequence_classification":
                    model = self._build(hp, self.lora_dtype if lora else torch.float32)
                if lora and model is not None:
                    model.requires_grad_(False)  # the base never trains
                self._models[key] = model
                if seed not in self.rng_after_load:
                    self.rng_after_load[seed] = torch.get_rng_state()
            while len(self._models) > self.KEEP:
                self._models.popitem(last=False)
        self._models.move_to_end(key)
        return self._models[key]


class Worker:
    """What one worker process builds once and keeps for every trial it runs."""

    def __init__(self, cfg: WorkerConfig, ctx: WorkerContext) -> None:
        build_runtime(cfg)
        self.ctx = ctx
        self.model_name = cfg.model
        self.model_path = resolve_model_path(cfg.model)
        self.tokenizer = build_tokenizer(self.model_path, cfg.trust_remote_code)
        self.task = get_task(cfg.task)
        self.splits = resolve_data(cfg.data)
        self.max_length = cfg.max_length
        self.data = build_data(self.splits, self.tokenizer, cfg.max_length, ctx, self.task)
        self._screens: dict[int, Any] = {}
        if cfg.deepspeed:
            ds_engine.use_cpu_accelerator(ctx.device)
        # DDP's arithmetic, resolved on this worker's own device (auto: bf16 where native)
        self.precision = precision.resolve(cfg.distributed.precision, ctx.device)
        self.models = BaseModels(
            self.model_path,
            self.data.label_names,
            cfg.seed,
            cfg.trust_remote_code,
            cfg.task,
            adapters.base_dtype("fp32" if cfg.deepspeed else self.precision),
            share_base=not (cfg.deepspeed and cfg.distributed.deepspeed.zero_stage == 3),
        )
        if not cfg.deepspeed:
            _log(
                ctx,
                cfg,
                f"precision {self.precision} (distributed.precision: "
                f"{cfg.distributed.precision}, device {ctx.device})",
            )

    def start(self, cfg: WorkerConfig, restore: str | None) -> TrialRun:
        """A trial's first state: the base model at step 0, or a checkpoint's step."""
        if cfg.deepspeed and cfg.hp_schedule:
            raise ValueError("hp_schedule (a PBT replay) needs distributed.strategy: ddp")
        torch.manual_seed(cfg.seed)  # every trial of a seed starts from the same RNG state
        self.models.load(cfg.hp, cfg.seed)
        torch.set_rng_state(self.models.rng_after_load[cfg.seed])
        manifest: dict[str, Any] = {"step": 0, "hparams": {}}
        if restore:
            try:
                manifest = verify(restore)  # every file against its size and SHA-256
            except CorruptCheckpoint as exc:
                _log(self.ctx, cfg, f"{exc}: not loaded; the trial starts again from step 0")
                restore = None
        step = int(manifest["step"])
        # A replayed schedule resumed mid-way starts with the hyperparameters in force there.
        hp, segment = cfg.hp, 0
        while restore and segment < len(cfg.hp_schedule) and cfg.hp_schedule[segment][0] <= step:
            hp, segment = cfg.hp_schedule[segment][1], segment + 1
        state, note = build_state(self, cfg, hp, step, segment, restore=restore, manifest=manifest)
        restored: dict[str, Any] = {M.RESTORED_FROM_STEP: step if restore else -1}
        if restore:
            if cfg.fingerprint_weights:
                restored[M.RESTORED_WEIGHTS] = _fingerprint(state.engine.model)
            saved, now = manifest.get("hparams", {}), hp.to_dict()
            changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
            _log(
                self.ctx,
                cfg,
                f"restored step {step} from {restore}: {note}"
                + (f"; hyperparameters now differ: {changed}" if changed else ""),
            )
        return TrialRun(self, cfg, state, restored)

    def screen_data(self, rows: int) -> Any:
        """This rank's part of the screening sample of ``rows`` validation rows
        (``trainers.data.screen_sample``: the same rows on every worker), encoded once."""
        if rows not in self._screens:
            sample = screen_sample(len(self.splits.validation), rows)
            mine = shard(sample, self.ctx.rank, self.ctx.world_size, equal=False)
            self._screens[rows] = self.task.encode_eval(
                self.tokenizer, self.splits.validation, mine, self.max_length, self.splits
            )
        return self._screens[rows]


# --- the training state --------------------------------------------------------


@dataclass
class TrainState:
    """Everything that trains, for one stretch of hyperparameters."""

    hp: HParams
    engine: Engine
    lmap: LayerMap | None
    n_blocks: int
    depth: int | None  # unfrozen top blocks (None: every block)
    n_trainable: int
    step: int  # optimizer steps taken
    steps_per_epoch: int
    last_step: int
    eval_interval: int
    trained: set[str]  # parameters that differ from the base model
    eval_at: tuple[int, ...] = ()  # eval_strategy=rungs: the evaluations' steps
    screen_through: int = 0  # evaluations up to this step score the screening sample
    segment: int = 0  # index into the replay schedule

    @property
    def model(self) -> Any:
        return unwrap(self.engine.model)


def _try_layer_map(model: Any) -> LayerMap | None:
    """The layer map for reporting only (no freezing asked for): ``None`` if the blocks are not found."""
    try:
        return layer_map(model)
    except ModelError:
        return None


def trained_state(model: Any, trained: set[str]) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that differ from the base model (with the base, the
    whole state): for a rebuild, or a held copy of a trial's best weights."""
    return {
        n: p.detach().to("cpu", copy=True)
        for n, p in unwrap(model).named_parameters()
        if n in trained
    }


def freeze(
    model: Any, lmap: LayerMap | None, hp: HParams, depth: int | None
) -> tuple[dict[str, float] | None, int]:
    """Freeze to ``depth``; return the per-parameter LR scale (layer-wise decay) and trainable
    count. Under LoRA only the adapter trains (in the top ``depth`` blocks)."""
    if adapters.enabled(hp.adapter):
        count = adapters.apply_freezing(model, lmap, depth)
        if hp.layerwise_lr_decay == 1.0 or lmap is None:
            return None, count
        names = [n for n, _ in model.named_parameters()]
        return lr_scale_by_name(names, lmap.blocks, lmap.embeddings, hp.layerwise_lr_decay), count
    if lmap is None or not hp.uses_layers:
        return None, sum(p.numel() for p in model.parameters())
    count = apply_freezing(model, lmap, depth, hp.train_embeddings)
    if hp.layerwise_lr_decay == 1.0:
        return None, count
    names = [n for n, _ in model.named_parameters()]
    return lr_scale_by_name(names, lmap.blocks, lmap.embeddings, hp.layerwise_lr_decay), count


def build_state(
    worker: Worker,
    cfg: WorkerConfig,
    hp: HParams,
    step: int,
    segment: int = 0,
    *,
    restore: str | None = None,
    manifest: dict[str, Any] | None = None,
    live: TrainState | None = None,
) -> tuple[TrainState, str]:
    """The training state for ``hp`` at ``step``, and a line for the log on what it kept.

    The weights come from one of three sources:

    - the base model (a new trial);
    - ``restore``, a checkpoint folder (a fault restore, a PBT exploit, a resume);
    - ``live``, the state training now (a replay switch, a gradual-unfreeze step):
      its weights and AdamW moments carry over, by parameter name.

    The weights are loaded before the engine is built (a DeepSpeed engine copies
    them into its partitions); the engine then loads its own state. The LR needs
    nothing restored: it is ``lr_at(hp, step)``, written on every step.
    """
    ctx = worker.ctx
    moments: dict[str, Any] = {}
    if live is not None:
        moments = optimizer_state_by_name(live.engine.optimizer)
        if build_key(hp) == build_key(live.hp):
            model = live.model
        else:  # rebuilt (new dropout or adapter settings): what trained carries over
            carried = trained_state(live.model, live.trained)
            model = worker.models.fresh(hp, cfg.seed)
            model.load_state_dict(carried, strict=False)
    else:
        model = worker.models.fresh(hp, cfg.seed)
    if cfg.distributed.activation_checkpointing:  # non-reentrant: works with frozen lower blocks
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        # transformers then makes the input embeddings require grad (reentrant checkpointing
        # needs it), so the backward ran through every frozen block, recomputed, to an
        # embedding output nothing trains: counted, 4 frozen blocks of 6 (test_loop).
        # Non-reentrant checkpointing needs no such input.
        model.disable_input_require_grads()
    lmap = layer_map(model) if hp.uses_layers else _try_layer_map(model)
    n_blocks = lmap.num_blocks if lmap else 0
    spe = steps_per_epoch(worker.data.n_train, hp, ctx.world_size)
    last_step = total_steps(worker.data.n_train, hp, ctx.world_size)
    depth = depth_at(step, hp, spe, n_blocks)
    lr_scale, n_trainable = freeze(model, lmap, hp, depth)

    # A DeepSpeed checkpoint of the same shape goes back into the engine whole; any other
    # checkpoint (PBT changed the depth, say) is loaded, or its shards merged, into the weights.
    whole = (
        bool(restore)
        and cfg.deepspeed
        and DeepSpeedEngine.resumes(manifest or {}, model, cfg, ctx.world_size)
    )
    if restore and not whole:
        load_weights(restore, model)
    optimizer = build_optimizer(model, hp, lr_scale)
    kept, fresh = load_optimizer_state_by_name(optimizer, moments)
    engine = build_engine(model, optimizer, cfg, hp, ctx, worker.precision)
    note = f"optimizer state kept for {kept} tensors, {fresh} start fresh"
    if restore:
        note = engine.load(restore) if whole or not cfg.deepspeed else _rng_only(restore)
    set_lr(optimizer, lr_at(hp, step, last_step))

    trained = set(live.trained) if live else set()
    if restore:
        trained = trained_params(manifest or {}, model)
    state = TrainState(
        hp=hp,
        engine=engine,
        lmap=lmap,
        n_blocks=n_blocks,
        depth=depth,
        n_trainable=n_trainable,
        step=step,
        steps_per_epoch=spe,
        last_step=last_step,
        eval_interval=eval_interval(spe, last_step, hp),
        eval_at=evaluation_points(spe, last_step, hp),
        screen_through=screening_through(spe, last_step, hp),
        trained=trained | {n for n, p in model.named_parameters() if p.requires_grad},
        segment=segment,
    )
    return state, note


def _rng_only(restore: str) -> str:
    """A DeepSpeed restore into an engine of another shape: the RNG state, and say so."""
    restore_rng(restore)
    return (
        "module weights only (the trainable set, world size, ZeRO stage or strategy changed): "
        "the DeepSpeed optimizer was rebuilt and starts fresh"
    )


# --- one trial -------------------------------------------------------------------


@dataclass
class Progress:
    """What the loop tracks between evaluations, and across them for early stopping."""

    best: float | None = None
    evals_without_gain: int = 0
    gap_history: list[tuple[float, float]] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None  # summed on the device: no sync per micro-batch
    micro_batches: int = 0
    samples: int = 0
    since: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro_batches += 1
        self.samples += samples

    def take_interval(self) -> tuple[float, float]:
        """(mean training loss, samples/s) since the last evaluation; starts a new interval."""
        elapsed = time.perf_counter() - self.since
        loss = float(self.loss_sum) / self.micro_batches if self.micro_batches else math.nan
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        self.loss_sum, self.micro_batches, self.samples = None, 0, 0
        self.since = time.perf_counter()
        return loss, rate


def early_stop(progress: Progress, value: float, hp: HParams, mode: str) -> bool:
    """Record ``value`` of the watched metric; has it gone ``patience`` evaluations without a gain?"""
    best = progress.best
    if best is None or M.gain(value, best, mode) > hp.early_stopping_min_delta:
        progress.best, progress.evals_without_gain = value, 0
    else:
        progress.evals_without_gain += 1
    patience = hp.early_stopping_patience
    return bool(patience) and progress.evals_without_gain >= patience


def epoch_micro_batches(
    data: WorkerData, hp: HParams, seed: int, epoch: int, task: Any = None
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``epoch``, in order.

    The same permutation on every rank (seed + epoch), so the shards stay disjoint
    and a resumed trial sees the batches an uninterrupted one would.
    """
    task = task or get_task("sequence_classification")
    generator = torch.Generator().manual_seed(seed + epoch)
    micro = hp.per_device_train_batch_size
    if hp.group_by_length:
        # transformers' own grouping (the Trainer's group_by_length): shuffled mega-batches
        # of up to 50 batches, each sorted by length, the longest batch first
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(data.train.lengths(), micro, generator=generator)
    else:
        order = torch.randperm(len(data.train), generator=generator).tolist()
    return list(task.batches(data.train, order, micro, data.pad_id))


class TrialRun:
    """One trial on one worker: train to the next evaluation, evaluate, report, repeat."""

    def __init__(
        self, worker: Worker, cfg: WorkerConfig, state: TrainState, restored: dict[str, Any]
    ) -> None:
        self.worker, self.cfg, self.state = worker, cfg, state
        self.progress = Progress()
        self.restored = restored  # restored_from_step (and weights), in every report
        self.stopped = False  # by early stopping
        self._epoch: tuple[Any, list[dict[str, torch.Tensor]]] | None = None
        # Restored at the end of its budget (a PBT exploit of a finished donor, say):
        # one evaluation still reports a result for these weights.
        self._report_at_end = state.step >= state.last_step

    @property
    def done(self) -> bool:
        s = self.state
        return self.stopped or (
            s.step >= s.last_step and not self._report_at_end and not self._switch_due()
        )

    def _switch_due(self) -> bool:
        schedule, s = self.cfg.hp_schedule, self.state
        return s.segment < len(schedule) and schedule[s.segment][0] <= s.step

    def _switch(self) -> None:
        """The replay schedule's next hyperparameters, from the live weights, moments and step."""
        s = self.state
        hp = self.cfg.hp_schedule[s.segment][1]
        self.state, note = build_state(self.worker, self.cfg, hp, s.step, s.segment + 1, live=s)
        changed = {k: v for k, v in hp.to_dict().items() if v != self.cfg.hp.to_dict()[k]}
        _log(
            self.worker.ctx,
            self.cfg,
            f"step {s.step}: hyperparameters switch to segment {s.segment + 1} {changed}; {note}",
        )
        # switched at the end of the budget: evaluate once there, as after an exploit
        self._report_at_end = self.state.step >= self.state.last_step

    def _unfreeze(self) -> None:
        """Gradual unfreezing: one more block trains from this step on."""
        if self.cfg.deepspeed:
            raise ValueError("gradual unfreezing needs distributed.strategy: ddp")
        s = self.state
        self.state, note = build_state(self.worker, self.cfg, s.hp, s.step, s.segment, live=s)
        _log(
            self.worker.ctx,
            self.cfg,
            f"step {s.step}: unfreeze depth {self.state.depth}/{s.n_blocks}; {note}",
        )

    def _micro_batches(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        hp = self.state.hp
        key = (epoch, hp.per_device_train_batch_size, hp.group_by_length)
        if self._epoch is None or self._epoch[0] != key:
            self._epoch = (
                key,
                epoch_micro_batches(self.worker.data, hp, self.cfg.seed, epoch, self.worker.task),
            )
        return self._epoch[1]

    def train_to_next_evaluation(self) -> None:
        """Optimizer steps up to the next evaluation, switching hyperparameters on the way
        (a switch due at the evaluation's step comes after the evaluation)."""
        while self._switch_due():
            self._switch()
        s = self.state
        stop_at = next_evaluation(s.step, s.eval_interval, s.last_step, s.eval_at)
        device, world_size = self.worker.ctx.device, self.worker.ctx.world_size
        while not self._report_at_end and self.state.step < stop_at:
            s = self.state
            hp, engine = s.hp, s.engine
            accum = hp.gradient_accumulation_steps
            micro = self._micro_batches(s.step // s.steps_per_epoch)
            k = (s.step % s.steps_per_epoch) * accum  # where in the epoch this step starts
            group = micro[k : k + accum]
            step_loss = None
            for i, cpu_batch in enumerate(group):
                with out_of_memory_as_error(
                    f"training step {s.step + 1}",
                    device,
                    "x".join(map(str, cpu_batch["input_ids"].shape)) + " tokens",
                    "lower training.per_device_train_batch_size (raise "
                    "gradient_accumulation_steps to keep the batch) or model.max_length, or "
                    "turn on distributed.activation_checkpointing",
                ):
                    batch = {n: t.to(device, non_blocking=True) for n, t in cpu_batch.items()}
                    loss = engine.backward(batch, len(group), last=i == len(group) - 1)
                step_loss = loss if step_loss is None else step_loss + loss
                self.progress.add(loss * len(group), len(cpu_batch["input_ids"]) * world_size)
            lr = lr_at(hp, s.step, s.last_step)
            try:
                if not bool(torch.isfinite(step_loss)):  # every step, not only at evaluations
                    raise TrainingDiverged(f"the training loss is {float(step_loss)}")
                set_lr(engine.optimizer, lr)
                engine.step()
            except TrainingDiverged as exc:
                raise TrainingDiverged(
                    f"{exc} at step {s.step + 1} (learning rate {lr:.3g}): the trial stops; "
                    "lower training.learning_rate or keep training.max_grad_norm > 0"
                ) from None
            s.step += 1
            self.worker.ctx.stepped(self.cfg.name, s.step, s.last_step)
            if depth_at(s.step, hp, s.steps_per_epoch, s.n_blocks) != s.depth:
                self._unfreeze()
            while self.state.step < stop_at and self._switch_due():
                self._switch()

    def evaluate_and_report(self) -> None:
        """Evaluate, decide on early stopping, and report with a checkpoint."""
        report = self.evaluate()
        report_with_checkpoint(self.worker, self.cfg, self.state, report)
        self.progress.since = time.perf_counter()  # the report is not training time

    def evaluate(self) -> dict[str, Any]:
        """Evaluate, decide on early stopping (``self.stopped``); the report, logged by rank 0."""
        self._report_at_end = False
        s, cfg, ctx, data = self.state, self.cfg, self.worker.ctx, self.worker.data
        train_loss, rate = self.progress.take_interval()
        started = time.perf_counter()
        n_val = len(self.worker.splits.validation)
        screened = 0 < s.step <= s.screen_through and s.hp.screen_rows < n_val
        with out_of_memory_as_error(
            f"the evaluation at step {s.step}",
            ctx.device,
            f"{s.hp.per_device_eval_batch_size} rows",
            "lower training.per_device_eval_batch_size or model.max_length",
        ):
            scores = self.worker.task.score(
                s.engine.model,
                self.worker.screen_data(s.hp.screen_rows) if screened else data.val,
                len(data.label_names),
                s.hp.per_device_eval_batch_size,
                data.pad_id,
                ctx.device,
                s.engine.autocast,
            )
        report = {
            M.TRAIN_LOSS: train_loss,
            **scores,
            M.EVAL_SECONDS: time.perf_counter() - started,
            M.EVAL_ROWS: s.hp.screen_rows if screened else n_val,
            M.SCREENED: int(screened),
            M.EPOCH: s.step / s.steps_per_epoch,
            M.STEP: s.step,
            M.LR: lr_at(s.hp, s.step, s.last_step),  # the LR of the next step
            M.TOTAL_STEPS: s.last_step,
            M.SAMPLES_PER_SECOND: rate,
            M.EFFECTIVE_BATCH_SIZE: s.hp.per_device_train_batch_size
            * s.hp.gradient_accumulation_steps
            * ctx.world_size,
            M.TRAINABLE_PARAMS: s.n_trainable,
            M.UNFREEZE_DEPTH: s.n_blocks if s.depth is None else s.depth,
            **self.restored,
        }
        if cfg.hp_schedule:
            report[M.HP_SEGMENT] = s.segment
        if cfg.fingerprint_weights:
            report[M.WEIGHTS] = _fingerprint(s.engine.model)
        history = self.progress.gap_history
        history.append((report[M.EPOCH], report[M.EVAL_LOSS] - report[M.TRAIN_LOSS]))
        report[M.LOSS_GAP] = history[-1][1]
        report[M.LOSS_GAP_TREND] = loss_gap_trend(history)
        # a screened score is not evidence against the full ones patience compares
        self.stopped = (
            not screened
            and early_stop(self.progress, report[cfg.metric], s.hp, cfg.mode)
            and s.step < s.last_step
        )
        report[M.EARLY_STOPPED] = int(self.stopped)
        _log(
            ctx,
            cfg,
            f"step {s.step}/{s.last_step} epoch {report[M.EPOCH]:.2f} train_loss {report[M.TRAIN_LOSS]:.4f} "
            f"{self.worker.task.headline(report)} "
            + (f"(on {s.hp.screen_rows} rows) " if screened else "")
            + f"lr {report[M.LR]:.3g} {report[M.SAMPLES_PER_SECOND]:.1f} samples/s"
            + (
                f" | early stop: no {cfg.metric} gain > {s.hp.early_stopping_min_delta:g} "
                f"in {s.hp.early_stopping_patience} evaluations"
                if self.stopped
                else ""
            ),
        )
        return report


def report_with_checkpoint(
    worker: Worker, cfg: WorkerConfig, state: TrainState, report: dict[str, Any]
) -> None:
    """Write the checkpoint to a temp folder (its size joins the report), then report
    (the plain loop, ``train_loop``: every evaluation; a sweep's trials are served instead).

    Rank 0 writes it; under DeepSpeed every rank writes its shards and reports the
    folder (Ray Train gathers them into one checkpoint). Other ranks report metrics only.
    """
    ctx = worker.ctx
    if not state.hp.save_checkpoints or (ctx.rank != 0 and not state.engine.every_rank_saves):
        ctx.report(report, None)
        return
    tmp = tempfile.mkdtemp(prefix=f"tunefleet-step{state.step}-")
    try:
        report.update(save_state(tmp, worker, cfg, state, report))
        ctx.report(report, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_state(
    folder: str,
    worker: Worker,
    cfg: WorkerConfig,
    state: TrainState,
    report: dict[str, Any],
    weights_only: bool = False,
) -> dict[str, float]:
    """This rank's part of a checkpoint of ``state`` into ``folder`` (every rank calls it under
    DeepSpeed, rank 0 alone otherwise); rank 0 gets its size and time back.

    ``weights_only`` leaves the optimizer and RNG state out: enough for an export, not
    for an exact resume (DeepSpeed writes its engine's checkpoint either way).
    """
    started = time.perf_counter()
    meta = _checkpoint_meta(worker, cfg, state, report, state.step, weights_only)
    state.engine.save(folder, meta)
    return _written(folder, started) if worker.ctx.rank == 0 else {}


def save_held(folder: str, run: TrialRun, held: Any) -> dict[str, float]:
    """Write a held copy of a trial's weights (``trainers.serve.Held``) as a weights-only
    checkpoint: the base model with the trial's dropout, the copy loaded over it."""
    started = time.perf_counter()
    worker, state = run.worker, run.state
    model = worker.models.fresh(state.hp, run.cfg.seed)
    model.load_state_dict(held.state, strict=False)  # the trained tensors, over the base
    lora = adapters.enabled(state.hp.adapter)
    layout = "trained" if run.cfg.checkpoint_weights == "trained" or lora else "full"
    meta = _checkpoint_meta(worker, run.cfg, state, held.report, held.step, weights_only=True)
    write_checkpoint(folder, meta, model, None, layout)
    return _written(folder, started)


def _checkpoint_meta(
    worker: Worker,
    cfg: WorkerConfig,
    state: TrainState,
    report: dict[str, Any],
    step: int,
    weights_only: bool,
) -> CheckpointMeta:
    return CheckpointMeta(
        tokenizer=worker.tokenizer,
        step=step,
        epoch=report[M.EPOCH],
        hp=state.hp,
        metrics=report,
        trained=frozenset(state.trained),
        base_model=cfg.model,
        label_names=worker.data.label_names,
        weights_only=weights_only,
        task=cfg.task,
        precision=worker.precision,
    )


def _written(folder: str, started: float) -> dict[str, float]:
    """The size of a checkpoint just written, and the seconds it took (for its report)."""
    return {
        M.CHECKPOINT_MB: folder_bytes(folder) / 2**20,
        M.CHECKPOINT_SECONDS: time.perf_counter() - started,
    }


def _fingerprint(model: Any) -> str:
    bare = unwrap(model)
    params = dict(bare.named_parameters())
    with ds_engine.gathered(bare):  # ZeRO-3: whole parameters for the hash
        return weights_fingerprint(params, list(params))


def _log(ctx: WorkerContext, cfg: WorkerConfig, message: str) -> None:
    """Rank 0 writes the human-readable log."""
    if ctx.rank == 0:
        print(f"[{cfg.name}] {message}", flush=True)


def run_local(
    config: WorkerConfig | dict[str, Any],
    checkpoint_root: str | None = None,
    resume_from: str | None = None,
    device: str | None = None,
) -> LocalContext:
    """Run the loop in this process (no Ray) and return the context holding its reports."""
    ctx = LocalContext(checkpoint_root=checkpoint_root, resume_from=resume_from, device=device)
    train_loop(config, ctx)
    return ctx
