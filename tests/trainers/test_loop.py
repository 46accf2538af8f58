"""The worker loop in a plain process: real data, a few steps; real MiniLM where the test
asserts learning or memory, a tiny random BERT with MiniLM's tokenizer and six blocks
(``tiny_bert``) where it asserts mechanics (steps, restores, layouts, SHA-256 equalities)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import MODEL, worker_config
from trainers import metrics as M
from trainers.checkpoint import read_manifest
from trainers.config import HParams, WorkerConfig
from trainers.loop import run_local, total_steps
from trainers.model import build_model, resolve_model_path
from trainers.optim import decay_groups
from tune_jobs.spec import TrainingSpec


def _config(splits, **hp):
    return worker_config(splits, **hp)


@pytest.fixture
def tiny(rt_small, tiny_bert):
    """``_config`` on the tiny BERT: ``tiny(**hp)``."""
    return lambda **hp: worker_config(rt_small, model=tiny_bert, **hp)


def test_reports_every_metric_and_follows_the_schedule(rt_small, tmp_path):
    cfg = _config(
        rt_small,
        learning_rate=1e-4,
        per_device_train_batch_size=16,
        num_train_epochs=1,
        warmup_ratio=0.2,
    )
    ctx = run_local(cfg, checkpoint_root=str(tmp_path))
    assert [r[M.STEP] for r in ctx.reports] == [5, 10]
    for report in ctx.reports:
        assert set(report) >= M.REPORTED
        assert 0.0 <= report[M.EVAL_ACCURACY] <= 1.0
        assert math.isfinite(report[M.EVAL_LOSS])
    # linear schedule, 10 steps, 2 warmup: lr after step 5 = 1e-4 * (10-5)/(10-2)
    assert ctx.reports[0][M.LR] == pytest.approx(1e-4 * 5 / 8)
    assert ctx.reports[-1][M.LR] == pytest.approx(0.0)
    assert ctx.reports[-1][M.EPOCH] == pytest.approx(1.0)
    assert ctx.reports[-1][M.EFFECTIVE_BATCH_SIZE] == 16
    assert len(ctx.checkpoints) == 2
    assert read_manifest(ctx.checkpoints[-1])["step"] == 10


def test_resume_continues_at_the_checkpointed_step(tiny, tmp_path):
    cfg = {
        **tiny(per_device_train_batch_size=16, max_steps=10),
        "fingerprint_weights": True,
    }
    first = run_local(cfg, checkpoint_root=str(tmp_path / "a"))
    resumed = run_local(cfg, checkpoint_root=str(tmp_path / "b"), resume_from=first.checkpoints[0])
    assert [r[M.STEP] for r in resumed.reports] == [10]
    # same data order, optimizer and RNG state: the resumed run ends on the very weights of
    # the uninterrupted one (SHA-256), and they moved from the checkpoint's
    assert resumed.reports[0][M.RESTORED_WEIGHTS] == first.reports[0][M.WEIGHTS]
    assert resumed.reports[-1][M.WEIGHTS] == first.reports[-1][M.WEIGHTS]
    assert first.reports[-1][M.WEIGHTS] != first.reports[0][M.WEIGHTS]


def test_total_steps_after_sharding():
    hp = HParams.from_dict(
        {
            **TrainingSpec().model_dump(),
            "per_device_train_batch_size": 16,
            "gradient_accumulation_steps": 2,
            "num_train_epochs": 3,
        }
    )
    # 1000 rows / 2 workers = 500 per rank -> 32 micro-batches -> 16 steps per epoch
    assert total_steps(1000, hp, world_size=2) == 48
    assert total_steps(1000, hp.replace(max_steps=7), world_size=2) == 7


def test_weight_decay_skips_biases_and_norms():
    model = build_model(resolve_model_path(MODEL), ["a", "b"])
    decay, no_decay = decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert all(n.endswith("weight") and "LayerNorm" not in n for n in decayed)
    assert all(n.endswith("bias") or "LayerNorm" in n for n in skipped)
    assert len(decayed) + len(skipped) == sum(1 for p in model.parameters() if p.requires_grad)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


def test_classification_metrics_from_confusion():
    # rows = truth: 8 of class 0 (6 right), 2 of class 1 (1 right)
    m = M.classification_metrics([[6, 2], [1, 1]], loss_sum=5.0, count=10)
    assert m[M.EVAL_ACCURACY] == pytest.approx(0.7)
    f1_0 = 2 * 6 / (2 * 6 + 1 + 2)
    f1_1 = 2 * 1 / (2 * 1 + 2 + 1)
    assert m[M.EVAL_F1] == pytest.approx((f1_0 + f1_1) / 2)
    assert m[M.EVAL_LOSS] == pytest.approx(0.5)
    torch.manual_seed(0)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_frozen_weights_stay_bit_identical(rt_small, tmp_path):
    import os

    from trainers.model import layer_map

    cfg = _config(rt_small, learning_rate=5e-4, max_steps=4, unfreeze_depth=2)
    cfg["hp"]["eval_steps"] = 4
    ctx = run_local(cfg, checkpoint_root=str(tmp_path))
    before = _weights(os.path.join(resolve_model_path(MODEL), "model.safetensors"))
    after = _weights(os.path.join(ctx.checkpoints[-1], "model", "model.safetensors"))
    model = build_model(resolve_model_path(MODEL), ["a", "b"])
    lmap = layer_map(model)
    assert lmap.num_blocks == 6
    before = {
        n.removeprefix("bert."): t for n, t in before.items()
    }  # the package has no "bert." prefix
    after = {n.removeprefix("bert."): t for n, t in after.items()}
    changed = {n for n in after if n in before and not torch.equal(before[n], after[n])}
    same = {n for n in after if n in before and torch.equal(before[n], after[n])}
    frozen = {
        n.removeprefix("bert.")
        for n in [*(n for b in lmap.blocks[:4] for n in b), *lmap.embeddings]
    }
    trained = {n.removeprefix("bert.") for b in lmap.blocks[4:] for n in b}
    assert frozen <= same  # bit-identical
    assert trained <= changed
    # 2 of 6 blocks + pooler + head train: a fraction of the model
    assert ctx.reports[-1][M.TRAINABLE_PARAMS] < 0.25 * sum(p.numel() for p in model.parameters())
    assert ctx.reports[-1][M.UNFREEZE_DEPTH] == 2


def test_frozen_parameters_never_reach_the_optimizer():
    from trainers.model import apply_freezing, layer_map
    from trainers.optim import build_optimizer

    model = build_model(resolve_model_path(MODEL), ["a", "b"])
    apply_freezing(model, layer_map(model), depth=1, train_embeddings=None)
    opt = build_optimizer(model, HParams.from_dict(TrainingSpec().model_dump()))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(in_opt) < len(list(model.parameters()))


def test_gradual_unfreezing_adds_a_block_per_interval(tiny, tmp_path):
    cfg = tiny(
        learning_rate=5e-4,
        max_steps=6,
        unfreeze_depth=0,
        gradual_unfreeze_every=2,
        gradual_unfreeze_unit="step",
    )
    cfg["hp"]["eval_steps"] = 1
    ctx = run_local(cfg, checkpoint_root=str(tmp_path))
    depths = [r[M.UNFREEZE_DEPTH] for r in ctx.reports]
    assert depths == [0, 1, 1, 2, 2, 3]  # reported after each step: +1 block every 2 steps
    counts = [r[M.TRAINABLE_PARAMS] for r in ctx.reports]
    assert counts[0] < counts[1] < counts[3] < counts[5]


def test_dropout_reaches_minilm(rt_small):
    from trainers.model import build_model as build

    model = build(
        resolve_model_path(MODEL),
        ["a", "b"],
        {"hidden_dropout": 0.27, "attention_dropout": 0.13, "classifier_dropout": 0.4},
    )
    probs = [round(m.p, 2) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert probs.count(0.27) == 1 + 2 * 6  # embeddings + 2 per block
    assert probs.count(0.13) == 6
    assert probs.count(0.4) == 1


def test_early_stopping_with_patience(rt_small, tmp_path):
    cfg = _config(
        rt_small,
        learning_rate=1e-4,
        max_steps=8,
        early_stopping_patience=2,
        early_stopping_min_delta=0.5,
    )
    cfg["hp"]["eval_steps"] = 1
    ctx = run_local(cfg, checkpoint_root=str(tmp_path))
    # no accuracy gain of 0.5 is possible: the first evaluation sets the best, two more without gain stop it
    assert [r[M.STEP] for r in ctx.reports] == [1, 2, 3]
    assert [r[M.EARLY_STOPPED] for r in ctx.reports] == [0, 0, 1]
    for r in ctx.reports:
        assert r[M.LOSS_GAP] == pytest.approx(r[M.EVAL_LOSS] - r[M.TRAIN_LOSS])


def test_effective_batch_size_with_accumulation(rt_small, tmp_path):
    cfg = _config(
        rt_small, per_device_train_batch_size=8, gradient_accumulation_steps=3, max_steps=2
    )
    cfg["hp"]["eval_steps"] = 2
    ctx = run_local(cfg, checkpoint_root=str(tmp_path))
    assert ctx.reports[-1][M.EFFECTIVE_BATCH_SIZE] == 24
    assert ctx.reports[-1][M.STEP] == 2


def test_restore_with_mutated_hyperparameters_uses_them(tiny, tmp_path):
    """As after a PBT exploit: the donor's weights and step, the recipient's own LR schedule and depth."""
    from trainers.optim import lr_multiplier

    donor = run_local(
        tiny(learning_rate=1e-4, max_steps=8, warmup_ratio=0.5),
        checkpoint_root=str(tmp_path / "d"),
    )
    assert [r[M.STEP] for r in donor.reports] == [5, 8]
    mutated = tiny(
        learning_rate=3e-4,
        max_steps=8,
        warmup_ratio=0.5,
        lr_scheduler_type="cosine",
        unfreeze_depth=1,
    )
    mutated["hp"]["eval_steps"] = 1
    recipient = run_local(
        mutated, checkpoint_root=str(tmp_path / "r"), resume_from=donor.checkpoints[0]
    )
    assert [r[M.STEP] for r in recipient.reports] == [6, 7, 8]  # the step count continues
    # the recipient's cosine at its own peak, at the current step: no jump back to warmup
    for r in recipient.reports:
        assert r[M.LR] == pytest.approx(3e-4 * lr_multiplier("cosine", r[M.STEP], 8, 4))
    assert recipient.reports[0][M.UNFREEZE_DEPTH] == 1
    assert recipient.reports[0][M.TRAINABLE_PARAMS] < donor.reports[0][M.TRAINABLE_PARAMS]


def test_restore_at_the_end_of_the_budget_still_reports(tiny, tmp_path):
    cfg = tiny(max_steps=5)
    first = run_local(cfg, checkpoint_root=str(tmp_path / "a"))
    again = run_local(cfg, checkpoint_root=str(tmp_path / "b"), resume_from=first.checkpoints[-1])
    assert [r[M.STEP] for r in again.reports] == [5]
    assert again.reports[0][M.EVAL_ACCURACY] == pytest.approx(first.reports[-1][M.EVAL_ACCURACY])


def _fingerprint(path, base):
    """SHA-256 of a checkpoint's full weights, rebuilt from its layout over ``base``."""
    from trainers.checkpoint import load_weights, weights_fingerprint

    manifest = read_manifest(path)
    model = build_model(base, ["fresh", "rotten"], manifest["hparams"])
    load_weights(path, model)
    params = dict(model.named_parameters())
    return weights_fingerprint(params, list(params))


def test_trained_layout_holds_only_what_moved_and_restores_exactly(tiny, tiny_bert, tmp_path):
    """Depth 1: the checkpoint holds the top block and the head; frozen blocks come from the base."""
    from trainers.checkpoint import TRAINED_WEIGHTS, materialize

    hp = dict(unfreeze_depth=1, max_steps=5, per_device_train_batch_size=16)
    full = run_local(tiny(**hp), checkpoint_root=str(tmp_path / "f"))
    cfg = {**tiny(**hp), "checkpoint_weights": "trained"}
    delta = run_local(cfg, checkpoint_root=str(tmp_path / "t"))
    path = delta.checkpoints[-1]
    manifest = read_manifest(path)
    assert manifest["weights"] == "trained"
    top = ("bert.encoder.layer.5.", "bert.pooler.", "classifier.")
    assert all(n.startswith(top) for n in manifest["trained_params"])
    assert (Path(path) / TRAINED_WEIGHTS).exists()
    # same training, same weights: the delta over the base model is the full model
    assert _fingerprint(path, tiny_bert) == _fingerprint(full.checkpoints[-1], tiny_bert)
    # the size is reported, and is a fraction of the full checkpoint's
    small, big = delta.reports[-1][M.CHECKPOINT_MB], full.reports[-1][M.CHECKPOINT_MB]
    assert small < big / 4, (small, big)  # the embeddings and five blocks stay out
    # a loadable Hugging Face folder can be rebuilt from it
    out = tmp_path / "export"
    materialize(path, str(out))
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    got = dict(reloaded.named_parameters())
    from trainers.checkpoint import weights_fingerprint

    assert weights_fingerprint(got, list(got)) == _fingerprint(path, tiny_bert)


def test_trained_layout_keeps_a_block_that_trained_before_a_lower_depth(tiny, tmp_path):
    """PBT lowered the depth 6 -> 1: the blocks that moved stay in the delta (they are not the base)."""
    first = run_local(
        {**tiny(max_steps=5), "checkpoint_weights": "trained"},
        checkpoint_root=str(tmp_path / "a"),
    )
    lowered = {
        **tiny(max_steps=10, unfreeze_depth=1),
        "checkpoint_weights": "trained",
    }
    after = run_local(
        lowered, checkpoint_root=str(tmp_path / "b"), resume_from=first.checkpoints[-1]
    )
    manifest = read_manifest(after.checkpoints[-1])
    assert any(n.startswith("bert.encoder.layer.0.") for n in manifest["trained_params"])
    assert after.reports[-1][M.TRAINABLE_PARAMS] < first.reports[-1][M.TRAINABLE_PARAMS]


def test_hp_schedule_switch_equals_an_exploit_restore(tiny, tmp_path):
    """Switching hyperparameters at step 5 in one run gives bit-identical weights to a
    checkpoint at step 5 restored with the new hyperparameters (what a PBT exploit does)."""
    from trainers.optim import lr_multiplier

    first = dict(learning_rate=1e-4, max_steps=10, warmup_ratio=0.2, per_device_train_batch_size=16)
    second = {**first, "learning_rate": 3e-4, "lr_scheduler_type": "cosine", "unfreeze_depth": 1}
    cfg = {**tiny(**first), "fingerprint_weights": True}
    cfg["hp_schedule"] = [(5, tiny(**second)["hp"])]
    replayed = run_local(cfg, checkpoint_root=str(tmp_path / "r"))
    assert [(r[M.STEP], r[M.HP_SEGMENT]) for r in replayed.reports] == [(5, 0), (10, 1)]

    donor = run_local(
        {**tiny(**first), "fingerprint_weights": True},
        checkpoint_root=str(tmp_path / "d"),
    )
    recipient = run_local(
        {**tiny(**second), "fingerprint_weights": True},
        checkpoint_root=str(tmp_path / "x"),
        resume_from=donor.checkpoints[0],
    )
    assert replayed.reports[0][M.WEIGHTS] == donor.reports[0][M.WEIGHTS]
    assert replayed.reports[-1][M.WEIGHTS] == recipient.reports[-1][M.WEIGHTS]
    assert replayed.reports[-1][M.LR] == pytest.approx(3e-4 * lr_multiplier("cosine", 10, 10, 2))
    assert replayed.reports[-1][M.UNFREEZE_DEPTH] == 1


def test_hp_schedule_switch_at_the_end_evaluates_once_more(tiny, tmp_path):
    cfg = tiny(max_steps=5)
    cfg["hp_schedule"] = [(5, tiny(max_steps=5, unfreeze_depth=2)["hp"])]
    ctx = run_local(cfg, checkpoint_root=str(tmp_path))
    assert [(r[M.STEP], r[M.HP_SEGMENT]) for r in ctx.reports] == [(5, 0), (5, 1)]
    assert ctx.reports[1][M.UNFREEZE_DEPTH] == 2
    assert ctx.reports[1][M.EVAL_ACCURACY] == ctx.reports[0][M.EVAL_ACCURACY]


def test_activation_checkpointing_recomputes_without_changing_the_math(tiny, tmp_path, monkeypatch):
    """Gradient checkpointing (non-reentrant, so it works with frozen lower blocks) trades
    compute for memory: each training block's forward runs again in the backward pass (one
    more forward per trained block per micro-batch, counted), and the losses are the same,
    step for step. Equal losses alone would hold with checkpointing off too."""
    from transformers.models.bert import modeling_bert

    calls = {"train": 0}
    # each block's attention (the block's own forward is transformers' checkpointing wrapper)
    forward = modeling_bert.BertAttention.forward

    def counted(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training (evaluation runs under no_grad)
            calls["train"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertAttention, "forward", counted)
    hp = dict(max_steps=4, per_device_train_batch_size=16, unfreeze_depth=2)
    cfg = tiny(**hp)
    cfg["hp"]["eval_steps"] = 2
    plain = run_local(cfg, checkpoint_root=str(tmp_path / "a"))
    plain_calls, calls["train"] = calls["train"], 0
    checkpointed = run_local(
        {**cfg, "distributed": {**cfg["distributed"], "activation_checkpointing": True}},
        checkpoint_root=str(tmp_path / "b"),
    )
    steps, blocks, trained = 4, 6, 2  # one micro-batch a step; the top 2 of 6 blocks train
    assert plain_calls == steps * blocks
    assert calls["train"] == steps * (blocks + trained)  # the trained blocks ran again
    for a, b in zip(plain.reports, checkpointed.reports, strict=True):
        assert b[M.TRAIN_LOSS] == pytest.approx(a[M.TRAIN_LOSS], abs=1e-6)
        assert b[M.EVAL_LOSS] == pytest.approx(a[M.EVAL_LOSS], abs=1e-6)


def test_build_state_turns_on_gradient_checkpointing(rt_small):
    from trainers.context import LocalContext
    from trainers.loop import Worker, build_state

    on, off = (
        WorkerConfig.from_dict(
            worker_config(rt_small, {"activation_checkpointing": flag}, max_steps=4)
        )
        for flag in (True, False)
    )
    worker = Worker(on, LocalContext(device="cpu"))
    state_on, _ = build_state(worker, on, on.hp, 0)
    state_off, _ = build_state(worker, off, off.hp, 0)
    assert state_on.model.is_activation_checkpointing
    assert not state_off.model.is_activation_checkpointing
    # and it recomputes: a training step runs the top block's attention twice (once more in
    # the backward pass, instead of keeping its activations), once without
    batch = worker.tokenizer(["a good film", "a dull one"], return_tensors="pt", padding=True)
    for state, forwards in ((state_on, 2), (state_off, 1)):
        calls: list[int] = []
        attention = state.model.bert.encoder.layer[-1].attention
        hook = attention.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        state.model.train()
        state.model(**batch, labels=torch.tensor([1, 0])).loss.backward()
        hook.remove()
        assert len(calls) == forwards, (state.model.is_activation_checkpointing, len(calls))


def test_a_nan_loss_stops_the_trial_at_that_step_not_at_the_evaluation(rt_small, tmp_path):
    """lr 1e5 sends the loss to NaN within a few steps: the loop raises at that step (the
    evaluation is at step 20), names it and the learning rate, and writes nothing."""
    from trainers.engine import TrainingDiverged

    cfg = _config(rt_small, max_steps=20, learning_rate=1e5, eval_steps=20)
    with pytest.raises(TrainingDiverged, match=r"is nan at step (\d+) \(learning rate") as info:
        run_local(cfg, checkpoint_root=str(tmp_path))
    step = int(str(info.value).split("at step ")[1].split()[0])
    assert 1 <= step < 20
    assert not list(tmp_path.iterdir())  # no evaluation, no checkpoint


def test_a_non_finite_gradient_is_refused_before_the_optimizer_step(rt_small):
    """The engine checks the gradient norm before stepping: the weights stay as they were."""
    from trainers.context import LocalContext
    from trainers.engine import TrainingDiverged
    from trainers.loop import Worker, build_state

    cfg = WorkerConfig.from_dict(_config(rt_small, max_steps=4))
    worker = Worker(cfg, LocalContext(device="cpu"))
    state, _ = build_state(worker, cfg, cfg.hp, 0)
    params = [p for p in state.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    params[3].grad.view(-1)[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="gradient norm is inf"):
        state.engine.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))


def _checkpoints(tiny, tmp_path):
    cfg = tiny(per_device_train_batch_size=16, max_steps=10)
    return cfg, run_local(cfg, checkpoint_root=str(tmp_path / "a")).checkpoints


def test_a_corrupt_checkpoint_is_never_loaded_and_the_trial_starts_again(tiny, tmp_path, capsys):
    """The manifest lists every file's size and SHA-256: a truncated weights file and a
    flipped byte are both refused by name; a resume from such a checkpoint says so and
    starts the trial again from step 0 instead of loading half a model."""
    from trainers.checkpoint import CorruptCheckpoint, verify

    cfg, (at5, at10) = _checkpoints(tiny, tmp_path)
    weights = Path(at5) / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CorruptCheckpoint, match=r"model/model.safetensors has \d+ bytes.*truncated"
    ):
        verify(at5)
    state = Path(at10) / "trainer_state.pt"
    flipped = bytearray(state.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    state.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpoint, match="trainer_state.pt does not match its SHA-256"):
        verify(at10)

    resumed = run_local(cfg, checkpoint_root=str(tmp_path / "b"), resume_from=at5)
    assert "not loaded; the trial starts again from step 0" in capsys.readouterr().out
    assert [r[M.STEP] for r in resumed.reports] == [5, 10]
    assert resumed.reports[0][M.RESTORED_FROM_STEP] == -1


_OOM_SCRIPT = """
import json, resource, sys
import psutil
from tests.conftest import data_cfg, worker_config
from trainers.config import WorkerConfig
from trainers.data import load_splits
from trainers.loop import Worker
from trainers.context import LocalContext

splits = load_splits(data_cfg(max_train_samples=160, max_eval_samples=80, max_test_samples=80), 0)
hp = {"per_device_train_batch_size": 160, "max_steps": 2, "eval_steps": 2}
cfg = WorkerConfig.from_dict({**worker_config(splits, **hp), "threads": 1})
run = Worker(cfg, LocalContext(device="cpu")).start(cfg, None)
# the worker's memory is capped 150 MiB above what the loaded model and data use
cap = psutil.Process().memory_info().vms + 150 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
try:
    run.train_to_next_evaluation()
    print(json.dumps({"type": None}))
except Exception as exc:
    print(json.dumps({"type": type(exc).__name__, "error": str(exc)}))
"""


def test_running_out_of_memory_stops_the_trial_naming_the_batch():
    """A real allocation failure: a worker whose memory is capped (as a container limit or a
    small GPU would) cannot run a batch of 160 rows. The loop raises ``OutOfMemory``, which
    names the step, the batch's shape and the keys to lower (the trial then fails, and is
    not retried: ``tune_jobs.faults``)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-c", _OOM_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["type"] == "OutOfMemory", (outcome, proc.stderr[-2000:])
    message = outcome["error"]
    assert "training step 1" in message and "160x" in message
    assert "training.per_device_train_batch_size" in message
    assert "can't allocate memory" in message  # the allocator's own words, kept


def test_a_trials_own_seed_on_a_warm_worker_trains_as_a_fresh_worker_on_that_seed(tiny, tmp_path):
    """A reevaluation's trial carries its own seed (``tune_jobs.reevaluate``). On a worker
    that was built, and already ran a trial, on the run's seed, it must draw its head and
    data order from its own seed exactly as a fresh worker on that seed does; a third
    seed trains to other weights."""
    from trainers.context import LocalContext
    from trainers.loop import Worker

    base = {**tiny(per_device_train_batch_size=16, max_steps=6), "fingerprint_weights": True}

    def trained(worker: Worker, seed: int) -> list[str]:
        cfg = WorkerConfig.from_dict({**base, "seed": seed})
        run = worker.start(cfg, None)
        while not run.done:
            run.train_to_next_evaluation()
            run.evaluate_and_report()
        return [r[M.WEIGHTS] for r in worker.ctx.reports[-2:]]

    warm = Worker(WorkerConfig.from_dict(base), LocalContext(checkpoint_root=str(tmp_path / "w")))
    trained(warm, 0)  # the run's own seed first, as a sweep's trial leaves the worker
    on_seven = trained(warm, 7)
    cold = Worker(
        WorkerConfig.from_dict({**base, "seed": 7}),
        LocalContext(checkpoint_root=str(tmp_path / "c")),
    )
    assert on_seven == trained(cold, 7)
    assert trained(cold, 8) != on_seven
