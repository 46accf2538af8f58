"""Best accuracy against compute spent: search methods side by side on the shipped task.

The shape of the well-known BERT-on-RTE comparison (grid vs Bayesian optimisation with
early stopping vs PBT), on MiniLM and Rotten Tomatoes, one method after another in one
invocation (this machine's speed drifts from day to day: only figures of one run compare):

- the data: one fixed split cut once (seed 0) and written as CSV: train rows, 1,000
  validation rows, **4,000 test rows**, so one standard error of a test accuracy near
  0.78 is about 0.65 points (printed);
- every method has the same trial budget (``Plan.trials``) and the same space, 1 CPU a
  trial, 2 at a time on a local Ray of 2 CPUs, bf16 autocast (``precision: auto``);
- methods: ``grid`` (learning rate x batch size, every trial to the end), ``random``
  (FIFO), ``asha`` (random + ASHA), ``tpe_asha`` (Optuna TPE + ASHA), ``pbt`` (a
  population mutating the learning rate, the schedule and the unfreeze depth),
  ``recipe`` (tunefleet's recommended recipe as it stands: the family defaults first, a
  probe of the task's similarity, a Sobol sequence over the space but the epochs, which
  ASHA decides, rungs sized from the data, decided on the loss, on a sample of the
  validation rows but the last), and ``peer``
  (``transformers.Trainer.hyperparameter_search(backend="ray")``, ASHA, ``bf16=True``,
  through ``benchmarks/peer_sweep.py``'s peer job);
- for each: the best validation accuracy any trial reported, the chosen model's
  validation and test accuracy (every chosen model scored by one function, on the same
  rows), trial-seconds, wall time, and the cost of training the chosen config once from
  scratch (the chosen trial's own seconds where it trained from scratch to the end,
  else the config run alone): tuning cost as a multiple of one training.

    .venv/bin/python benchmarks/tuning_efficiency.py [--quick] [--only M,M] [--keep] [--out FILE]
        [--seed-check N [--from FILE]]

The full run is sized for under 45 minutes on 2 cores; ``--quick`` (small data, 2
trials of 1 epoch) a few minutes. Writes ``benchmarks/results/tuning_efficiency*.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_sweep as ps  # noqa: E402 - the shared task, tool runner and scorer

REPO = ps.REPO
METHODS = ("grid", "random", "asha", "tpe_asha", "pbt", "recipe", "recipe_seeds", "peer")
#: what --quick leaves out unless asked for with --only (it must stay under 5 minutes)
QUICK_SKIPS = ("depth", "recipe_seeds", "tpe_asha")
#: recipe_seeds: the recipe, then its top configs trained again on new seeds
SEEDS_TOP_K, SEEDS = 2, 2
#: studies run besides the methods (``--only fidelity``); in every full run
STUDIES = ("fidelity", "depth")
#: the depth study: unfreeze depths x learning rates, each trained max_epochs
DEPTHS, DEPTH_LRS = (3, 6), (5e-5, 1e-4)
#: the space every non-grid method searches (the peer's, so the peer can run it)
SPACE = ps.SPACE


@dataclass(frozen=True)
class Plan:
    train_rows: int
    validation_rows: int
    test_rows: int
    trials: int  # every method's trial budget
    max_epochs: int  # the longest a trial may train
    grid_lrs: tuple[float, ...]  # the grid: these x batch sizes 16 and 32
    timeout_s: int = 3600  # per method

    def space(self) -> dict[str, Any]:
        epochs = list(range(1, self.max_epochs + 1))
        return {**SPACE, "num_train_epochs": {"choice": epochs}}

    def as_peer_plan(self) -> ps.Plan:
        """The same sweep in peer_sweep's terms (its spec builder and its peer job)."""
        return ps.Plan(
            self.train_rows,
            self.validation_rows,
            self.test_rows,
            self.trials,
            self.space(),
            grace_period=1.0 if self.max_epochs > 1 else 0.5,
            timeout_s=self.timeout_s,
        )


FULL = Plan(800, 1000, 4000, trials=8, max_epochs=3, grid_lrs=(1.5e-5, 3e-5, 6e-5, 1e-4))
QUICK = Plan(200, 100, 400, trials=2, max_epochs=1, grid_lrs=(3e-5,), timeout_s=900)


def write_splits(folder: str, plan: Plan) -> dict[str, str]:
    """One fixed split of the corpus (seed 0), big enough for ``plan.test_rows`` test rows,
    written as the three CSV files every method reads."""
    import pandas as pd

    from trainers.data import load_splits
    from tune_jobs.spec import parse_spec

    data = parse_spec(
        {
            "data": {
                "source": "rotten_tomatoes",
                "validation_fraction": 0.1,
                "test_fraction": 0.35,  # about 4,460 rows before the cap
                "max_train_samples": plan.train_rows,
                "max_eval_samples": plan.validation_rows,
                "max_test_samples": plan.test_rows,
            }
        }
    ).data.model_dump()
    splits = load_splits(data, ps.SEED)
    assert len(splits.test) == plan.test_rows, len(splits.test)
    files = {}
    for name in ("train", "validation", "test"):
        split = getattr(splits, name)
        files[name] = os.path.join(folder, f"{name}.csv")
        pd.DataFrame({"text": split.texts, "label": split.labels}).to_csv(files[name], index=False)
    return files


def method_spec(method: str, files: dict[str, str], plan: Plan, storage: str) -> dict[str, Any]:
    """tunefleet's job spec for one method (the peer's sweep, re-aimed)."""
    spec = ps.tunefleet_spec(files, plan.as_peer_plan(), "single_process", storage)
    spec["run"]["name"] = method
    search, scheduler = spec["search"], spec["scheduler"]
    if method == "grid":
        lrs = list(plan.grid_lrs)
        batches = [16, 32] if plan.trials >= 2 * len(lrs) else [16]
        search.update(
            num_samples=1,
            space={
                "learning_rate": {"grid": lrs},
                "per_device_train_batch_size": {"grid": batches},
            },
        )
        spec["training"].update(num_train_epochs=plan.max_epochs, weight_decay=0.01)
        spec["training"]["warmup_ratio"] = 0.06
        spec["scheduler"] = {"type": "fifo"}
    elif method == "random":
        spec["scheduler"] = {"type": "fifo"}
    elif method == "tpe_asha":
        search["algorithm"] = "optuna"
    elif method == "pbt":
        # a population over the whole budget: every member trains max_epochs, exploits
        # each epoch, mutating the LR, the schedule and the unfreeze depth
        interval = 1.0 if plan.max_epochs > 1 else 0.5  # epochs between exploits
        spec["training"].update(
            num_train_epochs=plan.max_epochs,
            eval_strategy="steps",
            eval_steps=interval / plan.max_epochs,  # a share of the trial's steps
        )
        search.update(
            num_samples=plan.trials,
            space={"learning_rate": SPACE["learning_rate"]},
        )
        spec["scheduler"] = {
            "type": "pbt",
            "time_attr": "epoch",
            "perturbation_interval": interval,
            "quantile_fraction": 0.25,
            "synch": True,
            "mutations": {
                "learning_rate": SPACE["learning_rate"],
                "lr_scheduler_type": {"choice": ["linear", "cosine", "constant_with_warmup"]},
                "unfreeze_depth": {"choice": [2, 4, 6]},
            },
        }
    elif method in ("recipe", "recipe_seeds"):
        # tunefleet's advice: the family's defaults first, a probe of the task's similarity
        # that sets the unfreeze depth and the learning-rate range, a Sobol sequence over the
        # space (8 trials: TPE would still be drawing at random), and ASHA deciding on the
        # loss at rungs sized from the data (a quarter epoch here), evaluating there only
        search.update(algorithm="qmc", start_with_defaults=True, probe=True)
        # ... the epochs ASHA's to decide (its resource, max_t), not a searched key: a trial
        # searched to 1 epoch has annealed its rate by then and looks better at the early
        # rungs than one that will train 3 (DECISIONS 87); the rungs score a sample of the
        # validation rows but the last (scheduler.rung_rows: auto)
        search["space"] = {k: v for k, v in search["space"].items() if k != "num_train_epochs"}
        spec["training"].update(eval_strategy="rungs", num_train_epochs=plan.max_epochs)
        # ... where no trial passes a rung before two others have reported there
        scheduler.update(grace_period="auto", reduction_factor=3, rung_metric="auto", rung_peers=2)
        if method == "recipe_seeds":
            search["reevaluate"] = {"top_k": SEEDS_TOP_K, "seeds": SEEDS}
    return spec


def run_method(method: str, work: str, files: dict[str, str], plan: Plan, tokenizer: Any) -> dict:
    """One method through tunefleet's CLI: its figures and its chosen model, scored."""
    import yaml

    from tune_jobs.spec import parse_spec

    storage = os.path.join(work, method)
    spec = method_spec(method, files, plan, storage)
    parse_spec(spec)
    path = os.path.join(work, f"{method}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(spec, fh, sort_keys=False)
    cmd = [sys.executable, "-m", "tune_jobs", "run", path, "--no-smoke"]
    out = ps.run_tool(method, cmd, storage, os.path.join(work, f"{method}.log"), plan.timeout_s)
    run_dir = os.path.join(storage, method)
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    trials = _trials(run_dir, summary)
    best = summary["best"]
    config = {**_fixed(spec), **best["config"]}
    chosen = next(t for t in trials if t["trial"] == best["trial"])
    figures = _figures(trials)
    again = summary.get("reevaluation")
    if again:  # the retraining on new seeds is part of what the method spent
        figures["trial_seconds"] = round(figures["trial_seconds"] + again["trial_seconds"], 1)
        figures["reevaluation"] = {
            k: again.get(k)
            for k in ("sweep_choice", "chosen", "lead", "noise_se", "lead_exceeds_noise")
        }
        figures["reevaluation"]["configs"] = [
            {k: c[k] for k in ("trial", "config", "sweep", "seeds", "mean", "sd")}
            for c in again["configs"]
        ]
    return {
        "method": method,
        # the chosen trial trained its config from scratch to the end: that is one training
        # (not under PBT, whose chosen config is the end of a lineage)
        "chosen_trial_seconds": None
        if method == "pbt" or chosen["stopped_early"]
        else chosen["time_total_s"],
        **_kept(out),
        **figures,
        "chosen": {
            "trial": best["trial"],
            "config": config,
            "validation_accuracy_reported": best["metrics"][ps.METRIC],
            "validation_accuracy": ps.score(best["export_dir"], files["validation"], tokenizer),
            "test_accuracy": ps.score(best["export_dir"], files["test"], tokenizer),
        },
    }


def _fixed(spec: dict[str, Any]) -> dict[str, Any]:
    """The training keys a method fixed rather than searched (the grid's epochs...)."""
    keys = ("num_train_epochs", "weight_decay", "warmup_ratio", "per_device_train_batch_size")
    return {k: spec["training"][k] for k in keys if k in spec["training"]}


def _kept(out: dict[str, Any]) -> dict[str, Any]:
    """Wall time, checkpoint bytes, and CPU-seconds by process role (the tool's driver,
    its trials' processes, Ray's helpers) with how many processes each had."""
    roles = [f"{r}_{k}" for r in ("driver", "trials", "ray") for k in ("cpu_s", "processes")]
    return {k: out.get(k) for k in ("wall_s", "checkpoint_bytes_written", *roles)}


def _trials(run_dir: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each trial's seconds (Tune's ``time_total_s``: a PBT member's across its restores),
    its best validation accuracy and whether it was stopped early."""
    trials = []
    for trial in summary["trials"]:
        rows = []
        result = os.path.join(run_dir, trial["trial"], "result.json")
        if os.path.exists(result):
            with open(result) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        trials.append(
            {
                "trial": trial["trial"],
                "time_total_s": float(rows[-1].get("time_total_s", 0.0)) if rows else 0.0,
                "best_validation_accuracy": max(
                    (r[ps.METRIC] for r in rows if ps.METRIC in r), default=None
                ),
                "stopped_early": trial["stopped_early"],
            }
        )
    return trials


def _figures(trials: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "trials": len(trials),
        "stopped_early": sum(bool(t["stopped_early"]) for t in trials),
        "trial_seconds": round(sum(t["time_total_s"] for t in trials), 1),
        "best_validation_accuracy": max(
            (t["best_validation_accuracy"] for t in trials if t["best_validation_accuracy"]),
            default=None,
        ),
    }


def run_peer(work: str, files: dict[str, str], plan: Plan, tokenizer: Any) -> dict[str, Any]:
    """The peer's sweep (bf16, ASHA), through peer_sweep's own job."""
    os.makedirs(work, exist_ok=True)
    got = ps.run_peer(work, files, plan.as_peer_plan(), tokenizer, bf16=True)
    picked = next(t for t in got["trial_list"] if t["trial"] == got["chosen"]["trial"])
    return {
        "method": "peer",
        "chosen_trial_seconds": None if picked["stopped_early"] else picked["time_total_s"],
        **_kept(got),
        "trials": got["trials"],
        "stopped_early": got["stopped_early"],
        "trial_seconds": got["trial_seconds"],
        "best_validation_accuracy": got["best_validation_accuracy_any_trial"],
        "chosen": {
            k: got["chosen"][k] for k in ("trial", "config", "validation_accuracy", "test_accuracy")
        },
    }


#: rung points (epochs) the fidelity study scores, and ASHA's reduction factor there
RUNGS = (0.25, 0.5, 1.0, 1.5)
STUDY_ETA = 3


#: the fidelity study's screening sample (tune_jobs.fidelity.SCREEN_ROWS, rung_rows: auto)
STUDY_SCREEN_ROWS = 256


def run_fidelity(work: str, files: dict[str, str], plan: Plan) -> dict[str, Any]:
    """Start small, measured: ``plan.trials`` configs of the space, each trained for
    ``plan.max_epochs`` with FIFO and scored on the whole validation set every quarter
    epoch. At each cheap rung, which configs would ASHA (1/STUDY_ETA kept) have kept, by
    the rung's accuracy and by its loss, against the configs the full budget keeps (best
    validation accuracy over the whole training)? Then the same trials again (same seed,
    same configs, the same weights at every step), every evaluation but the last on a
    sample of STUDY_SCREEN_ROWS validation rows (``training.screen_rows``, what
    ``scheduler.rung_rows`` sets): does the sample's loss keep what the full rows' keeps?
    Not a method: its seconds are the study's, not a sweep's."""
    full = _fidelity_curves(work, files, plan, "fidelity", screen_rows=0)
    study = {"wall_s": full["wall_s"], **rung_agreement(full["curves"], plan.max_epochs)}
    if plan.validation_rows <= STUDY_SCREEN_ROWS:  # --quick: a sample would be every row
        return study
    sample = _fidelity_curves(work, files, plan, "fidelity-screened", STUDY_SCREEN_ROWS)
    return {
        **study,
        "screened": {
            "rows": STUDY_SCREEN_ROWS,
            "of": plan.validation_rows,
            "wall_s": sample["wall_s"],
            **screening_agreement(full["curves"], sample["curves"], plan.max_epochs),
        },
    }


def _fidelity_curves(
    work: str, files: dict[str, str], plan: Plan, name: str, screen_rows: int
) -> dict[str, Any]:
    """The study's trials (every quarter epoch; the evaluations before the end on
    ``screen_rows`` rows where given): each trial's reports, and the wall time."""
    storage = os.path.join(work, name)
    spec = method_spec("random", files, plan, storage)
    spec["run"]["name"] = name
    spec["search"]["space"] = {k: v for k, v in plan.space().items() if k != "num_train_epochs"}
    spec["training"].update(
        num_train_epochs=plan.max_epochs,
        eval_strategy="steps",
        eval_steps=1 / (4 * plan.max_epochs),  # every quarter epoch
    )
    if screen_rows:  # every evaluation before the end (the last is at max_epochs)
        spec["training"].update(screen_rows=screen_rows, screen_until=plan.max_epochs - 0.125)
    import yaml

    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(spec, fh, sort_keys=False)
    cmd = [sys.executable, "-m", "tune_jobs", "run", path, "--no-smoke"]
    out = ps.run_tool(name, cmd, storage, os.path.join(work, f"{name}.log"), plan.timeout_s)
    from tune_jobs.report_log import read_all_reports

    curves = {
        trial: [r for r in rows if ps.METRIC in r]
        for trial, rows in read_all_reports(os.path.join(storage, name)).items()
    }
    return {"wall_s": out["wall_s"], "curves": curves}


def screening_agreement(
    full: dict[str, list[dict[str, Any]]],
    sample: dict[str, list[dict[str, Any]]],
    max_epochs: float,
) -> dict[str, Any]:
    """The same trials scored on every row and on the sample: at each rung, do the configs
    the sample's loss keeps (top 1/STUDY_ETA) equal those the full rows' loss keeps there,
    and those the full budget keeps; did both runs train the same (the training loss at
    every report); what does an evaluation cost on each?"""
    trials, keep, full_top, winner = _full_budget(full)
    same_training = all(
        [r["train_loss"] for r in full[t]] == [r["train_loss"] for r in sample.get(t, [])]
        for t in trials
    )
    rows_out = []
    for rung in RUNGS:
        if rung >= max_epochs:
            continue
        at_full = {t: _at_epoch(full[t], rung) for t in trials}
        at_sample = {t: _at_epoch(sample.get(t, []), rung) for t in trials}
        if any(v is None for v in (*at_full.values(), *at_sample.values())):
            continue
        by_full = set(sorted(trials, key=lambda t: at_full[t]["eval_loss"])[:keep])
        by_sample = set(sorted(trials, key=lambda t: at_sample[t]["eval_loss"])[:keep])
        rows_out.append(
            {
                "rung_epochs": rung,
                "screened": all(r.get("screened") for r in at_sample.values()),
                "same_as_full_rows": by_sample == by_full,
                "loss_overlap": round(len(by_sample & full_top) / keep, 2),
                "loss_keeps_winner": winner in by_sample,
            }
        )

    def mean_eval_s(curves: dict[str, list[dict[str, Any]]], screened: bool) -> float | None:
        values = [
            r["eval_s"]
            for rows in curves.values()
            for r in rows
            if "eval_s" in r and bool(r.get("screened")) == screened
        ]
        return round(sum(values) / len(values), 3) if values else None

    return {
        "same_training": same_training,
        "eval_s_every_row": mean_eval_s(full, False),
        "eval_s_sample": mean_eval_s(sample, True),
        "rungs": rows_out,
    }


def run_depth(work: str, files: dict[str, str], plan: Plan, tokenizer: Any) -> dict[str, Any]:
    """What the probe's depth choice costs on this task: every depth in DEPTHS at every
    rate in DEPTH_LRS (the upper part of the space, where the good configs are), batch 16,
    ``plan.max_epochs``, FIFO; each trial's best validation accuracy and its seconds."""
    storage = os.path.join(work, "depth")
    spec = method_spec("grid", files, plan, storage)
    spec["run"]["name"] = "depth"
    spec["search"]["space"] = {
        "learning_rate": {"grid": list(DEPTH_LRS)},
        "unfreeze_depth": {"grid": list(DEPTHS)},
    }
    spec["training"]["per_device_train_batch_size"] = 16
    import yaml

    path = os.path.join(work, "depth.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(spec, fh, sort_keys=False)
    cmd = [sys.executable, "-m", "tune_jobs", "run", path, "--no-smoke"]
    out = ps.run_tool("depth", cmd, storage, os.path.join(work, "depth.log"), plan.timeout_s)
    run_dir = os.path.join(storage, "depth")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    rows = []
    for trial, timed in zip(summary["trials"], _trials(run_dir, summary), strict=True):
        rows.append(
            {
                **{k: trial["config"][k] for k in ("learning_rate", "unfreeze_depth")},
                "best_validation_accuracy": timed["best_validation_accuracy"],
                "trial_seconds": round(timed["time_total_s"], 1),
            }
        )
    return {"wall_s": out["wall_s"], "epochs": plan.max_epochs, "trials": rows}


def rung_agreement(curves: dict[str, list[dict[str, Any]]], max_epochs: float) -> dict[str, Any]:
    """For each rung in RUNGS: how often the configs kept there (top 1/STUDY_ETA by the
    rung's eval_accuracy, ties broken by eval_loss; or by eval_loss alone) are the ones
    the full budget keeps, and whether the full budget's winner survives the rung."""
    trials, keep, full_top, winner = _full_budget(curves)
    rows_out = []
    for rung in RUNGS:
        if rung >= max_epochs:
            continue
        at = {t: _at_epoch(curves[t], rung) for t in trials}
        if any(v is None for v in at.values()):
            continue
        by = {
            "accuracy": sorted(trials, key=lambda t: (-at[t][ps.METRIC], at[t]["eval_loss"])),
            "loss": sorted(trials, key=lambda t: at[t]["eval_loss"]),
        }
        row = {"rung_epochs": rung, "kept": keep, "of": len(trials)}
        for name, order in by.items():
            kept = set(order[:keep])
            row[f"{name}_overlap"] = round(len(kept & full_top) / keep, 2)
            row[f"{name}_keeps_winner"] = winner in kept
        # configs whose accuracy at the rung equals another's (the majority baseline, mostly)
        values = [round(at[t][ps.METRIC], 4) for t in trials]
        row["accuracy_ties"] = sum(values.count(v) > 1 for v in values)
        rows_out.append(row)
    return {"keep_fraction": f"1/{STUDY_ETA}", "winner": winner, "rungs": rows_out}


def _full_budget(curves: dict[str, list[dict[str, Any]]]) -> tuple[list[str], int, set[str], str]:
    """The trials, how many ASHA keeps (1/STUDY_ETA), the ones the full budget keeps (best
    validation accuracy over the whole training) and its winner."""
    final = {t: max(r[ps.METRIC] for r in rows) for t, rows in curves.items() if rows}
    trials = sorted(final)
    keep = max(1, math.ceil(len(trials) / STUDY_ETA))
    return (
        trials,
        keep,
        set(sorted(trials, key=lambda t: -final[t])[:keep]),
        max(trials, key=lambda t: final[t]),
    )


def _at_epoch(rows: list[dict[str, Any]], epoch: float) -> dict[str, Any] | None:
    """The first report at or past ``epoch`` (where ASHA would decide), or None."""
    return next((r for r in rows if float(r.get("epoch", -1)) >= epoch - 1e-9), None)


def one_training(config: dict[str, Any], work: str, files: dict[str, str], plan: Plan) -> float:
    """Trial-seconds of training ``config`` once from scratch, alone (the denominator)."""
    return train_once(config, work, files, plan)[1]


def seed_check(
    config: dict[str, Any], work: str, files: dict[str, str], plan: Plan, tokenizer: Any, n: int
) -> dict[str, Any]:
    """The chosen config trained from scratch on ``n`` new seeds (1..n; the sweeps ran seed
    0), each export scored on the validation and test rows: how good the config is, apart
    from the luck of the one training a sweep exports."""
    import statistics

    scores: dict[str, list[float]] = {"validation": [], "test": []}
    for seed in range(1, n + 1):
        run_dir = train_once(config, work, files, plan, seed)[0]
        with open(os.path.join(run_dir, "summary.json")) as fh:
            export = json.load(fh)["best"]["export_dir"]
        for split in scores:
            scores[split].append(ps.score(export, files[split], tokenizer))
    return {
        "seeds": list(range(1, n + 1)),
        **{f"{k}_accuracy": v for k, v in scores.items()},
        **{f"{k}_mean": round(statistics.mean(v), 4) for k, v in scores.items()},
        **{
            f"{k}_sd": round(statistics.stdev(v), 4) if len(v) > 1 else None
            for k, v in scores.items()
        },
    }


def train_once(
    config: dict[str, Any], work: str, files: dict[str, str], plan: Plan, seed: int = 0
) -> tuple[str, float]:
    """``config`` trained once from scratch, alone, on ``seed``: its run folder and
    trial-seconds."""
    import yaml

    storage = os.path.join(work, "once")
    shutil.rmtree(storage, ignore_errors=True)
    base_plan = ps.Plan(plan.train_rows, plan.validation_rows, plan.test_rows, 1, {}, 1.0)
    spec = ps.tunefleet_spec(files, base_plan, "single_process", storage)
    spec["run"]["name"] = "once"
    spec["run"]["seed"] = seed
    spec["search"].update(num_samples=1, space={}, start_with_defaults=False)
    spec["scheduler"] = {"type": "fifo"}
    spec["training"].update({k: v for k, v in config.items() if k in SPACE or k in _TRAINING_KEYS})
    path = os.path.join(work, "once.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(spec, fh, sort_keys=False)
    cmd = [sys.executable, "-m", "tune_jobs", "run", path, "--no-smoke"]
    ps.run_tool("once", cmd, storage, os.path.join(work, "once.log"), plan.timeout_s)
    run_dir = os.path.join(storage, "once")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    return run_dir, round(sum(t["time_total_s"] for t in _trials(run_dir, summary)), 1)


_TRAINING_KEYS = ("lr_scheduler_type", "unfreeze_depth", "num_train_epochs")


def print_table(report: dict[str, Any]) -> None:
    se = report["test_standard_error_points"]
    print(f"\ntest rows {report['plan']['test_rows']}: one standard error about {se:.2f} points")
    head = (
        f"{'method':<13}{'best val':>9}{'chosen val':>11}{'test':>7}{'trial-s':>9}{'wall s':>8}"
        f"{'x one':>7}{'driver cpu-s':>13}"
    )
    print(head)
    print("-" * len(head))
    for row in report["methods"]:
        chosen = row["chosen"]
        times = row.get("tuning_cost_x_one_training")
        print(
            f"{row['method']:<13}{row['best_validation_accuracy'] or 0:>9.4f}"
            f"{chosen['validation_accuracy']:>11.4f}{chosen['test_accuracy']:>7.4f}"
            f"{row['trial_seconds']:>9.0f}{row['wall_s']:>8.0f}"
            f"{times if times is not None else float('nan'):>7.1f}"
            f"{row.get('driver_cpu_s') or float('nan'):>13.1f}"
        )
    checked = [r for r in report["methods"] if r.get("seed_check")]
    if checked:
        n = len(checked[0]["seed_check"]["seeds"])
        print(f"\nthe chosen config trained again on {n} new seeds (mean +- sd)")
        for row in checked:
            c = row["seed_check"]
            print(
                f"{row['method']:<13}validation {c['validation_mean']:.4f} +- "
                f"{c['validation_sd'] or 0:.4f}   test {c['test_mean']:.4f} +- {c['test_sd'] or 0:.4f}"
            )


def print_fidelity(study: dict[str, Any]) -> None:
    def kept(row: dict[str, Any], by: str) -> str:
        return (
            f"{row[f'{by}overlap']:.2f} kept, winner {'in' if row[f'{by}keeps_winner'] else 'OUT'}"
        )

    def header(text: str) -> None:
        print(text)
        print("-" * len(text))

    print(
        f"\nstart small: the configs kept at each cheap rung ({study['keep_fraction']}) vs "
        f"those the full budget keeps (winner {study['winner']})"
    )
    header(f"{'rung (epochs)':<14}{'by accuracy':>22}{'by loss':>22}")
    for row in study["rungs"]:
        print(f"{row['rung_epochs']:<14}{kept(row, 'accuracy_'):>22}{kept(row, 'loss_'):>22}")
    screened = study.get("screened")
    if screened:
        print(
            f"\nthe same trials, each evaluation before the end on {screened['rows']} of "
            f"{screened['of']} validation rows (same training: {screened['same_training']}; "
            f"an evaluation {screened['eval_s_sample']} s vs {screened['eval_s_every_row']} s)"
        )
        header(f"{'rung (epochs)':<14}{'same kept as all rows':>24}{'by loss':>22}")
        for row in screened["rungs"]:
            same = "yes" if row["same_as_full_rows"] else "NO"
            print(f"{row['rung_epochs']:<14}{same:>24}{kept(row, 'loss_'):>22}")


def seed_check_only(path: str, n: int, only: str | None, keep: bool) -> None:
    """``--seed-check N --from FILE``: the seed check of the chosen configs an earlier run
    wrote (same plan, same split), added to that report and printed."""
    with open(path) as fh:
        report = json.load(fh)
    plan = QUICK if report["mode"] == "quick" else FULL
    wanted = set(only.split(",")) if only else None
    work = tempfile.mkdtemp(prefix="tuning-efficiency-seeds-")
    try:
        files = write_splits(work, plan)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ps.model_path())
        for row in report["methods"]:
            if wanted is None or row["method"] in wanted:
                row["seed_check"] = seed_check(
                    row["chosen"]["config"], work, files, plan, tokenizer, n
                )
                print(json.dumps({row["method"]: row["seed_check"]}), flush=True)
        report["seed_check_date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)
        print_table(report)
        print(f"\nwritten: {path}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, 2 trials of 1 epoch")
    parser.add_argument("--only", help=f"comma-separated methods (of {', '.join(METHODS)})")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/...)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--seed-check",
        type=int,
        default=0,
        metavar="N",
        help="train each method's chosen config again on N new seeds (validation, test)",
    )
    parser.add_argument(
        "--from",
        dest="from_file",
        help="with --seed-check: the methods' chosen configs from this earlier report "
        "(the seed check is added to it)",
    )
    args = parser.parse_args()
    if args.from_file:
        return seed_check_only(args.from_file, args.seed_check, args.only, args.keep)
    plan = QUICK if args.quick else FULL
    methods = args.only.split(",") if args.only else [*STUDIES, *METHODS]
    if args.quick and not args.only:  # under 5 minutes: the extra study and variant on ask
        methods = [m for m in methods if m not in QUICK_SKIPS]
    unknown = set(methods) - set(METHODS) - set(STUDIES)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    out = args.out or os.path.join(
        REPO, "benchmarks", "results", f"tuning_efficiency{'-quick' if args.quick else ''}.json"
    )
    report: dict[str, Any] = {
        "benchmark": "tuning_efficiency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": ps.machine(),
        "versions": ps.versions(),
        "mode": "quick" if args.quick else "full",
        "plan": asdict(plan),
        "space": plan.space(),
        "methods": [],
    }
    work = tempfile.mkdtemp(prefix="tuning-efficiency-")
    try:
        files = write_splits(work, plan)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ps.model_path())
        once: dict[str, float] = {}  # config -> trial-seconds of one training
        if "fidelity" in methods:
            report["fidelity"] = run_fidelity(work, files, plan)
            print(json.dumps(report["fidelity"]), flush=True)
        if "depth" in methods:
            report["depth"] = run_depth(work, files, plan, tokenizer)
            print(json.dumps(report["depth"]), flush=True)
        methods = [m for m in methods if m not in STUDIES]
        for method in methods:
            row = (
                run_peer(os.path.join(work, "peer"), files, plan, tokenizer)
                if method == "peer"
                else run_method(method, work, files, plan, tokenizer)
            )
            key = json.dumps(row["chosen"]["config"], sort_keys=True)
            if row.get("chosen_trial_seconds"):
                once.setdefault(key, row["chosen_trial_seconds"])
            if key not in once and not args.quick:  # a PBT lineage's end, or a trial
                # stopped early: run it alone (not in --quick: it must stay under 5 minutes)
                once[key] = one_training(row["chosen"]["config"], work, files, plan)
            row["one_training_trial_seconds"] = once.get(key)
            row["tuning_cost_x_one_training"] = (
                round(row["trial_seconds"] / once[key], 2) if key in once else None
            )
            if args.seed_check:
                row["seed_check"] = seed_check(
                    row["chosen"]["config"], work, files, plan, tokenizer, args.seed_check
                )
            report["methods"].append(row)
            print(json.dumps({k: row[k] for k in row if k != "chosen"}), flush=True)
        if report["methods"]:
            accuracy = max(r["chosen"]["test_accuracy"] for r in report["methods"])
            report["test_standard_error_points"] = round(
                100 * math.sqrt(accuracy * (1 - accuracy) / plan.test_rows), 2
            )
            print_table(report)
        if "fidelity" in report:
            print_fidelity(report["fidelity"])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"\nwritten: {out}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
