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
