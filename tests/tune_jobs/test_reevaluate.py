"""search.reevaluate's arithmetic and checks (the retraining itself: tests/e2e/test_reevaluate.py)."""

from __future__ import annotations

import math
import statistics

import pytest

from trainers import metrics as M
from tune_jobs import layout, reevaluate
from tune_jobs.results import TrialSummary
from tune_jobs.space import REEVALUATES, SEED
from tune_jobs.spec import BudgetSpec, SpecError, parse_spec


def _trial(name, lr, loss, step=10, total=10, seconds=20.0, status="TERMINATED"):
    last = {M.STEP: step, M.TOTAL_STEPS: total, "time_total_s": seconds, M.EVAL_LOSS: loss}
    return TrialSummary(
        name, status, {"learning_rate": lr}, {M.EVAL_LOSS: loss}, last, 1, step < total
    )


def test_candidates_are_the_best_distinct_configs_priced_at_a_full_training():
    trials = [
        _trial("trial_00000", 1e-5, 0.60),
        _trial("trial_00001", 3e-5, 0.40, step=5, seconds=12.0),  # stopped at half its budget
        _trial("trial_00002", 3e-5, 0.45),  # the same config again: not a second candidate
        _trial("trial_00003", 1e-4, 0.50),
        _trial("trial_00004", 1e-3, None, status="ERROR"),
    ]
    got = reevaluate.candidates(trials, M.EVAL_LOSS, "min", 2)
    assert [(c.trial, c.sweep_value) for c in got] == [("trial_00001", 0.40), ("trial_00003", 0.50)]
    assert got[0].trial_s == pytest.approx(24.0)  # 12 s for 5 of 10 steps
    assert got[1].trial_s == pytest.approx(20.0)


def test_points_carry_the_seed_and_the_config_they_retrain_and_nothing_else():
    spec = parse_spec(
        {
            "search": {
                "space": {"learning_rate": {"grid": [1e-5, 3e-5]}},
                "reevaluate": {"top_k": 2, "seeds": 3},
            },
            "run": {"seed": 10},
        },
        source="test",
    )
    assert reevaluate.seeds_of(spec) == [11, 12, 13]
    cands = [reevaluate.Candidate("trial_00001", {"learning_rate": 3e-5}, 0.4, 1.0)]
    pts = reevaluate.points(cands, [11, 12])
    assert pts == [
        {"learning_rate": 3e-5, SEED: 11, REEVALUATES: "trial_00001"},
        {"learning_rate": 3e-5, SEED: 12, REEVALUATES: "trial_00001"},
    ]
    from tune_jobs.space import trial_hparams

    hp = trial_hparams(spec, pts[0])
    assert hp["learning_rate"] == 3e-5 and SEED not in hp and REEVALUATES not in hp
    # the retraining's spec: every point to the end, nothing but the points
    again = reevaluate.reevaluation_spec(spec, len(pts))
    assert again.scheduler.type == "fifo" and again.search.num_samples == 2
    assert not again.search.start_with_defaults and not again.search.reevaluate.enabled
    assert again.training == spec.training and again.run.seed == 10
    # a sweep that evaluated at ASHA's rungs: its retraining evaluates at the same points
    rungs = parse_spec(
        {
            "training": {"eval_strategy": "rungs", "eval_at": [0.25, 0.75]},
            "search": {"space": {"learning_rate": {"grid": [1e-5, 3e-5]}}},
            "scheduler": {"type": "asha", "grace_period": 0.25, "reduction_factor": 3},
        },
        source="test",
    )
    assert reevaluate.reevaluation_spec(rungs, 4).training.eval_at == [0.25, 0.75]


def test_the_choice_is_the_best_mean_and_its_lead_is_weighed_against_seed_noise():
    cands = [
        reevaluate.Candidate("trial_00001", {"learning_rate": 3e-5}, 0.90, 1.0),  # lucky
        reevaluate.Candidate("trial_00002", {"learning_rate": 1e-4}, 0.85, 1.0),
    ]
    configs = {
        "trial_00000": {SEED: 1, REEVALUATES: "trial_00001"},
        "trial_00001": {SEED: 2, REEVALUATES: "trial_00001"},
        "trial_00002": {SEED: 1, REEVALUATES: "trial_00002"},
        "trial_00003": {SEED: 2, REEVALUATES: "trial_00002"},
        "trial_00004": {SEED: 3, REEVALUATES: "trial_00002"},  # stopped by a budget: left out
    }
    mine = [
        TrialSummary("trial_00000", "TERMINATED", {}, {M.EVAL_ACCURACY: 0.80}, {}, 1, False),
        TrialSummary("trial_00001", "TERMINATED", {}, {M.EVAL_ACCURACY: 0.82}, {}, 1, False),
        TrialSummary("trial_00002", "TERMINATED", {}, {M.EVAL_ACCURACY: 0.86}, {}, 1, False),
        TrialSummary("trial_00003", "TERMINATED", {}, {M.EVAL_ACCURACY: 0.84}, {}, 1, False),
        TrialSummary("trial_00004", "TERMINATED", {}, {M.EVAL_ACCURACY: 0.99}, {}, 1, True),
    ]
    scored = reevaluate.score(cands, mine, configs, M.EVAL_ACCURACY)
    assert [s.values for s in scored] == [{1: 0.80, 2: 0.82}, {1: 0.86, 2: 0.84}]
    verdict = reevaluate.decide(scored, "max")
    # the sweep's pick (0.90 on its one seed) is not the best on new seeds
    assert verdict["chosen"] == "trial_00002" and verdict["runner_up"] == "trial_00001"
    assert verdict["lead"] == pytest.approx(0.04)
    sd = statistics.stdev([0.80, 0.82])  # both configs' spread is the same here
    assert verdict["noise_se"] == pytest.approx(math.sqrt(2 * sd**2 / 2))
    assert verdict["lead_exceeds_noise"] is True  # 0.04 > 2 x 0.0141
    lines = reevaluate.describe(
        {
            "seeds": [1, 2],
            "sweep_choice": "trial_00001",
            **verdict,
            "configs": [s.as_dict() for s in scored],
        },
        M.EVAL_ACCURACY,
    )
    assert "  trial_00002: sweep 0.8500, new seeds 0.8500 ± 0.0141 (n=2)  <- chosen" in lines
    assert any("beyond the seed noise" in line for line in lines)
    assert any("the sweep's pick trial_00001 was not the best on new seeds" in x for x in lines)
    # the same lead inside a wider spread is within the noise
    wide = [
        reevaluate.Scored("a", {}, 0.9, {1: 0.70, 2: 0.90}),
        reevaluate.Scored("b", {}, 0.9, {1: 0.70, 2: 0.82}),
    ]
    assert reevaluate.decide(wide, "max")["lead_exceeds_noise"] is False


def test_the_retraining_runs_only_if_the_budget_left_buys_all_of_it():
    cands = [
        reevaluate.Candidate("a", {}, 0.5, 100.0),
        reevaluate.Candidate("b", {}, 0.5, 60.0),
    ]
    # 2 seeds: trainings 100, 100, 60, 60 s; two at once: waves of 100 and 60 s
    assert reevaluate.price_s(cands, 2, 2) == (320.0, 160.0)
    limits = BudgetSpec(trial_hours=0.2, wall_hours=1.0)  # 720 trial-s
    spent = {"trial_hours": 0.05, "accelerator_hours": 0.0, "wall_hours": 0.1}
    left, why = reevaluate.remaining_budget(limits, spent, (320.0, 160.0), 0.0)
    assert why is None
    assert left.trial_hours == pytest.approx(0.15) and left.wall_hours == pytest.approx(0.9)
    spent["trial_hours"] = 0.15  # 180 trial-s left: 320 do not fit
    left, why = reevaluate.remaining_budget(limits, spent, (320.0, 160.0), 0.0)
    assert left is None and "needs about 0.0889 trial-hours and 0.05 are left" in why


@pytest.mark.parametrize(
    ("extra", "hint"),
    [
        (
            {
                "scheduler": {
                    "type": "pbt",
                    "perturbation_interval": 1,
                    "mutations": {"learning_rate": {"loguniform": [1e-5, 1e-4]}},
                },
                "search": {"num_samples": 4, "reevaluate": {"top_k": 2}},
            },
            "hyperparameters change as it trains",
        ),
        ({"search": {"num_samples": 2, "reevaluate": {"top_k": 3}}}, "at most 2"),
    ],
)
def test_a_reevaluation_that_cannot_be_done_is_refused_naming_the_key(extra, hint):
    with pytest.raises(SpecError) as err:
        parse_spec(extra, source="test")
    assert "search.reevaluate.top_k" in str(err.value) and hint in str(err.value)


def test_a_retrained_checkpoint_is_named_by_its_folder():
    run = "s3://b/runs/sweep"
    assert layout.trial_of(f"{run}/train_runs/trial_00002/start0/checkpoint_8") == "trial_00002"
    assert (
        layout.trial_of(f"{run}/reevaluate/train_runs/trial_00002/start0/checkpoint_8")
        == "reevaluate/trial_00002"
    )
    assert (
        layout.leader_file(run, "trial_00001").endswith(
            "reevaluate/train_runs/leader-trial_00001.json"
        )
        is False
    )  # the key names the file, the caller names the folder
    assert layout.leader_file(run, "trial_00001") == f"{run}/train_runs/leader-trial_00001.json"
