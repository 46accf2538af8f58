"""Consider task similarity: a probe before the sweep sets the unfreeze depth and the
learning-rate range (``search.probe``; DESIGN.md, "Spending less": the step before).

``trainers.probe`` fits a logistic regression on the frozen model's features of a few
hundred training rows and scores it on others. Its balanced accuracy against chance
gives the task's *closeness* to what the model already knows: the share of the gap
between chance and a perfect score that the untouched features close.

- near (closeness >= NEAR): the features already carry the task. Adapt little: only the
  top third to half of the blocks train, at the lower half of the searched learning
  rates, so the pretrained knowledge is not washed out.
- related (between): every block, the whole searched range (measured on the shipped
  task, 800 rows, 3 epochs: the top half trailed every block by 1.4 points of
  validation accuracy at both 5e-5 and 1e-4, DECISIONS 83).
- far (closeness < FAR, a 180-degree turn): the features must change. Every block
  trains, at the upper half of the range.

The chosen depth and range replace ``search.space.unfreeze_depth`` and
``search.space.learning_rate`` and set the defaults trial's values; the run's output and
its summary (``similarity``) say the probe's figures and what they chose.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from trainers.data import Splits
from tune_jobs.defaults import FAMILY_DEFAULTS, family_of, model_type_of
from tune_jobs.spec import JobSpec, parse_spec

#: closeness at or above which a task is near, below which it is far (measured on the
#: shipped data with MiniLM, three seeds: plot summary vs review 0.60-0.87, sentiment
#: 0.33-0.34, the movie title's first letter -0.06-0.03)
NEAR, FAR = 0.55, 0.15
#: training rows the probe fits on and scores on (disjoint, seeded by run.seed)
FIT_ROWS, SCORE_ROWS = 384, 256


@dataclass(frozen=True)
class Similarity:
    """What the probe measured, and what it chose."""

    balanced_accuracy: float  # the linear probe's, on the held-out training rows
    chance: float  # 1 / classes
    closeness: float  # (balanced_accuracy - chance) / (1 - chance), clipped to [0, 1]
    verdict: str  # near | related | far
    blocks: int  # the encoder's transformer blocks
    unfreeze_depth: list[int]  # the searched depths; the defaults trial takes the first
    learning_rate: tuple[float, float]  # the searched range (loguniform)
    default_learning_rate: float  # the defaults trial's
    rows: tuple[int, int]  # fitted on, scored on
    seconds: float

    def line(self) -> str:
        """The run's line for it."""
        return (
            f"task similarity: a linear probe on the frozen model's features scores "
            f"{self.balanced_accuracy:.3f} balanced accuracy on {self.rows[1]} training rows "
            f"(chance {self.chance:.2f}: closeness {self.closeness:.2f}) in {self.seconds:.0f} s: "
            f"a {self.verdict} task -> unfreeze_depth {self.unfreeze_depth} of {self.blocks}, "
            f"learning_rate {self.learning_rate[0]:.1e}..{self.learning_rate[1]:.1e} "
            f"(defaults trial: depth {self.unfreeze_depth[0]}, {self.default_learning_rate:.1e})"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def closeness_of(balanced_accuracy: float, classes: int) -> float:
    """The share of the gap between chance and a perfect score that the probe closes."""
    chance = 1.0 / max(2, classes)
    return min(1.0, max(0.0, (balanced_accuracy - chance) / (1.0 - chance)))


def choose(
    closeness: float, blocks: int, lr_range: tuple[float, float], family_lr: float
) -> tuple[str, list[int], tuple[float, float], float]:
    """The verdict, the searched depths, the learning-rate range (a part of ``lr_range``,
    the user's) and the defaults trial's learning rate."""
    third, half = max(1, round(blocks / 3)), max(1, round(blocks / 2))
    low, high = lr_range
    middle = math.sqrt(low * high)  # the range's middle on a log scale

    def inside(lr: float, lo: float, hi: float) -> float:
        return min(max(lr, lo), hi)

    if closeness >= NEAR:  # adapt little: the top third to half, the lower learning rates
        return "near", sorted({third, half}), (low, middle), inside(family_lr, low, middle)
    if closeness >= FAR:  # every block, the whole range
        return "related", [blocks], (low, high), inside(family_lr, low, high)
    # a turn away from what the model knows: every block, the higher learning rates
    return "far", [blocks], (middle, high), inside(max(family_lr, middle), middle, high)


def measure(spec: JobSpec, splits: Splits) -> Similarity:
    """Run the probe on the run's training rows (the validation and test rows stay unseen)."""
    from trainers.model import resolve_model_path
    from trainers.probe import encoder_blocks, frozen_features, linear_probe

    started = time.monotonic()
    rows = list(range(len(splits.train)))
    random.Random(spec.run.seed).shuffle(rows)
    n_score = min(SCORE_ROWS, len(rows) // 3)
    fit, score = rows[n_score : n_score + FIT_ROWS], rows[:n_score]
    texts, labels = splits.train.texts, splits.train.labels
    path = resolve_model_path(spec.model.name_or_path)
    features = frozen_features(
        path,
        [texts[i] for i in fit + score],
        spec.model.max_length,
        trust_remote_code=spec.model.trust_remote_code,
    )
    fit_y, score_y = [labels[i] for i in fit], [labels[i] for i in score]
    balanced, _ = linear_probe(features[: len(fit)], fit_y, features[len(fit) :], score_y)
    classes = len(splits.label_names)
    close = closeness_of(balanced, classes)
    blocks = encoder_blocks(path, spec.model.trust_remote_code)
    family_lr = FAMILY_DEFAULTS[family_of(model_type_of(spec.model.name_or_path))]["learning_rate"]
    verdict, depths, lr_range, default_lr = choose(
        close, blocks, searched_lr_range(spec, family_lr), family_lr
    )
    return Similarity(
        balanced_accuracy=round(balanced, 4),
        chance=round(1.0 / max(2, classes), 4),
        closeness=round(close, 3),
        verdict=verdict,
        blocks=blocks,
        unfreeze_depth=depths,
        learning_rate=(float(f"{lr_range[0]:.2g}"), float(f"{lr_range[1]:.2g}")),
        default_learning_rate=float(f"{default_lr:.2g}"),
        rows=(len(fit), len(score)),
        seconds=round(time.monotonic() - started, 1),
    )


def searched_lr_range(spec: JobSpec, family_lr: float) -> tuple[float, float]:
    """The learning-rate range the probe chooses within: the searched one, else a decade
    around the family's default."""
    entry = spec.search.space.get("learning_rate")
    if isinstance(entry, dict):
        ((kind, values),) = entry.items()
        if kind in ("uniform", "loguniform"):
            return float(values[0]), float(values[1])
        return float(min(values)), float(max(values))
    return family_lr / 3, family_lr * 3


def adapt(spec: JobSpec, similarity: Similarity) -> JobSpec:
    """The spec with the probe's depth and range in its search space."""
    raw = spec.to_dict()
    space = raw["search"]["space"]
    depths = similarity.unfreeze_depth
    space["unfreeze_depth"] = {"choice": depths} if len(depths) > 1 else depths[0]
    space["learning_rate"] = {"loguniform": list(similarity.learning_rate)}
    return parse_spec(raw, source="the task-similarity probe")


def defaults_overrides(similarity: Similarity, space: dict[str, Any]) -> dict[str, Any]:
    """What the defaults trial takes from the probe: its depth and rate, for the keys
    ``space`` searches (a single depth is a fixed value, not the defaults trial's)."""
    chosen = {
        "unfreeze_depth": similarity.unfreeze_depth[0],
        "learning_rate": similarity.default_learning_rate,
    }
    return {k: v for k, v in chosen.items() if isinstance(space.get(k), dict)}
