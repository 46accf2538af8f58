"""The training loop: one straight function, with its setup in ``build_*`` helpers.

``train_loop_per_worker`` is what a Ray Train ``TorchTrainer`` runs on each
worker; ``train_loop`` is the same loop for any ``WorkerContext`` (a plain
process in tests). Everything arrives in ``config`` (see ``tune_jobs.trial``
for how it is built):

    model        {"name_or_path", "max_length"}
    data         a ``trainers.data.Splits`` (or a Ray object ref to one)
    hp           the trial's hyperparameters (Hugging Face TrainingArguments names)
    eval         {"strategy": "steps" | "epoch", "steps": int}
    seed, threads, save_checkpoints
    checkpoint_weights  "full" (a loadable model) or "trained" (the delta from the base model)
    hp_schedule  optional [(from_step, hp), ...]: switch hyperparameters at those steps
    distributed  {"strategy": "ddp" | "deepspeed", "activation_checkpointing", "deepspeed": {...}}
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainers import ds_engine
from trainers import metrics as M
from trainers.checkpoint import (
    load_optimizer_state_by_name,
    load_trainer_state,
    load_weights,
    optimizer_state_by_name,
    read_manifest,
    save_checkpoint,
    trained_params,
    weights_fingerprint,
)
from trainers.data import Split, Splits, batches, length_grouped_order, shard, tokenize
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
from trainers.optim import build_optimizer, build_scheduler, lr_scale_by_name, rebuild_optimizer
from trainers.report import LocalContext, RayTrainContext, WorkerContext


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for a Ray Train worker."""
    train_loop(config, RayTrainContext(resume_from=config.get("resume_from")))


def resolve_data(data: Any) -> Splits:
    """The splits, fetched from the object store when passed by reference."""
    if isinstance(data, Splits):
        return data
    import ray

    return ray.get(data)


def steps_per_epoch(n_train: int, hp: Mapping[str, Any], world_size: int) -> int:
    """Optimizer steps in one epoch, after the data is sharded across workers."""
    per_rank = n_train // world_size
    micro_batches = math.ceil(per_rank / hp["per_device_train_batch_size"])
    return max(1, math.ceil(micro_batches / hp["gradient_accumulation_steps"]))


def total_steps(n_train: int, hp: Mapping[str, Any], world_size: int) -> int:
    """The trial's budget in optimizer steps: ``max_steps`` if set, else epochs x steps/epoch."""
    if hp.get("max_steps"):
        return int(hp["max_steps"])
    return math.ceil(hp["num_train_epochs"] * steps_per_epoch(n_train, hp, world_size))


def build_runtime(config: Mapping[str, Any]) -> None:
    """Threads and seeds for this worker."""
    from transformers import logging as hf_logging

    torch.set_num_threads(max(1, int(config["threads"])))
    torch.manual_seed(config["seed"])
    hf_logging.set_verbosity_error()  # the expected "newly initialized classifier" report
    hf_logging.disable_progress_bar()  # per-shard load/save bars drown the trial logs


def evaluate(
    model: Any,
    ids: list[list[int]],
    labels: list[int],
    n_labels: int,
    batch_size: int,
    pad_id: int,
    device: Any = "cpu",
) -> dict[str, float]:
    """Loss, accuracy and macro F1 on this rank's rows, all-reduced across ranks."""
    model.eval()
    confusion = torch.zeros((n_labels, n_labels), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for cpu_batch in batches(ids, labels, range(len(ids)), batch_size, pad_id):
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            out = model(**batch)
            loss_sum += (
                torch.nn.functional.cross_entropy(
                    out.logits.float(), batch["labels"], reduction="sum"
                )
                .double()
                .cpu()
            )
            preds = out.logits.argmax(-1)
            for t, p in zip(cpu_batch["labels"].tolist(), preds.tolist(), strict=True):
                confusion[t, p] += 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # One all-reduce of counts and loss; NCCL reduces only device tensors, gloo CPU ones.
        on = device if torch.distributed.get_backend() == "nccl" else "cpu"
        totals = torch.cat([confusion.flatten(), loss_sum.view(1)]).to(on)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
        confusion, loss_sum = totals[:-1].view(n_labels, n_labels), totals[-1]
    model.train()
    return M.classification_metrics(confusion.tolist(), float(loss_sum), float(confusion.sum()))


def predict(
    model: Any, ids: list[list[int]], batch_size: int, pad_id: int, device: Any = "cpu"
) -> list[int]:
    """The predicted class of every row, in order (one process, no all-reduce)."""
    model.eval()
    out: list[int] = []
    no_labels = [0] * len(ids)
    with torch.no_grad():
        for cpu_batch in batches(ids, no_labels, range(len(ids)), batch_size, pad_id):
            inputs = {k: v.to(device) for k, v in cpu_batch.items() if k != "labels"}
            out.extend(model(**inputs).logits.argmax(-1).tolist())
    return out


def eval_interval(steps_in_epoch: int, last_step: int, eval_cfg: Mapping[str, Any]) -> int:
    """Optimizer steps between evaluations: an epoch, ``eval.steps``, or that share of the budget."""
    if eval_cfg["strategy"] == "epoch":
        return steps_in_epoch
    every = eval_cfg["steps"]
    return max(1, math.ceil(every * last_step)) if every < 1 else int(every)


def is_eval_step(step: int, interval: int, last_step: int) -> bool:
    """Evaluate every ``interval`` steps, and always at the end."""
    return step == last_step or step % interval == 0


def uses_layers(hp: Mapping[str, Any]) -> bool:
    """Does this trial freeze blocks or scale LRs per block (so the blocks must be found)?"""
    return (
        hp.get("unfreeze_depth") is not None
        or bool(hp.get("gradual_unfreeze_every"))
        or hp.get("layerwise_lr_decay", 1.0) != 1.0
        or hp.get("train_embeddings") is not None
    )


def depth_at(step: int, hp: Mapping[str, Any], steps_in_epoch: int, n_blocks: int) -> int | None:
    """Unfrozen top blocks at ``step``: ``unfreeze_depth``, plus one per gradual interval.

    A pure function of the step, so a restored or exploited trial lands on the
    same depth. ``None`` means every block trains.
    """
    depth = hp.get("unfreeze_depth")
    every = hp.get("gradual_unfreeze_every")
    if not every:
        return depth
    every_steps = (
        every * steps_in_epoch if hp.get("gradual_unfreeze_unit", "epoch") == "epoch" else every
    )
    return min(n_blocks, (depth or 0) + int(step // max(1.0, every_steps)))


def _try_layer_map(model: Any) -> LayerMap | None:
    """The layer map for reporting only (no freezing asked for): ``None`` if the blocks are not found."""
    try:
        return layer_map(model)
    except ModelError:
        return None


def build_trainable(
    model: Any, lmap: LayerMap | None, hp: Mapping[str, Any], depth: int | None
) -> tuple[dict[str, float] | None, int]:
    """Freeze to ``depth``; return the per-parameter LR scale (layer-wise decay) and trainable count."""
    if lmap is None or not uses_layers(hp):
        return None, sum(p.numel() for p in model.parameters())
    count = apply_freezing(model, lmap, depth, hp.get("train_embeddings"))
    decay = hp.get("layerwise_lr_decay", 1.0)
    if decay == 1.0:
        return None, count
    names = [n for n, _ in model.named_parameters()]
    return lr_scale_by_name(names, lmap.blocks, lmap.embeddings, decay), count


def loss_gap_trend(history: list[tuple[float, float]]) -> float:
    """Least-squares slope of (eval_loss - train_loss) per epoch over the last 3 evaluations."""
    pts = history[-3:]
    if len(pts) < 2:
        return 0.0
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0


@dataclass
class Segment:
    """The model and optimizer for one stretch of hyperparameters.

    A trial has one segment, unless ``hp_schedule`` switches its hyperparameters
    at given steps (a PBT replay): each switch builds a new segment from the
    current weights, optimizer state and step, exactly as a restore would.
    """

    hp: Mapping[str, Any]
    model: Any
    lmap: LayerMap | None
    n_blocks: int
    depth: int | None
    n_trainable: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    last_step: int
    eval_interval: int


def build_segment(
    model_path: str,
    label_names: list[str],
    hp: Mapping[str, Any],
    n_train: int,
    world_size: int,
    eval_cfg: Mapping[str, Any],
    step: int,
    activation_checkpointing: bool = False,
) -> Segment:
    """Model (base weights), trainable set, optimizer and LR schedule for ``hp`` at ``step``.

    The LR is a pure function of the step: a restored trial (a fault restore, or
    a PBT recipient with mutated hyperparameters) continues its *own* schedule at
    this step, with no jump back to warmup.
    """
    model = build_model(model_path, label_names, dict(hp))
    if activation_checkpointing:  # non-reentrant: works with frozen lower blocks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lmap = layer_map(model) if uses_layers(hp) else _try_layer_map(model)
    n_blocks = lmap.num_blocks if lmap else 0
    spe = steps_per_epoch(n_train, hp, world_size)
    last_step = total_steps(n_train, hp, world_size)
    depth = depth_at(step, hp, spe, n_blocks)
    lr_scale, n_trainable = build_trainable(model, lmap, hp, depth)
    optimizer = build_optimizer(model, hp, lr_scale)
    return Segment(
        hp=hp,
        model=model,
        lmap=lmap,
        n_blocks=n_blocks,
        depth=depth,
        n_trainable=n_trainable,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, hp, last_step, start_step=step),
        steps_per_epoch=spe,
        last_step=last_step,
        eval_interval=eval_interval(spe, last_step, eval_cfg),
    )


def requires_grad_names(model: Any) -> set[str]:
    return {n for n, p in unwrap(model).named_parameters() if p.requires_grad}


def hp_schedule(config: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(from_step, hp)`` switches after the trial's own ``hp`` (step 0), sorted by step."""
    out = sorted(
        ((int(s), dict(h)) for s, h in config.get("hp_schedule") or []), key=lambda x: x[0]
    )
    if any(s < 0 for s, _ in out):
        raise ValueError(f"hp_schedule: steps must be >= 0, got {[s for s, _ in out]}")
    return out


def train_loop(config: Mapping[str, Any], ctx: WorkerContext) -> None:
    """Fine-tune, evaluate and checkpoint; every evaluation is reported through ``ctx``."""
    build_runtime(config)
    eval_cfg = config["eval"]
    metric, mode = (
        config.get("objective", {}).get("metric", M.EVAL_ACCURACY),
        config.get("objective", {}).get("mode", "max"),
    )
    data = resolve_data(config["data"])
    model_path = resolve_model_path(config["model"]["name_or_path"])
    tokenizer = build_tokenizer(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_len = config["model"]["max_length"]

    # Tokenize once per trial: this rank's training shard and validation shard.
    train_rows = shard(range(len(data.train)), ctx.rank, ctx.world_size, equal=True)
    train = Split(
        [data.train.texts[i] for i in train_rows], [data.train.labels[i] for i in train_rows]
    )
    val_rows = shard(range(len(data.validation)), ctx.rank, ctx.world_size, equal=False)
    train_ids = tokenize(tokenizer, train.texts, max_len)
    val_ids = tokenize(tokenizer, [data.validation.texts[i] for i in val_rows], max_len)
    val_labels = [data.validation.labels[i] for i in val_rows]

    dist = config.get("distributed") or {}
    use_ds = dist.get("strategy") == "deepspeed"

    def segment(hp: Mapping[str, Any], at: int) -> Segment:
        return build_segment(
            model_path,
            data.label_names,
            hp,
            len(data.train),
            ctx.world_size,
            eval_cfg,
            at,
            bool(dist.get("activation_checkpointing")),
        )

    if use_ds:
        ds_engine.use_cpu_accelerator(ctx.device)
    switches = hp_schedule(config)
    if use_ds and switches:
        raise ValueError("hp_schedule (a PBT replay) needs distributed.strategy: ddp")
    fingerprint = config.get("fingerprint_weights", False)
    with ctx.restore_dir() as restore:
        manifest = read_manifest(restore) if restore else {"step": 0, "hparams": {}}
        step = int(manifest["step"])
        # A replayed schedule resumed mid-way starts with the hyperparameters in force there.
        hp, seg_index = config["hp"], 0
        while seg_index < len(switches) and switches[seg_index][0] <= step and restore:
            hp, seg_index = switches[seg_index][1], seg_index + 1
        seg = segment(hp, step)
        restored: dict[str, Any] = {M.RESTORED_FROM_STEP: -1}
        trained: set[str] = set()
        # A DeepSpeed checkpoint goes back into the engine whole when the engine's shape is the
        # same; otherwise (PBT changed the depth, say) its shards are merged into the weights.
        resume_engine = (
            use_ds
            and bool(restore)
            and manifest.get("weights") == "deepspeed"
            and manifest.get("trainable") == sorted(requires_grad_names(seg.model))
            and manifest.get("world_size") == ctx.world_size
            and manifest.get("zero_stage") == dist["deepspeed"]["zero_stage"]
        )
        if restore:
            if not resume_engine:
                load_weights(restore, seg.model)  # full, trained delta, or merged ZeRO shards
            trained = trained_params(manifest, seg.model)
            restored[M.RESTORED_FROM_STEP] = step
            kept, fresh, _ = load_trainer_state(restore, seg.optimizer)  # and the RNG state
            optimizer_note = f"optimizer state kept for {kept} tensors, {fresh} start fresh"
        if use_ds:
            settings = dist["deepspeed"]
            seg.model = ds_engine.initialize(
                seg.model,
                seg.optimizer,
                seg.scheduler,
                seg.hp,
                settings,
                ctx.world_size,
                ctx.device,
            )
            if resume_engine:
                ds_engine.load(seg.model, restore)
                optimizer_note = (
                    "DeepSpeed engine state restored (weights and ZeRO optimizer state)"
                )
            elif restore:
                optimizer_note = (
                    "module weights only (the trainable set, world size, ZeRO stage or "
                    "strategy changed): the DeepSpeed optimizer was rebuilt and starts fresh"
                )
        else:
            seg.model = ctx.prepare_model(seg.model)
        if restore:
            if fingerprint:
                restored[M.RESTORED_WEIGHTS] = _fingerprint(seg.model)
            changed = {
                k: (manifest["hparams"].get(k), hp.get(k))
                for k in hp
                if k in manifest["hparams"] and manifest["hparams"][k] != hp[k]
            }
            _log(
                ctx,
                config,
                f"restored step {step} from {restore}: {optimizer_note}"
                + (f"; hyperparameters now differ: {changed}" if changed else ""),
            )
    seg.model.train()
    trained |= requires_grad_names(seg.model)

    n_labels = len(data.label_names)
    best, evals_without_gain, gap_history = None, 0, []
    loss_total, loss_count, samples, t0 = 0.0, 0, 0, time.perf_counter()

    def evaluate_and_report() -> bool:
        """Evaluate, report (with a checkpoint) and say whether patience stops the trial."""
        nonlocal best, evals_without_gain, loss_total, loss_count, samples, t0
        hp = seg.hp
        elapsed = time.perf_counter() - t0
        report = {
            M.TRAIN_LOSS: loss_total / loss_count if loss_count else math.nan,
            **evaluate(
                seg.model,
                val_ids,
                val_labels,
                n_labels,
                hp["per_device_eval_batch_size"],
                pad_id,
                ctx.device,
            ),
            M.EPOCH: step / seg.steps_per_epoch,
            M.STEP: step,
            M.LR: seg.scheduler.get_last_lr()[-1],
            M.TOTAL_STEPS: seg.last_step,
            M.SAMPLES_PER_SECOND: samples / elapsed if elapsed > 0 else 0.0,
            M.EFFECTIVE_BATCH_SIZE: hp["per_device_train_batch_size"]
            * hp["gradient_accumulation_steps"]
            * ctx.world_size,
            M.TRAINABLE_PARAMS: seg.n_trainable,
            M.UNFREEZE_DEPTH: seg.n_blocks if seg.depth is None else seg.depth,
            **restored,
        }
        if switches:
            report[M.HP_SEGMENT] = seg_index
        if fingerprint:
            report[M.WEIGHTS] = _fingerprint(unwrap(seg.model))
        gap_history.append((report[M.EPOCH], report[M.EVAL_LOSS] - report[M.TRAIN_LOSS]))
        report[M.LOSS_GAP] = gap_history[-1][1]
        report[M.LOSS_GAP_TREND] = loss_gap_trend(gap_history)
        patience, min_delta = (
            hp.get("early_stopping_patience"),
            hp.get("early_stopping_min_delta", 0.0),
        )
        value = report[metric]
        if best is None or (value - best if mode == "max" else best - value) > min_delta:
            best, evals_without_gain = value, 0
        else:
            evals_without_gain += 1
        stop = bool(patience) and evals_without_gain >= patience and step < seg.last_step
        report[M.EARLY_STOPPED] = int(stop)
        _log(
            ctx,
            config,
            f"step {step}/{seg.last_step} epoch {report[M.EPOCH]:.2f} train_loss {report[M.TRAIN_LOSS]:.4f} "
            f"eval_loss {report[M.EVAL_LOSS]:.4f} eval_accuracy {report[M.EVAL_ACCURACY]:.4f} "
            f"lr {report[M.LR]:.3g} {report[M.SAMPLES_PER_SECOND]:.1f} samples/s"
            + (
                f" | early stop: no {metric} gain > {min_delta:g} in {patience} evaluations"
                if stop
                else ""
            ),
        )
        _report_with_checkpoint(
            ctx, config, report, seg, tokenizer, step, trained, data.label_names
        )
        loss_total, loss_count, samples, t0 = 0.0, 0, 0, time.perf_counter()
        return stop

    def switch_due() -> bool:
        return seg_index < len(switches) and switches[seg_index][0] <= step

    def switch() -> None:
        """The next hyperparameters of the schedule, from the current weights, optimizer and step."""
        nonlocal seg, seg_index, trained
        new_hp = switches[seg_index][1]
        old = unwrap(seg.model)
        weights, moments = old.state_dict(), optimizer_state_by_name(seg.optimizer)
        rng = torch.get_rng_state()  # building the new model draws a head init: keep the stream
        seg = segment(new_hp, step)
        seg.model.load_state_dict(weights)
        kept, fresh = load_optimizer_state_by_name(seg.optimizer, moments)
        torch.set_rng_state(rng)
        del old, weights, moments
        seg.model = ctx.prepare_model(seg.model)
        seg.model.train()
        seg_index += 1
        trained |= requires_grad_names(seg.model)
        changed = {k: v for k, v in new_hp.items() if v != config["hp"].get(k)}
        _log(
            ctx,
            config,
            f"step {step}: hyperparameters switch to segment {seg_index} {changed}; "
            f"optimizer state kept for {kept} tensors, {fresh} start fresh",
        )

    if step >= seg.last_step:
        # Restored at the end of its budget (e.g. a PBT exploit of a finished donor):
        # evaluate once so the trial still reports a result for these weights.
        evaluate_and_report()
    stop = False
    while not stop:
        if switch_due():
            switch()
            if step >= seg.last_step:  # switched at the end of the budget: as an exploit there
                evaluate_and_report()
            continue
        if step >= seg.last_step:
            break
        hp, spe = seg.hp, seg.steps_per_epoch
        accum, micro = hp["gradient_accumulation_steps"], hp["per_device_train_batch_size"]
        epoch_index = step // spe
        # Same permutation on every rank (seed + epoch), so the shards stay disjoint.
        generator = torch.Generator().manual_seed(config["seed"] + epoch_index)
        if hp["group_by_length"]:
            order = length_grouped_order([len(x) for x in train_ids], micro, generator)
        else:
            order = torch.randperm(len(train_ids), generator=generator).tolist()
        micro_batches = list(batches(train_ids, train.labels, order, micro, pad_id))
        start = (step % spe) * accum  # resume mid-epoch where the checkpoint left off
        model, optimizer, scheduler = seg.model, seg.optimizer, seg.scheduler
        for k in range(start, len(micro_batches), accum):
            group = micro_batches[k : k + accum]
            for i, cpu_batch in enumerate(group):
                batch = {k: v.to(ctx.device, non_blocking=True) for k, v in cpu_batch.items()}
                last = i == len(group) - 1
                if use_ds:
                    # The engine steps optimizer, clipping and schedule at the boundary we
                    # set; the loss is averaged over the group exactly as in the DDP path.
                    model.set_gradient_accumulation_boundary(last)
                    loss = model(**batch).loss.float() / len(group)
                    model.backward(loss, scale_wrt_gas=False)
                else:
                    sync = last or not hasattr(model, "no_sync")
                    with torch.enable_grad(), contextlib.nullcontext() if sync else model.no_sync():
                        loss = model(**batch).loss / len(group)
                        loss.backward()
                loss_total += float(loss.detach()) * len(group)
                loss_count += 1
                samples += len(batch["labels"]) * ctx.world_size
            if use_ds:
                model.step()
            else:
                if hp["max_grad_norm"]:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad],
                        hp["max_grad_norm"],
                        foreach=True,  # one norm kernel over all gradients, not one per tensor
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1

            new_depth = depth_at(step, hp, spe, seg.n_blocks)
            if new_depth != seg.depth:  # gradual unfreezing: one more block trains from here on
                if use_ds:
                    raise ValueError("gradual unfreezing needs distributed.strategy: ddp")
                bare = unwrap(model)
                seg.depth = new_depth
                lr_scale, seg.n_trainable = build_trainable(bare, seg.lmap, hp, new_depth)
                seg.optimizer, kept, fresh = rebuild_optimizer(optimizer, bare, hp, lr_scale)
                seg.scheduler = build_scheduler(seg.optimizer, hp, seg.last_step, start_step=step)
                seg.model = ctx.prepare_model(bare)  # DDP must learn the new trainable set
                seg.model.train()
                model, optimizer, scheduler = seg.model, seg.optimizer, seg.scheduler
                trained |= requires_grad_names(model)
                _log(
                    ctx,
                    config,
                    f"step {step}: unfreeze depth {new_depth}/{seg.n_blocks}; optimizer state kept for {kept} tensors, {fresh} new",
                )

            if is_eval_step(step, seg.eval_interval, seg.last_step):
                stop = evaluate_and_report()
            if stop or step >= seg.last_step or switch_due():
                break


def _fingerprint(model: Any) -> str:
    bare = unwrap(model)
    params = dict(bare.named_parameters())
    with ds_engine.gathered(bare):  # ZeRO-3: whole parameters for the hash
        return weights_fingerprint(params, list(params))


def _log(ctx: WorkerContext, config: Mapping[str, Any], message: str) -> None:
    """Rank 0 writes the human-readable log."""
    if ctx.rank == 0:
        print(f"[{config.get('name', 'trial')}] {message}", flush=True)


def _report_with_checkpoint(
    ctx: WorkerContext,
    config: Mapping[str, Any],
    report: dict[str, Any],
    seg: Segment,
    tokenizer: Any,
    step: int,
    trained: set[str],
    label_names: list[str],
) -> None:
    """Rank 0 writes the checkpoint to a temp folder (its size joins the report); every rank
    reports. Under DeepSpeed every rank writes its shards first, and every rank reports its
    folder (Ray Train gathers them into one checkpoint)."""
    deepspeed = ds_engine.is_engine(seg.model)
    if not config.get("save_checkpoints", True) or (ctx.rank != 0 and not deepspeed):
        ctx.report(report, None)
        return
    tmp = tempfile.mkdtemp(prefix=f"tunefleet-step{step}-")
    try:
        if deepspeed:
            ds_engine.save(seg.model, tmp)
            if ctx.rank != 0:
                ctx.report(report, tmp)
                return
        size = save_checkpoint(
            tmp,
            model=unwrap(seg.model),
            tokenizer=tokenizer,
            optimizer=seg.optimizer,
            scheduler=seg.scheduler,
            step=step,
            epoch=report[M.EPOCH],
            hparams=seg.hp,
            metrics=report,
            layout="deepspeed" if deepspeed else config.get("checkpoint_weights", "full"),
            trained=trained,
            base_model=config["model"]["name_or_path"],
            label_names=label_names,
            extra={
                "world_size": ctx.world_size,
                "zero_stage": config["distributed"]["deepspeed"]["zero_stage"],
                "trainable": sorted(requires_grad_names(seg.model)),
            }
            if deepspeed
            else None,
        )
        report[M.CHECKPOINT_MB] = size / 2**20
        ctx.report(report, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_local(
    config: Mapping[str, Any],
    checkpoint_root: str | None = None,
    resume_from: str | None = None,
    device: str | None = None,
) -> LocalContext:
    """Run the loop in this process (no Ray) and return the context holding its reports."""
    ctx = LocalContext(checkpoint_root=checkpoint_root, resume_from=resume_from, device=device)
    train_loop(config, ctx)
    return ctx
