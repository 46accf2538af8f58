"""After the sweep: per-trial summaries, the best checkpoint, the exported model, summary.json."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cluster import storage
from trainers import metrics as M
from trainers.checkpoint import (
    ADAPTER_DIR,
    MANIFEST,
    MODEL_DIR,
    TRAINED_WEIGHTS,
    CorruptCheckpoint,
    materialize,
    read_manifest,
)
from trainers.data import Split, Splits
from trainers.ds_engine import DS_DIR
from trainers.model import resolve_model_path
from tune_jobs import layout
from tune_jobs.lineage import read_lineage
from tune_jobs.spec import JobSpec
from tune_jobs.trial import checkpoint_layout, checkpoint_location

EXPORT_SPEC = "job_spec.yaml"
EXPORT_METRICS = "metrics.json"


@dataclass
class TrialSummary:
    """One trial, as the leaderboard and summary.json show it."""

    trial: str
    status: str  # TERMINATED, ERROR
    config: dict[str, Any]  # the searched hyperparameters
    best: dict[str, Any]  # metrics of the report with the best value of the searched metric
    last: dict[str, Any]  # metrics of the last report
    reports: int
    stopped_early: bool  # stopped (by the scheduler) before its training budget was spent
    error: str | None = None


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = (
        M.REPORTED
        | set(M.OBJECTIVES)
        | {
            M.CHECKPOINT_MB,
            M.HP_SEGMENT,
            M.WORKER_NODES,
            M.TRAIN_RUN,
            "training_iteration",
            "time_total_s",
        }
    )
    return {k: v for k, v in metrics.items() if k in keep}


def trial_dir(result: Any) -> str:
    """The trial's folder name (``trial_<n>``) of a ``ray.tune.Result``."""
    return os.path.basename(result.path.rstrip("/"))


def summarize_trial(
    result: Any, metric: str, mode: str, rows: list[dict[str, Any]] | None = None
) -> TrialSummary:
    """Summarise one ``ray.tune.Result`` from its reports (``rows``; default: Ray's own
    dataframe, which can miss rows written before a restore)."""
    if rows is None:
        frame = result.metrics_dataframe
        rows = (
            []
            if frame is None or metric not in getattr(frame, "columns", [])
            else frame.to_dict("records")
        )
    rows = [r for r in rows if metric in r]
    best: dict[str, Any] = {}
    for row in rows:  # a trial stopped at a screened rung: its best is a sample's score
        if M.beats(row, best, metric, mode):
            best = row
    last = rows[-1] if rows else {}
    step, total = last.get(M.STEP), last.get(M.TOTAL_STEPS)
    name = trial_dir(result)
    return TrialSummary(
        trial=name,
        status="ERROR" if result.error else "TERMINATED",
        config=dict(result.config or {}),
        best=_clean(best),
        last=_clean(last),
        reports=len(rows),
        stopped_early=bool(result.error is None and step is not None and total and step < total),
        error=None if result.error is None else error_reason(result.error),
    )


def error_reason(error: BaseException) -> str:
    """The cause of a trial's failure in one line: the innermost exception of the traceback
    Ray wraps it in (its first line only names the Ray task that failed)."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~", "During handling", "The above exception")):
            return line[:500]
    return type(error).__name__


def best_trial(
    finished: list[TrialSummary], metric: str, mode: str, leader: str | None
) -> TrialSummary:
    """The trial with the best ``metric``; of trials that tie, ``leader`` (the trial whose
    checkpoint the export takes): a tie is not better, so only the first of them to end
    wrote its best, and the others' were never written. A best scored on every validation
    row before any screened one (a sample's: ``trainers.metrics.SCREENED``)."""
    return min(
        finished,
        key=lambda t: (M.screened(t.best), M.rank(t.best[metric], mode), t.trial != leader),
    )


def best_checkpoint_uri(result: Any, metric: str, mode: str) -> tuple[str, dict[str, Any]]:
    """The checkpoint of the trial's best report whose files still exist (pbt/pb2: what the
    export takes; otherwise the export takes the leader, ``tune_jobs.leader``)."""
    candidates = []
    for checkpoint, metrics in result.best_checkpoints or []:
        uri = checkpoint_location(checkpoint)
        candidates.append((metrics.get(metric), metrics.get(M.STEP, 0), uri, metrics))
    candidates.sort(key=lambda c: (M.rank(c[0], mode), c[1]))  # the best, then the earliest
    for _, _, uri, metrics in candidates:
        if storage.exists(storage.join(uri, MANIFEST)):
            return uri, metrics
    raise RuntimeError(f"trial {result.path}: no checkpoint with files left to export")


def written_checkpoints(run_dir: str, metric: str, mode: str) -> list[tuple[str, dict[str, Any]]]:
    """Every checkpoint the trials' workers left that scored ``metric``, best first by the
    metrics its manifest records: (uri, metrics). What the export falls back on."""
    found = [
        (uri, m) for uri, m in layout.written_checkpoints(run_dir) if m.get(metric) is not None
    ]
    return sorted(found, key=lambda c: M.rank(c[1][metric], mode))


def prune_train_runs(train_storage: str, statuses: Mapping[str, str], keep: set[str]) -> None:
    """Once the sweep is over and exported, a finished trial's checkpoints serve nothing:
    delete them, except those of the trials in ``keep`` (the best, the exported).
    ``statuses``: trial -> Tune status; a trial that errored keeps its own (a resumed run
    retries it from there)."""
    for trial, status in statuses.items():
        if status != "ERROR" and trial not in keep:
            storage.delete_dir(storage.join(train_storage, trial))


def reload_export(
    model_dir: str, texts: list[str], max_length: int, trust_remote_code: bool = False
) -> tuple[Any, list, int]:
    """An exported folder reloaded with ``from_pretrained``: (model, token ids of ``texts``,
    pad id). ``trust_remote_code`` comes from the spec being run, never from the folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    from trainers.data import tokenize

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, trust_remote_code=trust_remote_code
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model, tokenize(tokenizer, texts, max_length), pad


def score_model(
    model_dir: str,
    split: Split,
    label_names: list[str],
    max_length: int,
    batch_size: int = 64,
    arithmetic: str = "fp32",
    trust_remote_code: bool = False,
    splits: Splits | None = None,
    task: str = "sequence_classification",
    adapter_of: str | None = None,
) -> dict[str, float]:
    """Reload an exported folder with the task's ``from_pretrained`` and score it on ``split``
    (on this process's CPU, in ``arithmetic``: the trials' precision, so the scores compare).
    ``adapter_of``: score the adapter folder ``model_dir`` on this base model instead."""
    from transformers import AutoTokenizer
    from transformers import logging as hf_logging

    from trainers import precision
    from trainers.tasks import get_task
    from trainers.tasks.classification import this_process_only

    hf_logging.disable_progress_bar()
    tasks = get_task(task)
    folder = adapter_of or model_dir
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = tasks.load_export(folder, trust_remote_code)
    if adapter_of:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir)
    meta = splits if splits is not None else Splits(split, split, split, label_names)
    rows = tasks.encode_eval(tokenizer, split, range(len(split)), max_length, meta)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with this_process_only():  # every row here: on a warm group's rank 0, no all-reduce
        return tasks.score(
            model,
            rows,
            len(label_names),
            batch_size,
            pad,
            "cpu",
            lambda: precision.autocast(arithmetic, "cpu"),  # type: ignore[arg-type]
        )


def generated_answers(
    model_dir: str, split: Split, splits: Splits, rows: int, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Greedy generation on the exported causal LM for the first ``rows`` rows of ``split``:
    the share whose answer is exactly the reference, and the answers seen."""
    from transformers import AutoTokenizer

    from trainers.tasks import causal_lm

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = causal_lm.load_export(model_dir, trust_remote_code)
    prompts, refs = split.texts[:rows], split.labels[:rows]
    answers = causal_lm.generate_answers(model, tokenizer, prompts, splits.format, splits.template)
    return {
        "rows": len(prompts),
        "exact_match": sum(a == r for a, r in zip(answers, refs, strict=True))
        / max(1, len(prompts)),
        "answers": sorted(set(answers)),
    }


#: Rows of the test split the exported causal LM answers by greedy generation.
GENERATED_ROWS = 64


def zero_shot(
    spec: JobSpec, splits: Splits, trained_in: str | None = None
) -> dict[str, float] | None:
    """A causal LM's score before any tuning (the base model on the validation split, in the
    trials' precision ``trained_in``), to set beside the defaults trial; None for a
    classifier (its head is untrained: chance)."""
    if spec.model.task != "causal_lm":
        return None
    return score_model(
        resolve_model_path(spec.model.name_or_path),
        splits.validation,
        splits.label_names,
        spec.model.max_length,
        arithmetic=export_arithmetic(spec, trained_in),
        trust_remote_code=spec.model.trust_remote_code,
        splits=splits,
        task=spec.model.task,
    )


def export_arithmetic(spec: JobSpec, trained_in: str | None) -> str:
    """The precision the export is scored in: what the trial trained and evaluated in on its
    own device (``trained_in``, from its checkpoint's manifest: a GPU trial's bf16 is
    scored in bf16 on a driver CPU without it, slowly but comparably); fp32 for DeepSpeed
    (its export is merged to fp32 weights). A checkpoint that does not say (written by
    an older version): ``distributed.precision`` as this CPU resolves it."""
    from trainers import precision

    if spec.distributed.strategy == "deepspeed":
        return "fp32"
    return trained_in or precision.resolve(spec.distributed.precision, "cpu")


def export_best(
    uri: str, dest: str, spec: JobSpec, metrics: dict[str, Any], splits: Splits
) -> dict[str, Any]:
    """Write the best checkpoint as a model folder at ``dest`` with the spec and metrics, and verify it.

    The export is re-scored after a fresh ``from_pretrained``: on the validation
    split (must reproduce the reported accuracy) and, once, on the test split.
    """
    work = tempfile.mkdtemp(prefix="tunefleet-export-")
    try:
        local = os.path.join(work, layout.EXPORT_DIR)
        checkpoint = os.path.join(work, "checkpoint")
        storage.download_file(storage.join(uri, MANIFEST), os.path.join(checkpoint, MANIFEST))
        manifest = read_manifest(checkpoint)
        weights = manifest.get("weights", "full")
        if weights == "full":
            storage.download_dir(storage.join(uri, MODEL_DIR), os.path.join(checkpoint, MODEL_DIR))
        elif weights == "deepspeed":  # every rank's ZeRO shards, merged by materialize
            storage.download_dir(storage.join(uri, DS_DIR), os.path.join(checkpoint, DS_DIR))
        else:  # the delta from the base model: rebuilt into a full folder
            storage.download_file(
                storage.join(uri, TRAINED_WEIGHTS), os.path.join(checkpoint, TRAINED_WEIGHTS)
            )
        try:
            materialize(checkpoint, local, spec.model.trust_remote_code)
        except CorruptCheckpoint as exc:  # name the stored checkpoint, not the download
            raise CorruptCheckpoint(str(exc).replace(checkpoint, uri)) from None
        with open(os.path.join(local, EXPORT_SPEC), "w") as fh:
            fh.write(spec.to_yaml())
        arithmetic = export_arithmetic(spec, manifest.get("precision"))
        trust = spec.model.trust_remote_code

        def score(split: Split, adapter_of: str | None = None) -> dict[str, float]:
            folder = os.path.join(local, ADAPTER_DIR) if adapter_of else local
            return score_model(
                folder,
                split,
                splits.label_names,
                spec.model.max_length,
                arithmetic=arithmetic,
                trust_remote_code=trust,
                splits=splits,
                task=spec.model.task,
                adapter_of=adapter_of,
            )

        validation, test = (
            score(split) if len(split) else {} for split in (splits.validation, splits.test)
        )
        record = {
            "checkpoint": uri,
            "trial": layout.trial_of(uri),  # whose checkpoint: not always the best trial's
            "reported": _clean(metrics),
            "reloaded_validation": validation,
            "test": test,
            "scored_in": arithmetic,
            "label_names": splits.label_names,
            "task": spec.model.task,
        }
        if os.path.isdir(os.path.join(local, ADAPTER_DIR)):  # LoRA: the adapter on its base
            base = resolve_model_path(spec.model.name_or_path)
            record["adapter_validation"] = score(splits.validation, adapter_of=base)
        if spec.model.task == "causal_lm" and splits.label_names and len(splits.test):
            record["generated_test"] = generated_answers(
                local, splits.test, splits, GENERATED_ROWS, trust
            )
        with open(os.path.join(local, EXPORT_METRICS), "w") as fh:
            json.dump(record, fh, indent=2)
        # the reloaded, re-scored folder replaces the old export in one step (metrics.json,
        # the mark of a complete export, written last where there is no rename)
        storage.replace_dir(local, dest, last=EXPORT_METRICS)
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def find_defaults_trial(
    trials: list[TrialSummary], points: list[dict[str, Any]]
) -> TrialSummary | None:
    """The trial that ran the family defaults (the first whose config matches the point)."""
    if not points:
        return None
    point = points[0]
    for trial in trials:
        if all(_same(trial.config.get(k), v) for k, v in point.items()):
            return trial
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def build_summary(
    spec: JobSpec,
    run_name: str,
    run_dir: str,
    trials: list[TrialSummary],
    best: TrialSummary | None,
    export: dict[str, Any] | None,
    splits: Splits,
    wall_time_s: float,
    defaults: TrialSummary | None = None,
    reports: Mapping[str, list[dict[str, Any]]] | None = None,
    zero_shot: dict[str, float] | None = None,
    budget: dict[str, Any] | None = None,
    similarity: dict[str, Any] | None = None,
    reevaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of summary.json (``budget``: what ``search.budget`` bought;
    ``similarity``: the task-similarity probe's figures and choices; ``reevaluation``:
    the top configs retrained on new seeds, ``tune_jobs.reevaluate``)."""
    metric, mode = spec.search.metric, spec.search.resolved_mode
    versus = None
    if defaults is not None and best is not None and defaults.best.get(metric) is not None:
        versus = {
            "metric": metric,
            "best": best.best[metric],
            "defaults": defaults.best[metric],
            "improvement": M.gain(best.best[metric], defaults.best[metric], mode),
            "defaults_stopped_early": defaults.stopped_early,
            # the defaults' best on a rung's sample of the validation rows (else None)
            "defaults_rows": defaults.best.get(M.EVAL_ROWS) if M.screened(defaults.best) else None,
        }
    return {
        "run": run_name,
        "run_dir": run_dir,
        "metric": metric,
        "mode": mode,
        "data": {
            "rows": splits.source_rows,
            "train": len(splits.train),
            "validation": len(splits.validation),
            "test": len(splits.test),
            "label_names": splits.label_names,
            "dropped_too_long": {k: v for k, v in splits.dropped.items() if v},
        },
        "task": spec.model.task,
        "majority_baseline": {
            "validation_accuracy": splits.majority_baseline("validation"),
            "test_accuracy": splits.majority_baseline("test") if len(splits.test) else None,
        },
        "best": None
        if best is None
        else {
            "trial": best.trial,
            "config": best.config,
            "metrics": best.best,
            "export_dir": storage.join(run_dir, layout.EXPORT_DIR) if export else None,
            "checkpoint": export["checkpoint"] if export else None,
            # the trial whose checkpoint was exported, and what it reported: the scores
            # below are that model's (another trial's when the best one's was never written)
            "exported_trial": export.get("trial") if export else None,
            "exported_metrics": export.get("reported") if export else None,
            # search.reevaluate: chosen by its mean over new seeds; the export, its best seed
            "chosen_by": "reevaluation" if (reevaluation or {}).get("chosen") else "sweep",
            "exported_seed": ((reevaluation or {}).get("export") or {}).get("seed", spec.run.seed)
            if export
            else None,
            "reloaded_validation": export["reloaded_validation"] if export else None,
            "test": export["test"] if export else None,
            **{
                k: export[k]
                for k in ("adapter_validation", "generated_test")
                if k in (export or {})
            },
        },
        "zero_shot": zero_shot,
        "exploits": read_lineage(run_dir, reports or {}),
        "checkpoints": {
            "weights": checkpoint_layout(spec),
            # the size of one checkpoint (MiB): what an exploit or a restore moves
            "mb": _median([t.last.get(M.CHECKPOINT_MB) for t in trials]),
        },
        "defaults_trial": None
        if defaults is None
        else {"trial": defaults.trial, "config": defaults.config},
        "best_vs_defaults": versus,
        "trials": [asdict(t) for t in trials],
        # Ray node ids every trial's workers ran on (a multi-node sweep spreads across them)
        "nodes": sorted(
            {
                node
                for rows in (reports or {}).values()
                for row in rows
                for node in str(row.get(M.WORKER_NODES) or "").split(",")
                if node
            }
        ),
        "failed_trials": {t.trial: t.error for t in trials if t.status == "ERROR"},
        "budget": budget,
        "similarity": similarity,
        "reevaluation": reevaluation,
        "wall_time_s": round(wall_time_s, 1),
    }


def _median(values: list[Any]) -> float | None:
    got = sorted(v for v in values if isinstance(v, int | float))
    return round(got[len(got) // 2], 2) if got else None


def write_summary(run_dir: str, summary: dict[str, Any]) -> str:
    """Write summary.json into the run folder; returns its path."""
    path = storage.join(run_dir, layout.SUMMARY_FILE)
    storage.write_text(path, json.dumps(summary, indent=2, default=str))
    return path
