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
from tune_jobs.space import qmc_points, to_tune
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
        peers=sched.rung_peers,
    )


class RungASHA(ASHAScheduler):
    """ASHA deciding on its own metric (``scheduler.rung_metric``), where no trial passes
    a rung alone.

    Tune hands every scheduler the run's metric and refuses one that has its own; this one
    keeps its own, and the search, the leaderboard and the export keep the run's.

    ASHA decides a trial at a rung against the results recorded there before it, so the
    first trial to reach a rung always passes it (measured: the defaults trial, first and
    weak on 800 rows, trained to the end, 30 of a sweep's 139 trial-seconds). Here a trial
    that reaches a rung with fewer than ``peers`` results there, while others may still
    arrive, waits: Tune pauses it (its checkpoint written, its resources freed). Each new
    result at that rung decides the waiting ones once ``peers`` are in (the top
    1/reduction_factor go on, the rest stop); when nothing else can arrive (no trial
    pending or running), they are decided among what is there.
    """

    def __init__(self, *args: Any, peers: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peers = peers
        self._waiting: dict[str, tuple[float, Any]] = {}  # trial id -> (rung, trial)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        from ray.tune.schedulers import TrialScheduler

        t = result.get(self._time_attr)
        if not self._peers or t is None or self._metric not in result:
            return super().on_trial_result(tune_controller, trial, result)
        if t >= self._max_t and self._stop_last_trials:
            return super().on_trial_result(tune_controller, trial, result)
        bracket = self._trial_info[trial.trial_id]
        rung = next(
            ((m, rec) for m, rec in bracket._rungs if t >= m and trial.trial_id not in rec), None
        )
        if rung is None:
            return TrialScheduler.CONTINUE
        milestone, recorded = rung
        value = self._metric_op * result[self._metric]
        if len(recorded) < self._peers and _others_may_arrive(tune_controller, trial):
            recorded[trial.trial_id] = value
            self._waiting[trial.trial_id] = (milestone, trial)
            return TrialScheduler.PAUSE
        action = bracket.on_result(trial, t, value)  # against those before it; recorded
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        self._decide(tune_controller, milestone, recorded, force=False)
        return action

    def _decide(self, tune_controller: Any, milestone: float, recorded: dict, force: bool) -> None:
        """The trials waiting at ``milestone``: the top 1/reduction_factor of every result
        there go on (resumed by ``choose_trial_to_run``), the others stop."""
        import numpy as np

        waiting = [(tid, tr) for tid, (m, tr) in self._waiting.items() if m == milestone]
        if not waiting or (len(recorded) <= self._peers and not force):
            return
        cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / self._reduction_factor) * 100)
        for tid, tr in waiting:
            del self._waiting[tid]
            if recorded[tid] < cutoff:
                self._num_stopped += 1
                tune_controller.stop_trial(tr)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        from ray.tune.experiment import Trial

        trials = tune_controller.get_trials()
        if self._waiting and not any(t.status in (Trial.PENDING, Trial.RUNNING) for t in trials):
            # nothing else can reach the rungs: decide among what is there
            for milestone, recorded in {
                m: rec for b in self._brackets for m, rec in b._rungs
            }.items():
                self._decide(tune_controller, milestone, recorded, force=True)
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        for trial in trials:
            if trial.status == Trial.PAUSED and trial.trial_id not in self._waiting:
                return trial
        return None

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._waiting.pop(trial.trial_id, None)
        super().on_trial_remove(tune_controller, trial)


def _others_may_arrive(tune_controller: Any, trial: Any) -> bool:
    """Whether a trial other than ``trial`` is pending or running."""
    from ray.tune.experiment import Trial

    return any(
        t is not trial and t.status in (Trial.PENDING, Trial.RUNNING)
        for t in tune_controller.get_trials()
    )


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
    if spec.search.algorithm == "qmc":  # the given points, then a Sobol sequence's
        more = qmc_points(
            spec.search.space, spec.search.num_samples - len(points), spec.run.seed, points
        )
        points = [*points, *more]
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
