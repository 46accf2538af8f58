"""Job spec -> Tune trial scheduler and search algorithm."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    PopulationBasedTraining,
)
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from tune_jobs.fidelity import first_rung, rung_metric
from tune_jobs.space import to_tune
from tune_jobs.spec import JobSpec, budget_in


def build_scheduler(spec: JobSpec) -> Any:
    """ASHA or HyperBand on the spec's metric, or FIFO (metric and mode come from TuneConfig)."""
    sched = spec.scheduler
    if sched.type == "fifo":
        return FIFOScheduler()
    if sched.type == "pbt":
        return PopulationBasedTraining(
            time_attr=sched.time_attr,
            perturbation_interval=sched.perturbation_interval,
            hyperparam_mutations={k: _mutation(v) for k, v in sched.mutations.items()},
            quantile_fraction=sched.quantile_fraction,
            resample_probability=sched.resample_probability,
            synch=sched.synch,
            log_config=True,  # pbt_global.txt / pbt_policy_*.txt: the lineage and replay source
        )
    if sched.type == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        return PB2(
            time_attr=sched.time_attr,
            perturbation_interval=sched.perturbation_interval,
            hyperparam_bounds={
                k: [float(b) for b in next(iter(v.values()))] for k, v in sched.mutations.items()
            },
            quantile_fraction=sched.quantile_fraction,
            synch=sched.synch,
            log_config=True,
        )
    max_t = sched.max_t or budget_in(sched.time_attr, spec.training, spec.search.space)
    metric, mode = rung_metric(spec)
    if sched.type == "hyperband":
        return RungHyperBand(
            time_attr=sched.time_attr,
            max_t=max_t,
            reduction_factor=sched.reduction_factor,
            metric=metric,
            mode=mode,
        )
    grace = sched.grace_period
    if grace == "auto":  # not resolved with the data (tune_jobs.fidelity.resolve): a default
        grace = first_rung(spec, 0, max_t)
    return RungASHA(
        time_attr=sched.time_attr,
        max_t=max_t,
        grace_period=grace,
        reduction_factor=sched.reduction_factor,
        metric=metric,
        mode=mode,
    )


class RungASHA(ASHAScheduler):
    """ASHA deciding on its own metric (``scheduler.rung_metric``). Tune hands every
    scheduler the run's metric and refuses one that has its own; this one keeps its own,
    and the search, the leaderboard and the export keep the run's."""

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True


class RungHyperBand(HyperBandScheduler):
    """HyperBand deciding on its own metric (see ``RungASHA``)."""

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True


def _mutation(entry: Any) -> Any:
    """A spec mutation as PBT takes it: a list (perturbed to a neighbour) or a Tune domain."""
    if isinstance(entry, dict) and "choice" in entry:
        return list(entry["choice"])
    if not isinstance(entry, dict):
        return [entry]
    return to_tune(entry)


def build_search_alg(
    spec: JobSpec, points: list[dict[str, Any]], max_concurrent: int | None
) -> Any:
    """The search algorithm, seeded by ``run.seed``, trying ``points`` first.

    The concurrency limit sits on the algorithm: Tune ignores
    ``TuneConfig.max_concurrent_trials`` when a search-generator instance is
    given (measured: every trial started at once).
    """
    if spec.search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(
            points_to_evaluate=points or None,
            sampler=optuna.samplers.TPESampler(seed=spec.run.seed),
        )
        return (
            ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
            if max_concurrent
            else searcher
        )
    return BasicVariantGenerator(
        points_to_evaluate=points or None,
        random_state=spec.run.seed,
        max_concurrent=max_concurrent or 0,
    )
