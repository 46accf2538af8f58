"""search.budget: the smoke estimate, the refusal of a budget that buys no trial, and the
budget's gate and stop on a real local Ray Tune.

The Tune runs here use a plain function as the trial (it reports every 0.3 s, no
fine-tuning), so what the budget decides is seen in seconds; the same budget on real
trials is in tests/e2e/test_budget.py.
"""

from __future__ import annotations

import time

import pytest
from ray import tune

from tune_jobs.budget import HOUR, Budget, TrialCost, check_affordable, gate
from tune_jobs.schedulers import build_scheduler, build_search_alg
from tune_jobs.space import param_space
from tune_jobs.spec import SpecError, parse_spec

REPORT_EVERY_S = 0.3


def test_the_smoke_reports_give_startup_and_seconds_per_example():
    # trial A: 8 examples a step, reports at steps 2 and 4 at 5.0 s and 6.0 s
    # -> 0.5 s a step, 1/16 s an example, 4.0 s to start; trial B is slower
    def row(step, clock):
        return {"step": step, "time_total_s": clock, "effective_batch_size": 8}

    reports = {
        "trial_0": [row(2, 5.0), row(4, 6.0)],
        "trial_1": [row(2, 9.0), row(4, 11.0)],
        "trial_2": [row(2, 1.0)],  # one report: no rate
    }
    cost = TrialCost.of_reports(reports)
    assert cost == TrialCost(startup_s=4.0, per_example_s=1 / 16)
    assert cost.seconds(160) == pytest.approx(14.0)
    assert TrialCost.of_reports({"trial_2": reports["trial_2"]}) is None


def _spec(**budget):
    return parse_spec(
        {
            "training": {"num_train_epochs": 2},
            "search": {
                "num_samples": 4,
                "space": {"num_train_epochs": {"choice": [1, 2, 3]}},
                "budget": budget,
            },
        }
    )


def test_a_budget_that_buys_no_trial_is_refused_with_the_estimate():
    cost = TrialCost(startup_s=10.0, per_example_s=0.05)
    # the shortest trial of the space: 1 epoch of 1,000 rows -> 10 + 50 = 60 s
    with pytest.raises(SpecError) as err:
        check_affordable(_spec(trial_hours=0.01), 1000, cost)
    text = str(err.value)
    assert "search.budget.trial_hours" in text and "got 0.01" in text
    assert "one trial costs about 60 s" in text and "1000 examples" in text
    assert "give at least 0.017" in text  # 60 s = 0.01667 h, rounded up
    assert check_affordable(_spec(trial_hours=0.017), 1000, cost) == pytest.approx(60.0)
    assert check_affordable(_spec(trial_hours=0.01), 1000, None) is None  # nothing measured
    assert check_affordable(_spec(), 1000, cost) is None  # no budget


def test_gpu_hours_need_a_trial_that_reserves_a_gpu():
    with pytest.raises(SpecError) as err:
        _spec(accelerator_hours=2)
    assert "search.budget.accelerator_hours" in str(err.value)
    assert "trial_hours" in str(err.value)


def _trial(config):
    for step in range(1, config["reports"] + 1):
        time.sleep(REPORT_EVERY_S)
        tune.report({"eval_accuracy": step / 100, "step": step})


def _sweep(tmp_path, name, budget: Budget, reports: int, num_samples: int = 4):
    spec = parse_spec(
        {
            "search": {
                "num_samples": num_samples,
                "space": {"learning_rate": {"loguniform": [1e-5, 1e-3]}},
            },
            "scheduler": {"type": "fifo"},
        }
    )
    said: list[str] = []
    budget.say = said.append
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": 1}),
        param_space={**param_space(spec), "reports": reports},
        tune_config=tune.TuneConfig(
            metric="eval_accuracy",
            mode="max",
            num_samples=num_samples,
            search_alg=gate(build_search_alg(spec, [], max_concurrent=1), budget),
            scheduler=build_scheduler(spec),
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(tmp_path), verbose=0, stop=budget, callbacks=[budget]
        ),
    )
    return list(tuner.fit()), said


def test_no_trial_starts_that_the_budget_cannot_pay_for(local_ray, tmp_path):
    # one trial: 10 reports, about 3 s. A budget of 1.5 trials: after the first ends, the
    # second would need 2 trials' worth (the ended one's cost is what a trial costs)
    spec = _spec(trial_hours=4.5 / HOUR)
    budget = Budget(spec.search.budget)
    results, said = _sweep(tmp_path, "gate", budget, reports=10)
    assert len(results) == 1, [r.metrics for r in results]
    assert results[0].metrics["step"] == 10  # the trial that started ran to its end
    bought = budget.bought()
    assert bought["ended_by"] is None and bought["stopped_at_limit"] == []
    assert bought["no_more_trials"].startswith("trial-hours 0.00125:")
    assert said == [f"budget: no more trials: {bought['no_more_trials']}"]
    assert bought["spent"]["trial_hours"] < 4.5 / HOUR


def test_running_trials_stop_at_the_limit(local_ray, tmp_path):
    # one trial would report 40 times (12 s); the budget pays for 2 s of it
    spec = _spec(trial_hours=2 / HOUR)
    budget = Budget(spec.search.budget)
    results, said = _sweep(tmp_path, "limit", budget, reports=40)
    assert len(results) == 1
    stopped_at = results[0].metrics["step"]
    assert 2 <= stopped_at < 40
    bought = budget.bought()
    assert bought["ended_by"].startswith(f"trial-hours {2 / HOUR:g} spent")
    assert bought["stopped_at_limit"] == ["trial_00000"]
    assert (
        said[0].startswith(f"budget: trial-hours {2 / HOUR:g} spent") and "trial_00000" in said[0]
    )
    # stopped at its next report: at most a report's time past the limit
    assert bought["spent"]["trial_hours"] * HOUR < 2 + 2 * REPORT_EVERY_S + 1.0
    # the sweep is over: what comes after it (the export) is not counted
    time.sleep(1.0)
    assert budget.bought()["spent"] == bought["spent"]
