"""What a sweep may spend: ``search.budget`` in trial-hours, accelerator-hours or wall time.

Three driver-side steps around the sweep (DESIGN.md, "Spending less"):

- before: ``check_affordable`` refuses a budget that cannot buy one trial, with the
  smoke pass's estimate of one (``TrialCost``: the seconds a trial takes to start and the
  seconds per training example, measured on the real model, data and resources);
- during: ``Budget``, a Tune callback and stopper, counts what the trials spend (each
  trial's own clock, ``time_total_s``, plus the seconds since its last report while it
  runs). ``BudgetGate`` wraps the search algorithm: no trial starts when the next would
  not fit (what the running trials are still expected to spend counted first). At a limit
  every running trial is stopped at its next report, and the checkpoints written so far
  are kept: the best of them is exported as after any sweep;
- after: ``Budget.bought`` is summary.json's ``budget``: the limits, what was spent,
  which trials ran, which were stopped at the limit, and what ended the sweep.

The expected cost of the next trial is the mean of the trials ended so far (under ASHA
most end at a rung: the mean is what a trial costs there), else the smoke estimate of
the cheapest trial, else nothing is known and the trial starts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback
from ray.tune.search import SearchAlgorithm
from ray.tune.stopper import Stopper

from cluster import ray_private
from trainers import metrics as M
from tune_jobs import layout
from tune_jobs.fidelity import examples_per_step
from tune_jobs.spec import BudgetSpec, JobSpec, Problem, SpecError, extreme

HOUR = 3600.0
#: the spec's keys, the unit each counts, in the order they are checked
LIMITS = ("trial_hours", "accelerator_hours", "wall_hours")


@dataclass(frozen=True)
class TrialCost:
    """One trial's cost as the smoke pass measured it (seconds)."""

    startup_s: float  # from the trial's start to its first optimizer step (model load, data)
    per_example_s: float  # per training example, evaluations and checkpoints included

    def seconds(self, examples: int) -> float:
        """A trial that trains on ``examples`` examples (rows x epochs)."""
        return self.startup_s + examples * self.per_example_s

    @staticmethod
    def of_reports(reports: Mapping[str, list[dict[str, Any]]]) -> TrialCost | None:
        """From the smoke trials' reports (each with ``step``, ``time_total_s`` and the
        examples a step took, ``effective_batch_size``): the cheapest trial's figures."""
        keys = (M.STEP, "time_total_s", M.EFFECTIVE_BATCH_SIZE)
        costs = []
        for rows in reports.values():
            points = [r for r in rows if all(k in r for k in keys)]
            if len(points) < 2:
                continue
            first, last = points[0], points[-1]
            (s1, t1), (s2, t2) = (
                (first[M.STEP], first["time_total_s"]),
                (last[M.STEP], last["time_total_s"]),
            )
            if s2 <= s1:
                continue
            per_step = (t2 - t1) / (s2 - s1)
            costs.append(
                TrialCost(max(0.0, t1 - s1 * per_step), per_step / last[M.EFFECTIVE_BATCH_SIZE])
            )
        if not costs:
            return None
        return TrialCost(min(c.startup_s for c in costs), min(c.per_example_s for c in costs))


def gpus_per_trial(spec: JobSpec) -> float:
    """The accelerators a trial reserves: what accelerator-hours count."""
    return spec.resources.num_workers * spec.resources.gpus_per_worker


def cheapest_examples(spec: JobSpec, n_train: int) -> int:
    """Training examples of the shortest trial the search can make (fewest epochs, or
    fewest ``max_steps`` at the smallest batch)."""
    space, training = spec.search.space, spec.training
    steps = extreme("max_steps", training.max_steps, space, min)
    if steps:
        batch = extreme(
            "per_device_train_batch_size", training.per_device_train_batch_size, space, min
        )
        return int(steps) * examples_per_step(spec, int(batch))
    return math.ceil(
        n_train * float(extreme("num_train_epochs", training.num_train_epochs, space, min))
    )


def check_affordable(spec: JobSpec, n_train: int, cost: TrialCost | None) -> float | None:
    """Refuse (``SpecError``, exit 2) a budget below one trial's estimated cost; returns the
    estimate (seconds of the cheapest trial), or None without a measurement."""
    budget = spec.search.budget
    if not budget.limited or cost is None:
        return None
    examples = cheapest_examples(spec, n_train)
    one = cost.seconds(examples)
    need = in_hours(one, one, gpus_per_trial(spec))  # a trial alone takes its time in wall
    how = (
        f"one trial costs about {one:.0f} s, measured by the smoke pass: {cost.startup_s:.1f} s "
        f"to start + {cost.per_example_s * 1000:.2f} ms per training example x "
        f"{examples} examples (the shortest trial of the space)"
    )
    problems = [
        Problem(
            f"search.budget.{key}",
            getattr(budget, key),
            f"cannot buy one trial: {how}; give at least {_round_up(need[key])}",
        )
        for key in LIMITS
        if getattr(budget, key) is not None and getattr(budget, key) < need[key]
    ]
    if problems:
        raise SpecError(problems)
    return one


def in_hours(trial_s: float, wall_s: float, gpus: float) -> dict[str, float]:
    """Trial and wall seconds as each limit counts them, in hours."""
    return {
        "trial_hours": trial_s / HOUR,
        "accelerator_hours": trial_s * gpus / HOUR,
        "wall_hours": wall_s / HOUR,
    }


def _round_up(hours: float) -> str:
    """A limit a user would type, at least ``hours``: two significant figures, up."""
    if hours <= 0:
        return "0"
    scale = 10 ** (math.floor(math.log10(hours)) - 1)
    return f"{math.ceil(hours / scale) * scale:.3g}"


@dataclass
class _Seen:
    """One trial as the budget counts it."""

    seconds: float = 0.0  # its clock at its last report (time_total_s)
    mark: float = 0.0  # when that was, or when it started running since (time.monotonic)
    running: bool = False
    ended: bool = False


@dataclass
class Budget(Callback, Stopper):
    """Counts what a sweep spends and stops it at its limits (a Tune callback and stopper;
    ``BudgetGate`` asks it before each new trial)."""

    limits: BudgetSpec
    gpus: float = 0.0  # per trial: accelerator-hours are trial-hours x gpus
    one_trial_s: float | None = None  # the smoke estimate of the cheapest trial
    wall_before_s: float = 0.0  # spent by earlier drivers of this run (a resume)
    started: float | None = None  # this driver's sweep start (time.monotonic)
    trials: dict[str, _Seen] = field(default_factory=dict)
    refused: str | None = None  # why no more trials were started
    exhausted: str | None = None  # the limit that ended the sweep
    stopped: list[str] = field(default_factory=list)  # running trials stopped at that limit
    say: Callable[[str], None] = print  # the console's line (not pickled)

    def __hash__(self) -> int:  # a Tune callback is kept in sets
        return id(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["say"] = print  # the console stays with its driver
        return state

    # -- counting -------------------------------------------------------------------------

    def trial_seconds(self, now: float | None = None) -> float:
        """Trial time spent: each trial's clock, and the seconds since a running one reported."""
        now = time.monotonic() if now is None else now
        return sum(s.seconds + (now - s.mark if s.running else 0.0) for s in self.trials.values())

    def wall_seconds(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return self.wall_before_s + (now - self.started if self.started is not None else 0.0)

    def spent(self, now: float | None = None) -> dict[str, float]:
        """Every limit's measure, in hours."""
        return in_hours(self.trial_seconds(now), self.wall_seconds(now), self.gpus)

    def expected_trial_s(self) -> float | None:
        """What the next trial is expected to cost: the mean of the ended ones, else the
        smoke estimate, else unknown."""
        ended = [s.seconds for s in self.trials.values() if s.ended]
        return sum(ended) / len(ended) if ended else self.one_trial_s

    def next_would_not_fit(self, now: float | None = None) -> str | None:
        """Why one more trial would overrun a limit, or None when it fits (or nothing is known)."""
        now = time.monotonic() if now is None else now
        expected = self.expected_trial_s()
        if expected is None:
            return None
        running = [s for s in self.trials.values() if s.running]
        spent = self.trial_seconds(now)
        # what the running trials are still expected to spend, then the new one
        committed = spent + sum(max(0.0, expected - s.seconds - (now - s.mark)) for s in running)
        projected = in_hours(committed + expected, self.wall_seconds(now) + expected, self.gpus)
        for key in LIMITS:
            limit = getattr(self.limits, key)
            if limit is not None and projected[key] > limit:
                return (
                    f"{key.replace('_', '-')} {limit:g}: {self.spent(now)[key]:.3g} spent, and one "
                    f"more trial (about {expected:.0f} s) would need {projected[key]:.3g}"
                )
        return None

    def over(self, now: float | None = None) -> str | None:
        """The limit reached, or None."""
        spent = self.spent(now)
        for key in LIMITS:
            limit = getattr(self.limits, key)
            if limit is not None and spent[key] >= limit:
                return f"{key.replace('_', '-')} {limit:g} spent ({spent[key]:.3g})"
        return None

    # -- Tune's callbacks -------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        for trial in trials:
            seen = self.trials.setdefault(layout.trial_name(trial), _Seen(mark=now))
            clock = float((trial.last_result or {}).get("time_total_s") or 0.0)
            if clock > seen.seconds:  # a restored run: the trial's clock as Tune kept it
                seen.seconds, seen.mark = clock, now
            running = trial.status == "RUNNING"
            if running and not seen.running:
                seen.mark = now
            elif seen.running and not running:
                seen.seconds = max(seen.seconds, clock)
            seen.running = running
            seen.ended = trial.status in ("TERMINATED", "ERROR")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        seen = self.trials.setdefault(layout.trial_name(trial), _Seen())
        seen.seconds = float(result.get("time_total_s") or seen.seconds)
        seen.mark = time.monotonic()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """The sweep is over: nothing runs any more (a trial stopped at the limit gets no
        completion callback), so what comes after (the export) is not counted."""
        now = time.monotonic()
        for seen in self.trials.values():
            if seen.running:
                seen.seconds += now - seen.mark
                seen.running = False
        if self.started is not None:
            self.wall_before_s, self.started = self.wall_seconds(now), None

    def _ended(self, trial: Any) -> None:
        seen = self.trials.setdefault(layout.trial_name(trial), _Seen())
        clock = float((trial.last_result or {}).get("time_total_s") or 0.0)
        seen.seconds = max(seen.seconds, clock)
        seen.running, seen.ended = False, True

    def get_state(self) -> dict[str, Any]:
        # a resumed run goes on counting from here (Tune restores callbacks' state)
        return {"wall_s": self.wall_seconds(), "refused": self.refused, "exhausted": self.exhausted}

    def set_state(self, state: dict[str, Any]) -> None:
        self.wall_before_s = float(state.get("wall_s") or 0.0)
        self.refused = state.get("refused")

    # -- Tune's stopper ----------------------------------------------------------------

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        if self.exhausted is None:
            reached = self.over()
            if reached is None:
                return False
            self.exhausted = reached
            self.stopped = sorted(n for n, s in self.trials.items() if s.running)
            self.say(
                f"budget: {reached}: stopping "
                + (
                    f"{', '.join(self.stopped)} at the next report (checkpoints kept)"
                    if self.stopped
                    else "the sweep"
                )
            )
        return True

    def refuse(self, why: str) -> None:
        """No more trials will start (``BudgetGate``)."""
        if self.refused is None:
            self.refused = why
            self.say(f"budget: no more trials: {why}")

    # -- what it bought ----------------------------------------------------------------

    def bought(self) -> dict[str, Any]:
        """summary.json's ``budget``."""
        spent = self.spent()
        return {
            "limits": {k: getattr(self.limits, k) for k in LIMITS if getattr(self.limits, k)},
            "spent": {k: round(v, 4) for k, v in spent.items()},
            "trials_started": len(self.trials),
            "one_trial_estimate_s": None
            if self.one_trial_s is None
            else round(self.one_trial_s, 1),
            "expected_trial_s": None
            if self.expected_trial_s() is None
            else round(self.expected_trial_s() or 0.0, 1),
            "no_more_trials": self.refused,
            "ended_by": self.exhausted,
            "stopped_at_limit": self.stopped,
        }


class BudgetGate(SearchAlgorithm):
    """The run's search algorithm, asked for a new trial only while one more fits the budget."""

    def __init__(self, inner: SearchAlgorithm, budget: Budget) -> None:
        super().__init__()
        self.inner = inner
        self.budget = budget

    @property
    def searcher(self) -> Any:  # Tune sizes its pending queue by a ConcurrencyLimiter in here
        return getattr(self.inner, "searcher", None)

    @property
    def metric(self) -> Any:
        return self.inner.metric

    @property
    def total_samples(self) -> int:
        return self.inner.total_samples

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, experiments: Any) -> None:
        self.inner.add_configurations(experiments)

    def next_trial(self) -> Any:
        if self.is_finished():
            return None
        why = self.budget.next_would_not_fit()
        if why is not None:
            self.budget.refuse(why)
            self.set_finished()
            return None
        return self.inner.next_trial()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def is_finished(self) -> bool:
        return self._finished or self.inner.is_finished()

    def set_finished(self) -> None:
        self._finished = True
        self.inner.set_finished()

    def has_checkpoint(self, dirpath: str) -> bool:
        return self.inner.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath: str, **kwargs: Any) -> None:
        self.inner.save_to_dir(dirpath, **kwargs)

    def restore_from_dir(self, dirpath: str) -> None:
        self.inner.restore_from_dir(dirpath)


def gate(search_alg: Any, budget: Budget | None) -> Any:
    """``search_alg`` behind the budget (a ``Searcher`` first becomes Tune's generator)."""
    if budget is None:
        return search_alg
    from ray.tune.search import Searcher, SearchGenerator

    if isinstance(search_alg, Searcher):
        search_alg = SearchGenerator(search_alg)
    return BudgetGate(search_alg, budget)


def describe(bought: dict[str, Any]) -> list[str]:
    """The summary's lines for a budget: what it bought, and what ended the sweep."""
    limits = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in bought["limits"].items())
    spent = ", ".join(f"{bought['spent'][k]:.3g} {k.replace('_', '-')}" for k in bought["limits"])
    lines = [f"budget {limits}: spent {spent} on {bought['trials_started']} trial(s)"]
    if bought["ended_by"]:
        stopped = bought["stopped_at_limit"]
        lines.append(
            f"  ended by the limit ({bought['ended_by']})"
            + (f"; stopped there, checkpoints kept: {', '.join(stopped)}" if stopped else "")
        )
    elif bought["no_more_trials"]:
        lines.append(f"  no more trials started: {bought['no_more_trials']}")
    else:
        lines.append("  every planned trial ran within it")
    return lines


def budget_of(tuner: Any) -> Budget | None:
    """The ``Budget`` a Tuner runs with (a restored one's, as Tune restored it), or None."""
    callbacks = ray_private.restored_run_config(tuner).callbacks or []
    return next((c for c in callbacks if isinstance(c, Budget)), None)


def describe_limits(limits: BudgetSpec, one_trial_s: float | None) -> str:
    """The run's opening line for its budget."""
    shown = ", ".join(
        f"{k.replace('_', '-')} {getattr(limits, k):g}" for k in LIMITS if getattr(limits, k)
    )
    known = (
        f"; one trial about {one_trial_s:.0f} s (smoke pass)"
        if one_trial_s is not None
        else "; no smoke pass: trial cost learnt as trials end"
    )
    return f"budget: {shown}{known}; no trial starts that would not fit, running ones stop at the limit"
