"""GPU check of the worker loop (no Ray needed): MiniLM on Rotten Tomatoes on one CUDA device.

Runs ``trainers.loop.run_local`` full and with ``unfreeze_depth=2``; prints
samples/s, peak memory and validation accuracy, and checks that frozen weights
stay bit-identical on the device. Exits 1 if a check fails.

    python scripts/gpu_loop_check.py --model DIR --csv FILE [--train 4000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainers import metrics as M  # noqa: E402
from trainers.data import load_splits  # noqa: E402
from trainers.loop import run_local  # noqa: E402
from trainers.model import build_model, layer_map  # noqa: E402
from tune_jobs.spec import DistributedSpec, TrainingSpec  # noqa: E402

#: the spec's training defaults, at the GPU check's settings
HP = {
    **TrainingSpec().model_dump(),
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 256,
    "num_train_epochs": 1,
    "warmup_ratio": 0.1,
    "eval_strategy": "epoch",
    "eval_steps": 1,
}


def worker_config(
    name: str, model: str, max_length: int, splits, hp: dict, distributed: dict | None = None
) -> dict:
    """A worker config (``trainers.config.WorkerConfig``, plain-dict form) for ``run_local``."""
    return {
        "name": name,
        "model": model,
        "max_length": max_length,
        "data": splits,
        "hp": hp,
        "metric": "eval_accuracy",
        "mode": "max",
        "seed": 0,
        "threads": 4,
        "checkpoint_weights": "full",
        "distributed": distributed or DistributedSpec().model_dump(),
    }


def rt_csv(path: str, train: int, test: int = 1000) -> dict:
    """The data config of the Rotten Tomatoes csv that scripts/gpucheck_files.py writes."""
    return {
        "source": "csv",
        "path": path,
        "text_column": "text",
        "label_column": "label",
        "label_names": ["rotten", "fresh"],
        "validation_fraction": 0.1,
        "test_fraction": 0.1,
        "max_train_samples": train,
        "max_eval_samples": 1000,
        "max_test_samples": test,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--epochs", type=float, default=1)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}"
    )
    splits = load_splits(rt_csv(args.csv, args.train), seed=0)
    print(
        f"data: train {len(splits.train)}, validation {len(splits.validation)}, baseline {splits.majority_baseline():.4f}"
    )
    failures = []
    results = {}
    for label, extra in (("full", {}), ("depth 2", {"unfreeze_depth": 2})):
        cfg = worker_config(
            label, args.model, 64, splits, {**HP, "num_train_epochs": args.epochs, **extra}
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ctx = run_local(cfg, device=device)
        seconds = time.perf_counter() - start
        last = ctx.reports[-1]
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
        results[label] = last
        print(
            f"{label:>8}: {seconds:6.1f} s total, {last[M.SAMPLES_PER_SECOND]:8.1f} samples/s, peak {peak:7.1f} MiB, "
            f"eval_accuracy {last[M.EVAL_ACCURACY]:.4f}, trainable {last[M.TRAINABLE_PARAMS] / 1e6:.2f}M"
        )
        if last[M.EVAL_ACCURACY] <= splits.majority_baseline() + 0.05:
            failures.append(f"{label}: accuracy {last[M.EVAL_ACCURACY]:.4f} not above baseline")
        if extra:
            from safetensors.torch import load_file

            before = build_model(args.model, splits.label_names).state_dict()
            after = load_file(os.path.join(ctx.checkpoints[-1], "model", "model.safetensors"))
            lmap = layer_map(build_model(args.model, splits.label_names))
            frozen = [n for b in lmap.blocks[:4] for n in b] + lmap.embeddings
            moved = [
                n for n in frozen if not torch.equal(before[n].float(), after[n].float().cpu())
            ]
            print(f"  frozen tensors changed on {device}: {len(moved)} of {len(frozen)}")
            if moved:
                failures.append(f"frozen weights changed: {moved[:3]}")
    ratio = results["full"][M.SAMPLES_PER_SECOND] / results["depth 2"][M.SAMPLES_PER_SECOND]
    print(f"step-time ratio depth 2 / full: {ratio:.2f}")
    print("FAILED: " + "; ".join(failures) if failures else "gpu loop check: ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
