"""``tunefleet retrain``: sweep again on today's data, and promote the new best only if it
beats the champion on the same held-out rows.

One retrain, in order; the registry changes only in the last step, so a retrain
that fails or is interrupted anywhere before it leaves the champion and the
history exactly as they were:

1. check the spec (a promotion set is required) and load today's data: bad input
   exits 2 before the lock is taken or Ray starts;
2. take the registry lock in storage (``RegistryLocked``: exit 3);
3. sweep under a deterministic run name (``<run.name>-retrain-0007``), its first
   trials the champion's config and the previous retrain's top-k configs, then the
   defaults trial (``retrain.warm_start``);
4. reload the challenger (the sweep's exported best, from its final place in
   storage) and the champion with ``from_pretrained``, and score both, with
   today's code, on today's promotion rows (``data.promotion_fraction``: a stable
   hash of each text; never trained on or used to pick a trial);
5. decide (``tune_jobs.promotion``), switch the champion pointer in one write when
   promoting, and append the retrain to the history.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster import storage
from trainers import metrics as M
from trainers.data import Split, Splits, example_id
from tune_jobs import layout, results
from tune_jobs.defaults import fit_to_space
from tune_jobs.preflight import load_data
from tune_jobs.promotion import Decision, decide, mcnemar_p
from tune_jobs.registry import Registry
from tune_jobs.run import RunFailed, RunOutcome, run_job, unique_points
from tune_jobs.spec import JobSpec, Problem, SpecError

#: Written into the retrain's run folder: the promotion rows' ids, both scores, the decision.
RETRAIN_FILE = "retrain.json"


@dataclass(frozen=True)
class Score:
    """A model's accuracy on the promotion rows, and which rows it got right (in row order)."""

    accuracy: float
    correct: list[bool]


@dataclass(frozen=True)
class RetrainOutcome:
    """What one retrain did."""

    number: int
    run_dir: str
    decision: Decision
    entry: dict[str, Any]  # the history line


def check_retrain_spec(spec: JobSpec) -> None:
    """What a retrain needs beyond a valid spec; ``SpecError`` names each missing key."""
    problems = []
    if not spec.data.promotion_fraction and not spec.data.promotion_path:
        problems.append(
            Problem(
                "data.promotion_fraction",
                spec.data.promotion_fraction,
                "a retrain decides on rows held out for promotion; set it (e.g. 0.1) or "
                "data.promotion_path",
            )
        )
    if not spec.training.save_checkpoints:
        problems.append(
            Problem(
                "training.save_checkpoints",
                False,
                "a retrain promotes the exported best model; set it to true",
            )
        )
    if problems:
        raise SpecError(problems)


def run_name(spec: JobSpec, number: int) -> str:
    """The retrain's run folder name: deterministic, so a retried job finds its own run."""
    return f"{spec.run.name}-retrain-{number:04d}"


def next_number(history: list[dict[str, Any]]) -> int:
    """One more than the last recorded retrain (an interrupted one records nothing, so
    its retry gets the same number and, with ``run.if_exists: resume``, the same run)."""
    return 1 + max((int(e.get("retrain", 0)) for e in history), default=0)


def promotion_ids(split: Split) -> list[str]:
    """The ids of the promotion rows, sorted."""
    return sorted(example_id(t) for t in split.texts)


def warm_start_points(
    spec: JobSpec,
    champion: dict[str, Any] | None,
    previous_summary: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The champion's config, then the previous retrain's top-k trial configs, as points
    of today's search space (keys no longer searched dropped; values fitted to it)."""
    if not spec.retrain.warm_start:
        return []
    configs = [champion["config"]] if champion and champion.get("config") else []
    if previous_summary:
        metric, mode = previous_summary["metric"], previous_summary["mode"]
        finished = [
            t for t in previous_summary.get("trials", []) if t["best"].get(metric) is not None
        ]
        finished.sort(key=lambda t: M.rank(t["best"][metric], mode))
        configs += [t["config"] for t in finished[: spec.retrain.top_k]]
    space = dict(spec.search.space)
    in_domain = spec.search.algorithm != "random"
    return unique_points([fit_to_space(space, c, in_domain) for c in configs])


def predict_labels(
    model_dir: str, split: Split, max_length: int, trust_remote_code: bool = False
) -> list[str]:
    """Reload an exported folder with ``from_pretrained``; its predicted label name per row."""
    from trainers.tasks.classification import predict

    with open(os.path.join(model_dir, results.EXPORT_METRICS)) as fh:
        names = json.load(fh)["label_names"]  # the model's own class order
    model, ids, pad = results.reload_export(model_dir, split.texts, max_length, trust_remote_code)
    return [names[i] for i in predict(model, ids, 64, pad)]


def answers_right(
    model_dir: str, split: Split, splits: Splits, max_length: int, trust_remote_code: bool = False
) -> list[bool]:
    """A causal LM reloaded from its export: per row, is the most likely answer of the
    answer set the reference (log-likelihood scoring, as in the trials)?"""
    from transformers import AutoTokenizer

    from trainers.tasks import causal_lm

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = causal_lm.load_export(model_dir, trust_remote_code)
    rows = causal_lm.encode_eval(tokenizer, split, range(len(split)), max_length, splits)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    right = [False] * len(split)
    scored = causal_lm.row_scores(model, rows, 16, pad)
    for i, (correct, _, _) in zip(rows.index, scored, strict=True):
        right[i] = bool(correct)  # back in the split's order (rows come sorted by length)
    return right


def score(
    model_dir: str,
    split: Split,
    label_names: list[str],
    max_length: int,
    trust_remote_code: bool = False,
    splits: Splits | None = None,
) -> Score:
    """Accuracy on ``split`` (labels by name, so a model with another class order still
    scores); for a causal LM (``splits.format`` not text_label), answer accuracy."""
    if splits is not None and splits.format != "text_label":
        correct = answers_right(model_dir, split, splits, max_length, trust_remote_code)
        return Score(sum(correct) / len(correct), correct)
    predicted = predict_labels(model_dir, split, max_length, trust_remote_code)
    truth = [label_names[y] for y in split.labels]
    correct = [p == t for p, t in zip(predicted, truth, strict=True)]
    return Score(sum(correct) / len(correct), correct)


def fetch(export_dir: str, work: str, name: str) -> str:
    """A local copy of an exported model folder (a local one is used where it is)."""
    if not storage.is_uri(export_dir):
        return export_dir
    local = os.path.join(work, name)
    storage.download_dir(export_dir, local)
    return local


def _interrupted(outcome: RunOutcome) -> list[str]:
    """Trials that neither finished nor failed: the sweep was stopped before its end."""
    return [
        t["trial"]
        for t in outcome.summary.get("trials", [])
        if t["status"] not in ("TERMINATED", "ERROR")
    ]


def retrain(
    spec: JobSpec,
    echo: Callable[[str], None] = print,
    before_sweep: Callable[[JobSpec], Any] | None = None,
) -> RetrainOutcome:
    """One retrain (see the module docstring); ``before_sweep`` runs under the lock, before
    the sweep (the smoke pass)."""
    check_retrain_spec(spec)
    splits = load_data(spec)  # bad data: exit 2, no lock
    if spec.model.task == "causal_lm" and not splits.label_names:
        raise SpecError(
            [
                Problem(
                    "data.answer_choices",
                    None,
                    "a causal LM's retrain promotes on answer correctness (McNemar on the "
                    "promotion rows), so its responses need an answer set: set answer_choices "
                    "or data.instruction_template; free-text responses cannot be promoted yet",
                )
            ]
        )
    root = storage.normalize(spec.run.storage_path)
    registry = Registry(root)
    with registry.lock(spec.retrain.lock_ttl_s):
        history = registry.history()
        champion = registry.champion()
        number = next_number(history)
        name = run_name(spec, number)
        # every retrain's sweep in one MLflow experiment, named after the job, not the retrain
        experiment = spec.tracking.mlflow_experiment or spec.run.name
        run_spec = spec.model_copy(
            update={
                "run": spec.run.model_copy(update={"name": name}),
                "tracking": spec.tracking.model_copy(update={"mlflow_experiment": experiment}),
            }
        )
        previous = _previous_summary(history)
        warm = warm_start_points(spec, champion, previous)[: spec.search.num_samples]
        echo(
            f"retrain {number} ({name}): {len(splits.promotion)} promotion rows; champion: "
            + (f"{champion['run']} ({champion['trial']})" if champion else "none yet")
            + (f"; warm start: {len(warm)} config(s) first" if warm else "")
        )
        smoked = before_sweep(run_spec) if before_sweep is not None else None
        outcome = run_job(
            run_spec,
            echo=echo,
            warm_points=warm,
            splits=splits,
            report=False,
            trial_cost=getattr(smoked, "cost", None),  # search.budget is checked against it
        )
        stopped = _interrupted(outcome)
        if stopped:
            raise RunFailed(
                f"the sweep was stopped before its end ({', '.join(stopped)} unfinished); "
                "the registry is unchanged"
            )
        best = outcome.summary.get("best")
        if not best or not best.get("export_dir"):
            raise RunFailed(
                f"the sweep exported no model; the registry is unchanged ({outcome.run_dir})"
            )
        ids = promotion_ids(splits.promotion)
        entry, decision = _decide(spec, splits, ids, number, outcome, champion, warm, echo)
        storage.write_text(
            storage.join(outcome.run_dir, RETRAIN_FILE),
            json.dumps({**entry, "promotion_ids": ids}, indent=2),
        )
        if decision.promote:
            # The champion record carries the whole decision: should the process die
            # between this write and the history's, nothing about the promotion is lost.
            registry.promote(
                {
                    **entry["challenger"],
                    "retrain": number,
                    "promoted_at": entry["time"],
                    "reason": decision.reason,
                    "data": entry["data"],
                }
            )
        registry.record(entry)
    echo(
        f"retrain {number}: {'PROMOTED' if decision.promote else 'kept the champion'}: {decision.reason}"
    )
    if decision.promote and outcome.mlflow:
        from tune_jobs.mlflow_tracking import set_champion

        set_champion(spec, outcome.mlflow, echo)
    from tune_jobs.report import report_or_say  # with the decision and the registry in it

    report_or_say(outcome.run_dir, echo)
    return RetrainOutcome(number, outcome.run_dir, decision, entry)


def _previous_summary(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """summary.json of the last recorded retrain's run, if its folder still exists."""
    for entry in reversed(history):
        run_dir = entry.get("run_dir")
        path = storage.join(run_dir, layout.SUMMARY_FILE) if run_dir else None
        if path and storage.exists(path):
            return json.loads(storage.read_text(path))
    return None


def _decide(
    spec: JobSpec,
    splits: Splits,
    ids: list[str],
    number: int,
    outcome: RunOutcome,
    champion: dict[str, Any] | None,
    warm: list[dict[str, Any]],
    echo: Callable[[str], None],
) -> tuple[dict[str, Any], Decision]:
    """Score the challenger and the champion on today's promotion rows (``ids``) and decide."""
    best = outcome.summary["best"]
    run = os.path.basename(outcome.run_dir.rstrip("/"))
    rows, names, length = splits.promotion, splits.label_names, spec.model.max_length
    work = tempfile.mkdtemp(prefix="tunefleet-retrain-")
    try:
        # Reloaded from where it now lives: proves the export is whole before any promotion.
        trust = spec.model.trust_remote_code  # the spec's, never the stored folder's
        challenger = score(
            fetch(best["export_dir"], work, "challenger"), rows, names, length, trust, splits
        )
        held = None
        if champion is not None:
            held = score(
                fetch(champion["export_dir"], work, "champion"), rows, names, length, trust, splits
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p_value = mcnemar_p(held.correct, challenger.correct) if held is not None else None
    alpha = spec.retrain.alpha if spec.retrain.significance == "mcnemar" else None
    decision = decide(
        challenger.accuracy,
        held.accuracy if held is not None else None,
        spec.retrain.min_improvement,
        p_value,
        alpha,
    )
    echo(
        f"promotion set ({len(rows)} rows): challenger {challenger.accuracy:.4f}"
        + (f", champion {held.accuracy:.4f} (McNemar p={p_value:.3g})" if held else "")
    )
    entry = {
        "retrain": number,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run,
        "run_dir": outcome.run_dir,
        "data": {"rows": splits.source_rows, "sha256": splits.sha256},
        "promotion": {
            "rows": len(rows),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        },
        "warm_start": warm,
        "challenger": {
            "run": run,
            "run_dir": outcome.run_dir,
            "trial": best["trial"],
            "config": best["config"],
            "export_dir": best["export_dir"],
            "promotion_accuracy": challenger.accuracy,
            "validation": (best.get("metrics") or {}).get(outcome.summary["metric"]),
        },
        "champion": None
        if champion is None
        else {
            "run": champion["run"],
            "trial": champion.get("trial"),
            "export_dir": champion["export_dir"],
            "promotion_accuracy": held.accuracy,
        },
        "min_improvement": spec.retrain.min_improvement,
        "significance": spec.retrain.significance,
        "p_value": p_value,
        "decision": "promote" if decision.promote else "keep",
        "reason": decision.reason,
        "failed_trials": len(outcome.summary.get("failed_trials") or {}),
    }
    return entry, decision
