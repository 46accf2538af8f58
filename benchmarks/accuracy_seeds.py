"""One configuration trained by tunefleet's loop and by transformers' Trainer, over several seeds.

The peer sweep (``benchmarks/peer_sweep.py``) compares one draw of each tool's RNG:
both choose the same configuration, and the chosen models' accuracies differ by a
few tenths of a point. Whether that gap is systematic (tunefleet's loop, or its bf16
default, learning less) or noise is a question of seeds. This trains the sweep's
chosen configuration on the sweep's rows (the same CSV files, 2,000 train / 1,000
validation) with seeds 0..N-1 in:

* tunefleet's worker loop (``trainers.loop.run_local``, the config a trial gets),
  at each precision in ``--precisions`` (default: ``auto``, its default, and ``fp32``);
* ``transformers.Trainer`` with the peer sweep's arguments, fp32 (its default).

The seed drives the new head's initialisation, dropout and the batch order (the
rows are the same files every time). Printed and written as JSON: the validation
accuracy after every epoch and the best, per seed, with mean and standard deviation.

    .venv/bin/python benchmarks/accuracy_seeds.py [--seeds 3] [--threads 2] [--precisions auto,fp32]

About 5 minutes a seed on 2 cores (both precisions and the peer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_sweep as ps  # noqa: E402  (its rows, arguments and helpers: one definition)

#: The configuration both tools chose in the peer sweep of 2026-11-28.
CHOSEN = {
    "learning_rate": 8.611373451405449e-05,
    "per_device_train_batch_size": 16,
    "num_train_epochs": 3,
    "weight_decay": 0.1,
    "warmup_ratio": 0.0,
}


def tunefleet_run(
    files: dict[str, str], config: dict[str, Any], seed: int, precision: str, threads: int
) -> list[float]:
    """Validation accuracy after each epoch, from tunefleet's loop."""
    from trainers import metrics as M
    from trainers.data import load_splits
    from trainers.loop import run_local
    from tune_jobs.run import trial_resources
    from tune_jobs.space import trial_hparams
    from tune_jobs.spec import parse_spec
    from tune_jobs.trial import loop_config

    with tempfile.TemporaryDirectory() as storage:
        raw = ps.tunefleet_spec(files, ps.FULL, "single_process", storage, precision)
        raw["training"]["save_checkpoints"] = False
        raw["run"]["seed"] = seed
        spec = parse_spec(raw)
        splits = load_splits(spec.data.model_dump(), seed)
        cfg = loop_config(spec, trial_hparams(spec, config), splits, trial_resources(spec))
        ctx = run_local(cfg.replace(threads=threads))
    return [r[M.EVAL_ACCURACY] for r in ctx.reports]


def peer_run(files: dict[str, str], config: dict[str, Any], seed: int, threads: int) -> list[float]:
    """Validation accuracy after each epoch, from ``transformers.Trainer`` (the peer's arguments)."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    torch.set_num_threads(threads)
    path = ps.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def dataset(csv: str) -> Any:
        texts, labels = ps.read_csv(csv)
        return Dataset.from_dict({"text": texts, "label": labels}).map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=ps.MAX_LENGTH),
            batched=True,
            remove_columns=["text"],
        )

    train, validation = dataset(files["train"]), dataset(files["validation"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            eval_strategy="epoch",
            save_strategy="no",
            logging_strategy="epoch",
            per_device_eval_batch_size=ps.EVAL_BATCH,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            train_sampling_strategy="group_by_length",
            seed=seed,
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            learning_rate=config["learning_rate"],
            per_device_train_batch_size=config["per_device_train_batch_size"],
            num_train_epochs=config["num_train_epochs"],
            weight_decay=config["weight_decay"],
            warmup_steps=ps.warmup_steps_for(config, len(train)),
        )
        trainer = Trainer(
            args=args,
            model_init=lambda: AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=2, dtype=torch.float32
            ),
            train_dataset=train,
            eval_dataset=validation,
            processing_class=tokenizer,
            compute_metrics=lambda p: {
                "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())
            },
        )
        trainer.train()
        return [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]


def summary(runs: list[list[float]]) -> dict[str, Any]:
    best = [max(r) for r in runs]
    last = [r[-1] for r in runs]
    return {
        "per_seed": runs,
        "best_mean": round(statistics.mean(best), 4),
        "best_sd": round(statistics.stdev(best), 4) if len(best) > 1 else 0.0,
        "last_mean": round(statistics.mean(last), 4),
        "last_sd": round(statistics.stdev(last), 4) if len(last) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="auto,fp32", help="tunefleet's, comma-separated")
    parser.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks/results/accuracy_seeds.json")
    )
    args = parser.parse_args()
    from transformers import logging as hf_logging

    from trainers.precision import resolve

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    precisions = args.precisions.split(",")
    tools = [f"tunefleet {p} ({resolve(p, 'cpu')})" for p in precisions] + ["peer fp32"]
    runs: dict[str, list[list[float]]] = {t: [] for t in tools}
    seconds: dict[str, float] = {t: 0.0 for t in tools}
    with tempfile.TemporaryDirectory() as work:
        files = ps.write_splits(work, ps.FULL)
        for seed in range(args.seeds):
            for tool, precision in zip(tools, [*precisions, None], strict=True):
                start = time.perf_counter()
                if precision is None:
                    accs = peer_run(files, CHOSEN, seed, args.threads)
                else:
                    accs = tunefleet_run(files, CHOSEN, seed, precision, args.threads)
                seconds[tool] += time.perf_counter() - start
                runs[tool].append(accs)
                print(f"seed {seed} {tool:<26} validation accuracy by epoch {accs}", flush=True)
    report = {
        "benchmark": "accuracy_seeds",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": ps.machine(),
        "versions": ps.versions(),
        "config": CHOSEN,
        "rows": {"train": ps.FULL.train_rows, "validation": ps.FULL.validation_rows},
        "threads": args.threads,
        "tools": {t: {**summary(runs[t]), "seconds": round(seconds[t], 1)} for t in tools},
    }
    print(f"\n{'':<28}{'best mean':>10}{'sd':>8}{'last mean':>11}{'sd':>8}{'seconds':>9}")
    for tool, s in report["tools"].items():
        print(
            f"{tool:<28}{s['best_mean']:>10.4f}{s['best_sd']:>8.4f}"
            f"{s['last_mean']:>11.4f}{s['last_sd']:>8.4f}{s['seconds']:>9.0f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
