"""Sequence classification: one class label per text (an encoder with a fresh head).

Rows are a text's token ids and its class index; the metrics are accuracy, macro F1
and the mean cross-entropy, from a confusion matrix summed across ranks; the
baseline is the majority class of the training split.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from trainers import metrics as M
from trainers.data import Split, Splits, shard, shortest_first, tokenize
from trainers.data import batches as padded_batches
from trainers.tasks import SEQUENCE_CLASSIFICATION, Rows

NAME = SEQUENCE_CLASSIFICATION
AUTO_CLASS = "AutoModelForSequenceClassification"
objectives = M.TASK_OBJECTIVES[NAME]
default_metric = M.EVAL_ACCURACY
#: the leaderboard's metric columns beside the searched one
columns = (M.EVAL_F1,)
#: what the summary says of an exported model's scores
scores = (M.EVAL_ACCURACY,)


def config_kwargs(label_names: list[str]) -> dict[str, Any]:
    """What the model config is told about the task: the labels of a fresh head."""
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def encode_train(
    tokenizer: Any, splits: Splits, max_length: int, rank: int, world_size: int
) -> tuple[Rows, int]:
    """This rank's training texts, tokenized (truncated to ``max_length``, unpadded), and
    the training rows of all ranks."""
    split = splits.train
    rows = shard(range(len(split)), rank, world_size, equal=True)
    return Rows(
        tokenize(tokenizer, [split.texts[i] for i in rows], max_length),
        [split.labels[i] for i in rows],
    ), len(split)


def encode_eval(
    tokenizer: Any, split: Split, rows: Sequence[int], max_length: int, splits: Splits | None = None
) -> Rows:
    """Evaluation rows, shortest first (the metrics do not depend on the order; batches of
    similar lengths carry little padding)."""
    del splits  # the labels are class indices already
    ids, labels = shortest_first(
        tokenize(tokenizer, [split.texts[i] for i in rows], max_length),
        [split.labels[i] for i in rows],
    )
    return Rows(ids, labels)


def batches(
    rows: Rows, order: Sequence[int], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of ``rows`` in ``order``, each padded to its longest row."""
    return padded_batches(rows.ids, rows.targets, order, batch_size, pad_id)


def score(
    model: Any,
    rows: Rows,
    n_labels: int,
    batch_size: int,
    pad_id: int,
    device: Any = "cpu",
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Loss, accuracy and macro F1 on this rank's rows, all-reduced across ranks; the
    forward passes run in ``autocast()`` (the engine's precision)."""
    model.eval()
    confusion = torch.zeros((n_labels, n_labels), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for cpu_batch in batches(rows, range(len(rows)), batch_size, pad_id):
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            with autocast():
                logits = model(**batch).logits.float()
            loss_sum += torch.nn.functional.cross_entropy(
                logits, batch["labels"], reduction="sum"
            ).double()
            pairs = batch["labels"] * n_labels + logits.argmax(-1)  # (truth, prediction) cells
            confusion += torch.bincount(pairs, minlength=n_labels * n_labels).view(
                n_labels, n_labels
            )
    totals = all_reduce_sum(torch.cat([confusion.flatten(), loss_sum.view(1)]), device)
    model.train()
    confusion, loss_sum = totals[:-1].view(n_labels, n_labels), totals[-1]
    return M.classification_metrics(confusion.tolist(), float(loss_sum), float(confusion.sum()))


#: set while a score is this process's alone (``this_process_only``)
_ALONE = threading.local()


@contextlib.contextmanager
def this_process_only() -> Iterator[None]:
    """Scores summed in this process alone, even inside a distributed worker: the export's
    re-scoring of a whole split on rank 0 of a warm group (``tune_jobs.results.score_model``),
    whose other ranks are not scoring and would never join an all-reduce."""
    before = getattr(_ALONE, "on", False)
    _ALONE.on = True
    try:
        yield
    finally:
        _ALONE.on = before


def all_reduce_sum(totals: torch.Tensor, device: Any) -> torch.Tensor:
    """``totals`` summed over every rank (itself when not distributed, or inside
    ``this_process_only``), on the CPU. One all-reduce; NCCL reduces only device tensors,
    gloo CPU ones."""
    if getattr(_ALONE, "on", False):
        return totals.cpu()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        on = device if torch.distributed.get_backend() == "nccl" else "cpu"
        totals = totals.to(on)
        torch.distributed.all_reduce(totals)
    return totals.cpu()


def predict(model: Any, ids: list[list[int]], batch_size: int, pad_id: int) -> list[int]:
    """The predicted class of every row, in order (one process, on the CPU)."""
    model.eval()
    out: list[int] = []
    no_labels = [0] * len(ids)
    with torch.no_grad():
        for batch in padded_batches(ids, no_labels, range(len(ids)), batch_size, pad_id):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out.extend(model(**inputs).logits.argmax(-1).tolist())
    return out


def headline(report: dict[str, Any]) -> str:
    """The metrics of one evaluation in the log line."""
    return f"eval_loss {report[M.EVAL_LOSS]:.4f} eval_accuracy {report[M.EVAL_ACCURACY]:.4f}"


def baseline(splits: Splits, split: str = "validation") -> dict[str, float | None]:
    """Accuracy of always predicting the training split's most common label."""
    part = getattr(splits, split)
    return {M.EVAL_ACCURACY: splits.majority_baseline(split) if len(part) else None}


def load_export(model_dir: str, trust_remote_code: bool = False) -> Any:
    """An exported classifier, reloaded from its folder."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, trust_remote_code=trust_remote_code
    )
