"""Tasks: what a model learns to do, each behind one small interface.

The loop, the export and the retrain ask the task; none of them names a model
class. A task module answers:

    build_model(path, label_names, hp, trust_remote_code, dtype)
                        the model, with the trial's dropout written into its config
    encode_train(tokenizer, splits, max_length, rank, world_size)
                        this rank's training rows, tokenized (labels, -100 masks, packing),
                        and how many rows all ranks train on
    encode_eval(tokenizer, split, rows, max_length, splits)
                        rows of a split, tokenized for ``score``
    batches(rows, order, batch_size, pad_id)
                        padded tensor batches for the training forward (``loss`` in the output)
    score(model, rows, n_labels, batch_size, pad_id, device, autocast)
                        the task's metrics on this rank's rows, all-reduced across ranks
    objectives          reported metrics a search may watch, with their direction
    headline(report)    the metrics of the log line
    columns, scores     the leaderboard's metric columns; what the summary says of an export
    baseline(splits, split)
                        the score of the obvious guess (the majority class / most common answer)
    load_export(model_dir, trust_remote_code)
                        an exported folder, reloaded with the task's ``from_pretrained``

Adding a task (token classification, a vision model) is one module here, its
metric names in ``trainers.metrics`` and its name in ``TASKS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEQUENCE_CLASSIFICATION = "sequence_classification"
CAUSAL_LM = "causal_lm"
TASKS = (SEQUENCE_CLASSIFICATION, CAUSAL_LM)


@dataclass(frozen=True)
class Rows:
    """One split's rows on one rank, tokenized the way its task needs them."""

    ids: list[list[int]]  # token ids per row (a prompt, a text, or a packed block)
    #: classification: the class index; causal LM training: labels per token (-100: not scored)
    targets: list[Any]
    #: packed blocks: position ids that restart at every document (None: 0..len-1)
    positions: list[list[int]] | None = None
    #: causal LM evaluation: per row, the response tokens of every candidate answer
    candidates: list[list[list[int]]] | None = None
    #: causal LM evaluation: per row, which candidate is the reference answer
    gold: list[int] | None = None
    #: causal LM evaluation: does the row's reference answer come from the answer set?
    scored: list[bool] | None = None
    #: causal LM evaluation: each row's place in the split it came from (rows are sorted)
    index: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        """Tokens per row (for grouping rows of similar length)."""
        return [len(x) for x in self.ids]


def get_task(name: str) -> Any:
    """The task module for ``model.task``."""
    if name == SEQUENCE_CLASSIFICATION:
        from trainers.tasks import classification

        return classification
    if name == CAUSAL_LM:
        from trainers.tasks import causal_lm

        return causal_lm
    raise ValueError(f"model.task: {name!r} is not one of {', '.join(TASKS)}")
