"""How much each searched key mattered: Optuna's fANOVA over the finished trials.

fANOVA fits a random forest of the metric on the searched values and splits the
forest's variance among the keys. On a handful of trials that forest is noise, so the
report says how many trials the estimate rests on, and shows none below
``MIN_TRIALS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tune_jobs.report.collect import RunView
from tune_jobs.report.plots import trial_points

#: Fewer finished trials than this: no estimate (a forest on 4 points says nothing).
MIN_TRIALS = 5
#: Fewer than this: shown, with a warning that it is a rough hint.
STEADY_TRIALS = 20


@dataclass(frozen=True)
class Importance:
    """fANOVA shares by key (empty when there is no estimate), how many trials it rests
    on, and what a reader must know about it."""

    scores: dict[str, float]
    trials: int
    note: str


def _distribution(entry: Any) -> Any:
    """The spec's search-space entry as an Optuna distribution (None: a fixed value)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if not isinstance(entry, dict):
        return None
    ((kind, values),) = entry.items()
    if kind in ("choice", "grid"):
        return CategoricalDistribution(list(values)) if len(set(map(str, values))) > 1 else None
    low, high = values
    if kind == "randint":
        return IntDistribution(int(low), int(high))
    return FloatDistribution(float(low), float(high), log=kind == "loguniform")


def _inside(dist: Any, value: Any) -> bool:
    if hasattr(dist, "choices"):
        return value in dist.choices
    return isinstance(value, int | float) and dist.low <= value <= dist.high


def fanova(view: RunView) -> Importance:
    """The searched keys' importance for ``view.metric`` (seeded: the same run, the same
    numbers)."""
    if view.spec is None:
        return Importance({}, 0, "no importance: this run's job_spec.yaml does not parse here")
    try:
        import optuna
        from optuna.importance import FanovaImportanceEvaluator
        from optuna.trial import create_trial
    except ImportError:
        return Importance({}, 0, "no importance: install tunefleet[search] (optuna)")
    dists = {
        k: d
        for k, entry in view.spec.search.space.items()
        if (d := _distribution(entry)) is not None
    }
    trials = []
    for _, config, value in trial_points(view):
        params = {k: config[k] for k in dists if k in config}
        if len(params) != len(dists) or not all(_inside(dists[k], v) for k, v in params.items()):
            continue  # a warm-start point outside today's space
        trials.append(create_trial(params=params, distributions=dists, value=value))
    n = len(trials)
    if not dists:
        return Importance({}, n, "no importance: no key was searched over a range or a choice")
    if n < MIN_TRIALS:
        return Importance(
            {}, n, f"no importance: {n} finished trial(s); fANOVA needs at least {MIN_TRIALS}"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if view.mode == "max" else "minimize")
    study.add_trials(trials)
    try:
        scores = optuna.importance.get_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0)
        )
    except ImportError:
        return Importance({}, n, "no importance: fANOVA needs scikit-learn (tunefleet[search])")
    note = f"fANOVA over {n} finished trials"
    if n < STEADY_TRIALS:
        note += f": a rough hint (under {STEADY_TRIALS} trials the forest is unsteady)"
    if len(dists) == 1:
        note += "; one key searched, so all of the variance is its by definition"
    return Importance({k: float(v) for k, v in scores.items()}, n, note)
