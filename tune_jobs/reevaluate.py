"""A choice that survives seeds: ``search.reevaluate: {top_k, seeds}``.

A sweep picks the trial with the best score, and a score on one seed is partly luck
(the classifier head's draw, the data order, dropout): the best of many trials is
the luckiest as often as the best. After the sweep, the ``top_k`` best distinct
configs are trained again from scratch, each on ``seeds`` new seeds (``run.seed + 1``,
``+ 2``, ...; the data split stays the run's), in parallel on the sweep's warm groups,
as a second Tune experiment in ``<run>/reevaluate``. The config with the best mean
over its new seeds is chosen; the sweep's own score is shown but not averaged in (it
was selected for being high, so it is biased up). The report gives each config's
mean and sample standard deviation, and whether the winner's lead over the runner-up
exceeds the seed noise: twice the standard error of the difference of the two means.

The export is the chosen config's best seed: each config keeps its own leader
checkpoint (``tune_jobs.leader``, keyed by the sweep trial it retrains), so that seed's
checkpoint exists whichever config led overall. Under a ``search.budget`` the
retraining is priced first (each config's full training as the sweep measured it):
it runs only if all of it fits in what is left, and a budget of what is left stops it
at the limit like the sweep.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cluster import storage
from trainers import metrics as M
from tune_jobs import layout
from tune_jobs.budget import HOUR, LIMITS, Budget, in_hours
from tune_jobs.results import TrialSummary, prune_train_runs
from tune_jobs.space import REEVALUATES, SEED
from tune_jobs.spec import BudgetSpec, JobSpec, parse_spec

#: the reevaluation's Tune experiment, inside the run folder
FOLDER = layout.REEVALUATE_DIR
#: a lead counts as more than seed noise at this many standard errors of the difference
NOISE_SE = 2.0


@dataclass(frozen=True)
class Candidate:
    """One of the sweep's best configs, to train again."""

    trial: str  # the sweep trial that reported it
    config: dict[str, Any]
    sweep_value: float  # its best score in the sweep (one seed, selected)
    trial_s: float  # what training it fully cost, as the sweep measured it (seconds)


def candidates(trials: list[TrialSummary], metric: str, mode: str, k: int) -> list[Candidate]:
    """The ``k`` best distinct configs of the finished trials, best first."""
    finished = [t for t in trials if t.best.get(metric) is not None]
    finished.sort(key=lambda t: (M.rank(t.best[metric], mode), t.trial))
    out: list[Candidate] = []
    seen: set[str] = set()
    for t in finished:
        key = repr(sorted(t.config.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append(Candidate(t.trial, dict(t.config), float(t.best[metric]), full_cost_s(t)))
        if len(out) == k:
            break
    return out


def full_cost_s(trial: TrialSummary) -> float:
    """A full training of the trial's config: its clock, scaled up to its total steps when
    a scheduler stopped it early."""
    last = trial.last
    spent = float(last.get("time_total_s") or 0.0)
    step, total = last.get(M.STEP), last.get(M.TOTAL_STEPS)
    if step and total and total > step:
        return spent * total / step
    return spent


def seeds_of(spec: JobSpec) -> list[int]:
    """The new seeds: the run's seed + 1, + 2, ..."""
    return [spec.run.seed + i for i in range(1, spec.search.reevaluate.seeds + 1)]


def points(cands: list[Candidate], seeds: list[int]) -> list[dict[str, Any]]:
    """Every (config, seed) the reevaluation trains: config by config, seed by seed."""
    return [{**c.config, SEED: s, REEVALUATES: c.trial} for c in cands for s in seeds]


def space_of(pts: list[dict[str, Any]]) -> dict[str, Any]:
    """A Tune param space holding exactly the points' values (each point is run as given;
    a grid here would multiply the trials)."""
    from ray import tune

    keys = dict.fromkeys(k for p in pts for k in p)
    space = {}
    for key in keys:
        values: list[Any] = []
        for p in pts:
            if p.get(key) not in values:
                values.append(p.get(key))
        space[key] = tune.choice(values)
    return space


def reevaluation_spec(spec: JobSpec, n: int) -> JobSpec:
    """The run's spec for its retraining: every point trained to the end (FIFO), no
    defaults trial, no probe, no budget of its own (``remaining_budget`` is passed in)."""
    raw = spec.to_dict()
    raw["search"].update(
        num_samples=n,
        algorithm="random",
        start_with_defaults=False,
        probe=False,
        budget={},
        reevaluate={"top_k": 0},
    )
    raw["scheduler"] = {"type": "fifo"}
    return parse_spec(raw, source="search.reevaluate")


def price_s(cands: list[Candidate], seeds: int, concurrent: int) -> tuple[float, float]:
    """(trial-seconds, wall-seconds) the retraining is expected to take."""
    trainings = sorted((c.trial_s for c in cands for _ in range(seeds)), reverse=True)
    waves = [trainings[i : i + concurrent] for i in range(0, len(trainings), concurrent)]
    return sum(trainings), sum(max(w) for w in waves)


def remaining_budget(
    limits: BudgetSpec, spent: Mapping[str, float], cost: tuple[float, float], gpus: float
) -> tuple[BudgetSpec | None, str | None]:
    """What is left of the sweep's limits after ``spent`` (hours), and why the retraining
    (``cost``: trial-seconds, wall-seconds) does not fit in it, or None when it does."""
    left = {
        k: max(0.0, getattr(limits, k) - spent[k]) for k in LIMITS if getattr(limits, k) is not None
    }
    need = in_hours(cost[0], cost[1], gpus)
    for key, hours in left.items():
        if need[key] > hours:
            return None, (
                f"it needs about {need[key]:.3g} {key.replace('_', '-')} and {hours:.3g} are left"
            )
    # a limit of 0 is no limit to BudgetSpec: a sliver stands for nothing left
    return BudgetSpec(**{k: max(v, 1e-6) for k, v in left.items()}), None


@dataclass
class Scored:
    """One config after its retraining."""

    trial: str
    config: dict[str, Any]
    sweep_value: float
    values: dict[int, float]  # seed -> best score of its training (finished ones only)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "config": self.config,
            "sweep": self.sweep_value,
            "seeds": {str(k): v for k, v in self.values.items()},
            "mean": self.mean,
            "sd": self.sd,
        }


def score(
    cands: list[Candidate],
    trials: list[TrialSummary],
    configs: Mapping[str, dict[str, Any]],
    metric: str,
) -> list[Scored]:
    """Each candidate's scores over its seeds; ``configs``: each reevaluation trial's config.
    A training that failed or was stopped before its end (a budget) is left out."""
    out = {c.trial: Scored(c.trial, c.config, c.sweep_value, {}) for c in cands}
    for t in trials:
        config = configs.get(t.trial) or {}
        of = out.get(config.get(REEVALUATES))
        done = t.status == "TERMINATED" and not t.stopped_early
        if of is None or not done or t.best.get(metric) is None:
            continue
        of.values[int(config[SEED])] = float(t.best[metric])
    for s in out.values():
        s.values = dict(sorted(s.values.items()))
    return list(out.values())


def decide(scored: list[Scored], mode: str) -> dict[str, Any] | None:
    """The config with the best mean, its lead over the runner-up, and the noise in it."""
    ranked = sorted((s for s in scored if s.mean is not None), key=lambda s: M.rank(s.mean, mode))
    if not ranked:
        return None
    chosen = ranked[0]
    out: dict[str, Any] = {"chosen": chosen.trial, "runner_up": None, "lead": None}
    if len(ranked) > 1:
        second = ranked[1]
        lead = abs(chosen.mean - second.mean)
        parts = [s.sd**2 / len(s.values) for s in (chosen, second) if s.sd is not None]
        noise = math.sqrt(sum(parts)) if len(parts) == 2 else None
        out.update(
            runner_up=second.trial,
            lead=lead,
            noise_se=noise,
            lead_exceeds_noise=None if noise is None else lead > NOISE_SE * noise,
        )
    return out


def describe(reeval: Mapping[str, Any], metric: str) -> list[str]:
    """The reevaluation's lines for the console (one per config, then the verdict)."""
    if reeval.get("skipped"):
        return [f"reevaluate: skipped: {reeval['skipped']}"]
    lines = [f"reevaluate: {metric} over seeds {reeval['seeds']} (the sweep's own not counted):"]
    for c in reeval["configs"]:
        spread = (
            f"{c['mean']:.4f} ± {c['sd']:.4f} (n={len(c['seeds'])})"
            if c["sd"] is not None
            else ("no finished training" if c["mean"] is None else f"{c['mean']:.4f} (n=1)")
        )
        mark = "  <- chosen" if c["trial"] == reeval.get("chosen") else ""
        lines.append(f"  {c['trial']}: sweep {c['sweep']:.4f}, new seeds {spread}{mark}")
    if reeval.get("lead") is not None:
        noise = reeval.get("noise_se")
        verdict = (
            "beyond"
            if reeval.get("lead_exceeds_noise")
            else "within"
            if noise is not None
            else "unknown against"
        )
        lines.append(
            f"  lead over {reeval['runner_up']}: {reeval['lead']:.4f}, {verdict} the seed noise"
            + (f" ({NOISE_SE:g} SE = {NOISE_SE * noise:.4f})" if noise is not None else "")
        )
    failed = reeval.get("failed") or {}
    if failed:
        name, error = next(iter(failed.items()))
        lines.append(
            f"  {len(failed)} training(s) failed; {name}: "
            + (str(error).strip().splitlines() or ["?"])[-1][:160]
        )
    if not reeval.get("chosen"):
        lines.append("  no config finished a training on a new seed: the sweep's choice stands")
    elif reeval["chosen"] != reeval["sweep_choice"]:
        lines.append(
            f"  the sweep's pick {reeval['sweep_choice']} was not the best on new seeds: "
            f"{reeval['chosen']}'s config is chosen"
        )
    if reeval.get("export"):
        e = reeval["export"]
        lines.append(f"  exported: its best seed, {e['seed']} ({FOLDER}/{e['trial']})")
    return lines


def run(
    spec: JobSpec,
    data_ref: Any,
    run_dir: str,
    trials: list[TrialSummary],
    concurrent: int,
    restore: bool,
    pool: Any,
    sweep_budget: Budget | None,
    echo: Callable[[str], None],
    tracker: Any = None,
) -> dict[str, Any]:
    """Retrain the sweep's best configs on new seeds (a second Tune experiment, on the
    sweep's warm groups ``pool`` when it has them); summary.json's ``reevaluation``.
    ``restore``: go on with an interrupted one. ``tracker``: the sweep's MLflow runs,
    which get a nested run per retraining (``reevaluate/trial_<n>``)."""
    from tune_jobs.budget import budget_of, gpus_per_trial
    from tune_jobs.report_log import read_all_reports
    from tune_jobs.results import summarize_trial, trial_dir
    from tune_jobs.run import build_tuner

    metric, mode = spec.search.metric, spec.search.resolved_mode
    top = spec.search.reevaluate
    cands = candidates(trials, metric, mode, top.top_k)
    seeds = seeds_of(spec)
    base: dict[str, Any] = {
        "top_k": top.top_k,
        "seeds": seeds,
        "sweep_choice": cands[0].trial if cands else None,
    }
    cost = price_s(cands, len(seeds), concurrent)
    limits = None
    if sweep_budget is not None:
        limits, why = remaining_budget(
            spec.search.budget, sweep_budget.spent(), cost, gpus_per_trial(spec)
        )
        if why is not None:
            return {**base, "skipped": f"the budget cannot buy it: {why}"}
    pts = points(cands, seeds)
    again = reevaluation_spec(spec, len(pts))
    here = storage.join(run_dir, FOLDER)
    echo(
        f"reevaluate: the top {len(cands)} config(s) x {len(seeds)} new seeds {seeds} = "
        f"{len(pts)} trainings, {concurrent} at once (about {cost[0] / HOUR:.2g} trial-hours); "
        f"folder {here}"
    )
    budget = None
    if limits is not None:
        longest = max(c.trial_s for c in cands)
        budget = Budget(limits, gpus_per_trial(spec), longest)
    restore = restore and storage.exists(storage.join(here, "tuner.pkl"))
    tuner, _, live = build_tuner(
        again,
        data_ref,
        run_dir,
        FOLDER,
        concurrent,
        restore,
        pts,
        budget=budget,
        space=space_of(pts),
        pool=pool,
        tracker=tracker,
        trial_prefix=f"{FOLDER}/",
    )
    budget = budget_of(tuner)
    try:
        grid = tuner.fit()
    finally:
        if live is not None:
            live.close()
    reports = read_all_reports(here)
    mine = [summarize_trial(r, metric, mode, reports.get(trial_dir(r), [])) for r in grid]
    configs = {trial_dir(r): dict(r.config or {}) for r in grid}
    scored = score(cands, mine, configs, metric)
    verdict = decide(scored, mode) or {}
    out = {
        **base,
        **verdict,
        "configs": [s.as_dict() for s in scored],
        "trials": {t.trial: {"status": t.status, "config": configs[t.trial]} for t in mine},
        "failed": {t.trial: t.error for t in mine if t.status == "ERROR"},
        "trial_seconds": round(sum(float(t.last.get("time_total_s") or 0.0) for t in mine), 1),
        "budget": budget.bought() if budget is not None else None,
    }
    chosen = verdict.get("chosen")
    if chosen and spec.training.save_checkpoints:
        from tune_jobs.leader import read_leader

        leader = read_leader(here, chosen)
        if leader is not None:
            out["export"] = {
                "trial": leader["trial"],
                "seed": int(configs[leader["trial"]][SEED]),
                "uri": leader["uri"],
                "metrics": leader["metrics"],
            }
    return out


def prune(run_dir: str, reeval: Mapping[str, Any]) -> None:
    """Once exported, the retrainings' checkpoints serve nothing but the exported one's
    (``results.prune_train_runs``: one that errored keeps its own)."""
    keep = {(reeval.get("export") or {}).get("trial")} - {None}
    statuses = {name: t["status"] for name, t in (reeval.get("trials") or {}).items()}
    prune_train_runs(layout.train_runs(storage.join(run_dir, FOLDER)), statuses, keep)
