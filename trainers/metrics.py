"""Metric names shared by the worker loop, the job spec and the report.

One module owns these strings so that a scheduler can never be told to watch
a metric that nobody reports (the spec validates against ``REPORTED``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

TRAIN_LOSS = "train_loss"  # mean training loss since the previous report
EVAL_LOSS = "eval_loss"  # mean cross-entropy on the validation split
EVAL_ACCURACY = "eval_accuracy"  # fraction correct on the validation split
EVAL_F1 = "eval_f1"  # macro-averaged F1 on the validation split
EVAL_PERPLEXITY = "eval_perplexity"  # causal LM: exp(eval_loss), eval_loss per response token
#: causal LM: share of validation rows whose reference answer has the highest log-likelihood
#: among the answer set (lm-evaluation-harness's multiple-choice scoring)
EVAL_ANSWER_ACCURACY = "eval_answer_accuracy"
EPOCH = "epoch"  # fractional epochs done (optimizer steps / steps per epoch)
STEP = "step"  # optimizer steps done
LR = "lr"  # learning rate of the top parameter group at the last step
TOTAL_STEPS = "total_steps"  # the trial's planned optimizer steps
SAMPLES_PER_SECOND = "train_samples_per_second"  # across all workers, since last report
EFFECTIVE_BATCH_SIZE = "effective_batch_size"  # per device x accumulation x workers
TRAINABLE_PARAMS = "trainable_params"  # parameter elements that train at this point
UNFREEZE_DEPTH = "unfreeze_depth"  # top transformer blocks training at this point
LOSS_GAP = "loss_gap"  # eval_loss - train_loss: grows as a model overfits
LOSS_GAP_TREND = "loss_gap_trend"  # slope of loss_gap per epoch over the last 3 evaluations
EARLY_STOPPED = "early_stopped"  # 1 on the report after which patience stopped the trial
RESTORED_FROM_STEP = "restored_from_step"  # step of the checkpoint this start resumed (-1: none)
RESTORED_WEIGHTS = "restored_weights_sha256"  # fingerprint of the weights right after that restore
WEIGHTS = "weights_sha256"  # fingerprint of the weights in this report's checkpoint
CHECKPOINT_MB = "checkpoint_mb"  # size of this report's checkpoint (MiB)
WORKER_NODES = "worker_nodes"  # Ray node ids of the trial's workers, by rank (comma-separated)
HP_SEGMENT = "hp_segment"  # which stretch of a replayed hyperparameter schedule is in force
EVAL_SECONDS = "eval_s"  # wall seconds of this report's evaluation
EVAL_ROWS = "eval_rows"  # validation rows this report's evaluation scored
#: 1 on an early evaluation of a fixed sample of the validation rows (training.screen_rows):
#: it decides the scheduler's early rungs, and is never a trial's best, a checkpoint's claim
#: to the export, or early stopping's evidence
SCREENED = "screened"
CHECKPOINT_SECONDS = "checkpoint_s"  # wall seconds writing this report's checkpoint (and upload)
# added by the driver to a warm-group trial's reports (tune_jobs.warm)
TRAIN_RUN = "train_run"  # the warm group (its Train run) that served this report
TRIAL_START = "trial_start"  # start<k>: which start of the trial (a restore begins a new one)
WORKER_PID = "worker_pid"  # rank 0's process id

#: Per task (``model.task``): the metrics a scheduler or search may watch, with the
#: direction that is better.
TASK_OBJECTIVES: dict[str, dict[str, str]] = {
    "sequence_classification": {
        EVAL_ACCURACY: "max",
        EVAL_F1: "max",
        EVAL_LOSS: "min",
        TRAIN_LOSS: "min",
    },
    "causal_lm": {
        EVAL_LOSS: "min",
        EVAL_PERPLEXITY: "min",
        EVAL_ANSWER_ACCURACY: "max",
        TRAIN_LOSS: "min",
    },
}
#: Every task's objectives, with the direction that is better.
OBJECTIVES: dict[str, str] = {k: v for t in TASK_OBJECTIVES.values() for k, v in t.items()}

#: Everything every evaluation report carries (besides its task's objectives).
REPORTED: frozenset[str] = frozenset(
    {
        TRAIN_LOSS,
        EVAL_LOSS,
        EPOCH,
        STEP,
        LR,
        TOTAL_STEPS,
        SAMPLES_PER_SECOND,
        EFFECTIVE_BATCH_SIZE,
        TRAINABLE_PARAMS,
        UNFREEZE_DEPTH,
        LOSS_GAP,
        LOSS_GAP_TREND,
        EARLY_STOPPED,
        EVAL_SECONDS,
        EVAL_ROWS,
        SCREENED,
    }
)

#: What the tracking sinks (TensorBoard, MLflow) record of each report, by step: the
#: readable metrics, not the clock or the bookkeeping (pids, restore steps, fingerprints).
TRACKED: frozenset[str] = (REPORTED | frozenset(OBJECTIVES)) - {
    STEP,
    TOTAL_STEPS,
    EARLY_STOPPED,
    EVAL_ROWS,
    SCREENED,
}

#: Values a scheduler may use as its clock.
TIME_ATTRS: frozenset[str] = frozenset({STEP, EPOCH, "training_iteration"})


# --- which value is better: the one place that reads a metric's mode -----------------


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def gain(value: float, than: float, mode: str) -> float:
    """How much ``value`` improves on ``than`` when ``mode`` ("max" or "min") is better:
    positive when it is better, negative when worse."""
    return value - than if mode == "max" else than - value


def better(value: float | None, than: float | None, mode: str) -> bool:
    """Does ``value`` beat ``than`` in ``mode``? Anything beats a missing (None or NaN)
    ``than``; a missing ``value`` beats nothing. Ties do not beat."""
    if _missing(value):
        return False
    return _missing(than) or gain(value, than, mode) > 0  # type: ignore[arg-type]


def rank(value: float | None, mode: str) -> float:
    """A sort key that puts the best value first (ascending sort); missing values last."""
    if _missing(value):
        return math.inf
    return -value if mode == "max" else value  # type: ignore[operator]


def classification_metrics(
    confusion: Sequence[Sequence[float]], loss_sum: float, count: float
) -> dict[str, float]:
    """Accuracy, macro F1 and mean loss from a confusion matrix (rows = true label).

    Works on summed counts so that shards evaluated on different workers can be
    all-reduced first and scored once.
    """
    n_labels = len(confusion)
    correct = sum(confusion[i][i] for i in range(n_labels))
    f1s = []
    for c in range(n_labels):
        tp = confusion[c][c]
        fp = sum(confusion[r][c] for r in range(n_labels)) - tp
        fn = sum(confusion[c]) - tp
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return {
        EVAL_ACCURACY: correct / count if count else math.nan,
        EVAL_F1: sum(f1s) / n_labels if n_labels else math.nan,
        EVAL_LOSS: loss_sum / count if count else math.nan,
    }


def screened(report: Mapping[str, Any]) -> bool:
    """Was ``report`` an early evaluation on a sample of the validation rows (``SCREENED``)?"""
    return bool(report.get(SCREENED))


def beats(
    report: Mapping[str, Any], best: Mapping[str, Any] | None, metric: str, mode: str
) -> bool:
    """Is ``report`` a better best than ``best`` on ``metric``? A score of every validation
    row beats a screened one (a sample's) whatever the values, and never the reverse;
    within a kind, ``better``."""
    value = report.get(metric)
    if _missing(value):
        return False
    if not best or _missing(best.get(metric)):
        return True
    if screened(report) != screened(best):
        return not screened(report)
    return better(value, best[metric], mode)
