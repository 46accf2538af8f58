"""Job spec -> Tune ``param_space`` (the searched training keys)."""

from __future__ import annotations

from typing import Any

from ray import tune

from tune_jobs.spec import JobSpec, adapter_overrides

#: Keys a trial's config may carry besides the searched ones (a reevaluation's trials,
#: ``tune_jobs.reevaluate``): the trial's seed (else ``run.seed``), and the sweep trial
#: whose config it retrains. Neither is a training key: ``trial_hparams`` leaves them out.
SEED = "seed"
REEVALUATES = "reevaluates"


def to_tune(entry: Any) -> Any:
    """One search-space entry of the spec as a Tune domain (or a fixed value)."""
    if not isinstance(entry, dict):
        return entry
    ((kind, values),) = entry.items()
    if kind == "choice":
        return tune.choice(values)
    if kind == "grid":
        return tune.grid_search(values)
    low, high = values
    if kind == "uniform":
        return tune.uniform(float(low), float(high))
    if kind == "loguniform":
        return tune.loguniform(float(low), float(high))
    if kind == "randint":
        return tune.randint(int(low), int(high) + 1)  # spec bounds are inclusive
    raise ValueError(f"unknown distribution {kind!r}")  # spec validation makes this unreachable


def param_space(spec: JobSpec) -> dict[str, Any]:
    """Tune's param_space: one entry per searched training key."""
    return {key: to_tune(entry) for key, entry in spec.search.space.items()}


def trial_hparams(spec: JobSpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """The trial's full hyperparameters: training defaults overridden by the sampled values."""
    hp = spec.training.model_dump()
    hp.update({k: v for k, v in sampled.items() if k in hp})
    hp["adapter"] = {**spec.adapter.model_dump(), **adapter_overrides(sampled)}
    return hp


def qmc_points(
    space: dict[str, Any], n: int, seed: int, taken: list[dict[str, Any]] | tuple = ()
) -> list[dict[str, Any]]:
    """``n`` configs of ``space`` from a scrambled Sobol sequence (``search.algorithm:
    qmc``): each searched key is one dimension, mapped through its distribution (a log
    scale for loguniform; a choice's values in equal shares), so a handful of trials
    covers every key's range evenly, where random draws (and TPE's, which are random for
    its first ten) leave parts of it empty. The first 2^m points of the sequence are
    balanced: n of them fill n of the 2^m equal slices of each range. Fixed keys are left
    to the param space; grids are refused by the spec.

    ``taken``: the points the sweep tries first (the defaults trial, a retrain's champion):
    the sequence is drawn for them too, and each takes the place of the point in its slice
    of the learning rate (else of the first key), the nearest in every key it sets, so the
    slices stay filled: 8 trials with the defaults first still put one rate in each eighth."""
    import math

    from scipy.stats import qmc

    keys = [k for k, v in space.items() if isinstance(v, dict) and "grid" not in v]
    if n <= 0 or not keys:
        return []
    total = n + len(taken)
    m = max(0, math.ceil(math.log2(total)))
    sobol = qmc.Sobol(d=len(keys), scramble=True, seed=seed)
    rows = [list(r) for r in sobol.random_base2(m)[:total]]
    first = keys.index("learning_rate") if "learning_rate" in keys else 0

    def slice_of(u: float) -> int:  # which of the 2^m equal slices of the first key
        return min(int(u * 2**m), 2**m - 1)

    for point in taken:
        at = {i: _unit(space[k], point[k]) for i, k in enumerate(keys) if k in point}
        if not at or len(rows) <= n:
            continue
        rows.remove(
            min(
                rows,
                key=lambda r: (
                    first in at and slice_of(r[first]) != slice_of(at[first]),
                    abs(r[first] - at[first]) if first in at else 0.0,
                    sum((r[i] - u) ** 2 for i, u in at.items()),
                ),
            )
        )
    points = []
    for row in rows[:n]:
        point = {}
        for key, u in zip(keys, row, strict=True):
            ((kind, values),) = space[key].items()
            if kind == "choice":
                point[key] = values[min(int(u * len(values)), len(values) - 1)]
            elif kind == "randint":
                low, high = int(values[0]), int(values[1])
                point[key] = min(low + int(u * (high - low + 1)), high)
            elif kind == "loguniform":
                low, high = math.log(float(values[0])), math.log(float(values[1]))
                point[key] = math.exp(low + u * (high - low))
            else:  # uniform
                low, high = float(values[0]), float(values[1])
                point[key] = low + u * (high - low)
        points.append(point)
    return points


def _unit(entry: dict[str, Any], value: Any) -> float:
    """Where ``value`` sits in ``entry``'s range, as ``qmc_points`` maps [0, 1) onto it
    (the middle of a choice's share; a value outside the range at its edge)."""
    import math

    ((kind, values),) = entry.items()
    if kind == "choice":
        index = values.index(value) if value in values else 0
        return (index + 0.5) / len(values)
    low, high = float(values[0]), float(values[1])
    if kind == "randint":  # the middle of the value's share, as for a choice
        low, high, value = low, high + 1, float(value) + 0.5
    elif kind == "loguniform":
        low, high, value = math.log(low), math.log(high), math.log(float(value))
    return min(max((float(value) - low) / (high - low), 0.0), 1.0)
