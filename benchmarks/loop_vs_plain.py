"""Samples/s of tunefleet's worker loop against a plain PyTorch loop, side by side.

Issue 11's target: training throughput inside a trial at least 0.95x a plain loop
on the same threads. Both train all-MiniLM-L6-v2 on the same Rotten Tomatoes rows,
in the same order of rows, batch 16, max length 64, fused AdamW, gradient
clipping at 1.0, a linear schedule with 10% warmup, in this one process, at both
precisions (the arithmetic is the same on both sides of each comparison):

* plain: nanoGPT's shape; the tokenizer pads each batch; ``lr`` set every step;
  fp32, or its forward under ``torch.autocast(bfloat16)``;
* tunefleet: ``trainers.loop.run_local`` with the config a trial gets
  (``tune_jobs.trial.loop_config``), ``distributed.precision`` fp32 or bf16,
  evaluating on 64 rows twice and, with ``--checkpoints``, saving a checkpoint at
  each evaluation as a trial does.

bf16 is measured where the CPU does it natively (``trainers.precision``), which is
where tunefleet's default (``auto``) picks it.

Printed for each: training samples/s over the last ``steps/2`` steps (warm-up
excluded; tunefleet's own figure for its second evaluation window, which leaves
out evaluation and checkpoint time) and, for tunefleet, samples/s over its whole
``run_local`` call (set-up, tokenization, evaluations and checkpoints included).

    .venv/bin/python benchmarks/loop_vs_plain.py [--steps 60] [--threads 2] [--checkpoints]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from trainers import metrics as M

BATCH, LENGTH, LR = 16, 64, 5e-5


def spec_for(steps: int, checkpoints: bool, precision: str = "fp32"):
    from tune_jobs.spec import parse_spec

    return parse_spec(
        {
            "model": {"max_length": LENGTH},
            "data": {"max_train_samples": BATCH * steps, "max_eval_samples": 64},
            "training": {
                "max_steps": steps,
                "per_device_train_batch_size": BATCH,
                "learning_rate": LR,
                "warmup_ratio": 0.1,
                "lr_scheduler_type": "linear",
                "eval_strategy": "steps",
                "eval_steps": steps // 2,
                "group_by_length": False,
                "save_checkpoints": checkpoints,
            },
            "scheduler": {"type": "fifo", "time_attr": "step"},
            "resources": {"trial_mode": "single_process"},
            "distributed": {"precision": precision},
            "run": {"name": "loop-vs-plain"},
        }
    )


def plain_loop(splits, model_path: str, steps: int, seed: int, precision: str = "fp32") -> float:
    """Training samples/s of the plain loop over its last steps/2 steps."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=True)
    warmup = int(0.1 * steps)

    def get_lr(step: int) -> float:
        if step < warmup:
            return LR * (step + 1) / warmup
        return LR * max(0.0, (steps - step) / max(1, steps - warmup))

    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))
    texts, labels = splits.train.texts, splits.train.labels
    start = None
    for step in range(steps):
        if step == steps // 2:
            start = time.perf_counter()
        rows = order[step * BATCH : (step + 1) * BATCH].tolist()
        batch = tokenizer(
            [texts[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=LENGTH,
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([labels[i] for i in rows])
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the loop reads the loss every step too
    return BATCH * (steps - steps // 2) / (time.perf_counter() - start)


def tunefleet_loop(spec, splits, threads: int) -> tuple[float, float]:
    """(training samples/s of the second evaluation window, samples/s of the whole call)."""
    import tempfile

    from trainers.loop import run_local
    from tune_jobs.run import trial_resources
    from tune_jobs.space import trial_hparams
    from tune_jobs.trial import loop_config

    hp = trial_hparams(spec, {})
    cfg = loop_config(spec, hp, splits, trial_resources(spec))
    cfg = cfg.replace(threads=threads)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        ctx = run_local(cfg, checkpoint_root=folder)
        whole = time.perf_counter() - start
    return ctx.reports[-1][M.SAMPLES_PER_SECOND], BATCH * spec.training.max_steps / whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoints", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternate runs; best of each")
    parser.add_argument("--out", default="benchmarks/results/loop_vs_plain.json")
    args = parser.parse_args()
    from trainers.data import load_splits
    from trainers.model import resolve_model_path

    torch.set_num_threads(args.threads)
    from trainers.precision import native_bf16

    torch.set_num_threads(args.threads)
    precisions = ["fp32"] + (["bf16"] if native_bf16("cpu") else [])
    specs = {p: spec_for(args.steps, args.checkpoints, p) for p in precisions}
    splits = load_splits(specs["fp32"].data.model_dump(), seed=0)
    path = resolve_model_path(specs["fp32"].model.name_or_path)
    # Alternated, best of --rounds each: this machine's speed drifts within minutes.
    runs: dict[str, dict[str, list[float]]] = {
        p: {"plain": [], "tunefleet": [], "whole": []} for p in precisions
    }
    for _ in range(args.rounds):
        for p in precisions:
            runs[p]["plain"].append(plain_loop(splits, path, args.steps, 0, p))
            window, whole = tunefleet_loop(specs[p], splits, args.threads)
            runs[p]["tunefleet"].append(window)
            runs[p]["whole"].append(whole)
    best = {p: {k: max(v) for k, v in r.items()} for p, r in runs.items()}
    figures = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "threads": args.threads,
        "checkpoints": args.checkpoints,
        **{
            p: {
                "plain_samples_s": round(b["plain"], 1),
                "tunefleet_samples_s": round(b["tunefleet"], 1),
                "tunefleet_whole_call_samples_s": round(b["whole"], 1),
                "ratio": round(b["tunefleet"] / b["plain"], 3),
                "rounds": runs[p],
            }
            for p, b in best.items()
        },
    }
    print(
        f"MiniLM-L6, batch {BATCH}, max length {LENGTH}, {args.threads} threads, "
        f"{args.steps} steps; training samples/s over the last {args.steps - args.steps // 2}:"
    )
    for p, b in best.items():
        print(
            f"  {p}: plain PyTorch loop {b['plain']:7.1f}   tunefleet loop {b['tunefleet']:7.1f}"
            f"  ({b['tunefleet'] / b['plain']:.2f}x plain)   whole run_local call (set-up, "
            f"evaluations{', checkpoints' if args.checkpoints else ''}): {b['whole']:.1f}"
        )
    if "bf16" in best:
        print(
            f"  tunefleet's default here (auto = bf16) vs the plain fp32 loop: "
            f"{best['bf16']['tunefleet'] / best['fp32']['plain']:.2f}x"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
