"""Start small as a fidelity: the first rung from the data size, the rung metric, the
evaluations at the rungs only (the loop's steps on a tiny BERT), and ASHA deciding on
the loss while the run's metric is accuracy (on a real local Ray Tune)."""

from __future__ import annotations

import pytest
from ray import tune

from tests.conftest import worker_config
from trainers import metrics as M
from trainers.config import HParams
from trainers.data import screen_sample as sample_of
from trainers.loop import evaluation_points, next_evaluation, run_local, screening_through
from tune_jobs import fidelity
from tune_jobs.schedulers import RungASHA, build_scheduler
from tune_jobs.spec import SpecError, parse_spec


def _spec(**sections):
    base = {
        "training": {"num_train_epochs": 3},
        "search": {"metric": "eval_accuracy"},
        "scheduler": {"type": "asha", "reduction_factor": 3},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return parse_spec(base)


@pytest.mark.parametrize(
    ("rows", "rung"),
    [
        (800, 0.25),  # 256 / 800 = 0.32 epochs -> the nearest power of two
        (100_000, 1 / 64),  # 0.0026 epochs: the smallest first rung
        (4_000, 1 / 16),
        (100, 0.25),  # a whole epoch would leave no room for rungs below max_t = 3
    ],
)
def test_the_first_rung_holds_about_256_examples_and_leaves_three_rungs(rows, rung):
    spec = _spec()
    assert fidelity.first_rung(spec, rows, max_t=3.0) == rung
    points = fidelity.rungs(rung, 3, 3.0)
    assert len(points) >= 3 or points[-1] * 3 >= 3.0 / 3


def test_rungs_in_steps_from_the_examples_a_step_takes():
    spec = _spec(
        training={"max_steps": 900, "per_device_train_batch_size": 16},
        scheduler={"time_attr": "step"},
    )
    assert fidelity.first_rung(spec, 10_000, max_t=900) == 16  # 256 examples / 16
    assert fidelity.rungs(16, 3, 900) == [16, 48, 144, 432]


def test_accuracy_is_decided_on_the_loss_unless_told_otherwise():
    assert fidelity.rung_metric(_spec()) == ("eval_loss", "min")
    assert fidelity.rung_metric(_spec(scheduler={"rung_metric": "eval_f1"})) == ("eval_f1", "max")
    assert fidelity.rung_metric(_spec(search={"metric": "eval_loss"})) == ("eval_loss", "min")
    with pytest.raises(SpecError, match="scheduler.rung_metric"):
        _spec(scheduler={"rung_metric": "eval_perplexity"})


def test_resolve_fills_the_first_rung_and_the_evaluation_points():
    spec = fidelity.resolve(_spec(training={"eval_strategy": "rungs"}), 800)
    assert spec.scheduler.grace_period == 0.25
    assert spec.training.eval_at == [0.25, 0.75, 2.25]
    assert spec.training.eval_at_unit == "epoch"
    assert fidelity.resolve(spec, 800) is spec  # nothing left to resolve
    with pytest.raises(SpecError, match="training.eval_strategy"):
        _spec(training={"eval_strategy": "rungs"}, scheduler={"type": "fifo"})


def test_the_evaluations_fall_on_the_rungs_and_the_end():
    hp = HParams.from_dict(
        {
            **parse_spec({}).training.model_dump(),
            "eval_strategy": "rungs",
            "eval_at": [0.25, 0.75, 2.25],
        }
    )
    at = evaluation_points(25, 75, hp)  # 25 steps an epoch, 3 epochs
    assert at == (7, 19, 57)  # the first step at or past each rung
    steps, step = [], 0
    while step < 75:
        step = next_evaluation(step, 75, 75, at)
        steps.append(step)
    assert steps == [7, 19, 57, 75]


def test_the_loop_evaluates_only_at_the_rungs(rt_small, tiny_bert, tmp_path):
    cfg = worker_config(
        rt_small, model=tiny_bert, per_device_train_batch_size=16, num_train_epochs=2
    )
    cfg["hp"].update(eval_strategy="rungs", eval_at=[0.25, 0.75], eval_at_unit="epoch")
    ctx = run_local(cfg, checkpoint_root=str(tmp_path))
    # rt_small: 10 steps an epoch at batch 16 -> rungs at steps 3 and 8, the end at 20
    assert [r[M.STEP] for r in ctx.reports] == [3, 8, 20]


@pytest.mark.parametrize(
    ("rung_rows", "n_validation", "screened"),
    [
        ("auto", 400, 0),  # below 512 validation rows: every rung scores every row
        ("auto", 1000, 256),
        (100, 300, 100),
        (300, 300, 0),  # a sample of every row is every row
        (0, 4000, 0),
    ],
)
def test_every_rung_but_the_last_scores_a_sample_of_the_validation_rows(
    rung_rows, n_validation, screened
):
    spec = _spec(training={"eval_strategy": "rungs"}, scheduler={"rung_rows": rung_rows})
    resolved = fidelity.resolve(spec, 800, n_validation)
    assert resolved.training.eval_at == [0.25, 0.75, 2.25]
    assert resolved.training.screen_rows == screened
    assert resolved.training.screen_until == (0.75 if screened else 0)
    # the loop's side: 25 steps an epoch, 3 epochs; rungs at steps 7, 19, 57
    hp = HParams.from_dict(resolved.training.model_dump())
    assert screening_through(25, 75, hp) == (19 if screened else 0)
    # without evaluations at the rungs nothing is screened
    assert fidelity.resolve(_spec(scheduler={"rung_rows": 100}), 800, 300).training.screen_rows == 0


def test_a_screened_evaluation_scores_the_sample_and_changes_no_training(
    rt_small, tiny_bert, tmp_path
):
    """The same trial with and without screening: the same weights at every evaluation
    (fingerprints), the rung before the last on 24 of the 80 validation rows (another
    score), the last rung and the end on every row (the same scores)."""
    cfg = worker_config(
        rt_small, model=tiny_bert, per_device_train_batch_size=16, num_train_epochs=2
    )
    cfg["hp"].update(eval_strategy="rungs", eval_at=[0.25, 0.75], eval_at_unit="epoch")
    cfg["fingerprint_weights"] = True
    plain = run_local(cfg, checkpoint_root=str(tmp_path / "plain")).reports
    cfg["hp"].update(screen_rows=24, screen_until=0.25)
    screened = run_local(cfg, checkpoint_root=str(tmp_path / "screened")).reports
    assert [r[M.STEP] for r in screened] == [r[M.STEP] for r in plain] == [3, 8, 20]
    assert [r[M.WEIGHTS] for r in screened] == [r[M.WEIGHTS] for r in plain]
    assert [(r[M.EVAL_ROWS], r[M.SCREENED]) for r in screened] == [(24, 1), (80, 0), (80, 0)]
    assert [(r[M.EVAL_ROWS], r[M.SCREENED]) for r in plain] == [(80, 0)] * 3
    assert screened[0][M.EVAL_LOSS] != plain[0][M.EVAL_LOSS]
    for a, b in zip(screened[1:], plain[1:], strict=True):
        assert (a[M.EVAL_LOSS], a[M.EVAL_ACCURACY]) == (b[M.EVAL_LOSS], b[M.EVAL_ACCURACY])
    assert sample_of(80, 24) == sample_of(80, 24) != list(range(24))  # fixed, not a prefix


def test_a_screened_score_is_never_a_trials_best_nor_the_export_candidate():
    from tune_jobs.results import TrialSummary, best_trial, summarize_trial
    from tune_jobs.warm import checkpoint_writes

    class Result:
        config, error, path = {}, None, "/x/trial_00000"

    rows = [
        {M.STEP: 3, M.EVAL_LOSS: 0.40, M.SCREENED: 1, M.EVAL_ROWS: 24, M.TOTAL_STEPS: 20},
        {M.STEP: 8, M.EVAL_LOSS: 0.55, M.SCREENED: 0, M.EVAL_ROWS: 80, M.TOTAL_STEPS: 20},
    ]
    assert summarize_trial(Result(), M.EVAL_LOSS, "min", rows).best[M.STEP] == 8
    stopped = summarize_trial(Result(), M.EVAL_LOSS, "min", rows[:1])  # stopped at the rung
    assert stopped.best[M.STEP] == 3 and stopped.stopped_early

    def trial(name: str, best: dict) -> TrialSummary:
        return TrialSummary(name, "TERMINATED", {}, best, best, 1, False)

    # a sample's 0.40 beats nobody whose score is on every row
    finished = [trial("trial_00000", rows[0]), trial("trial_00001", rows[1])]
    assert best_trial(finished, M.EVAL_LOSS, "min", None).trial == "trial_00001"
    kwargs = dict(held=None, since_full_s=0, population=False, every_s=60, sharded=False)
    assert checkpoint_writes(0.40, mode="min", leads_sweep=lambda: True, **kwargs).best
    writes = checkpoint_writes(None, mode="min", leads_sweep=lambda: True, **kwargs)
    assert not (writes.best or writes.hold or writes.lead_now)
    sharded = {**kwargs, "sharded": True}
    assert not checkpoint_writes(None, mode="min", leads_sweep=lambda: True, **sharded).lead_now


def test_searching_the_epochs_under_asha_is_noted():
    searched = {"search": {"space": {"num_train_epochs": {"choice": [1, 2, 3]}}}}
    note = fidelity.budget_searched_note(_spec(**searched))
    assert note and note.startswith("note: search.space.num_train_epochs under ASHA")
    assert "fixing training.num_train_epochs" in note
    assert fidelity.budget_searched_note(_spec()) is None  # the epochs fixed
    assert fidelity.budget_searched_note(_spec(**searched, scheduler={"type": "fifo"})) is None


def test_the_scheduler_keeps_its_own_metric():
    sched = build_scheduler(_spec())
    assert isinstance(sched, RungASHA)
    assert sched.set_search_properties("eval_accuracy", "max")
    assert (sched._metric, sched._mode) == ("eval_loss", "min")


def _tied(config):
    # every trial ties on accuracy (the majority baseline) while its loss differs
    for epoch in (0.25, 0.5, 0.75, 1.0):
        tune.report({"epoch": epoch, "eval_accuracy": 0.5, "eval_loss": config["loss"] + 1 - epoch})


def test_asha_stops_the_trials_whose_loss_is_worse_when_accuracy_ties(local_ray, tmp_path):
    spec = _spec(
        training={"num_train_epochs": 1}, scheduler={"grace_period": 0.25, "reduction_factor": 2}
    )
    tuner = tune.Tuner(
        tune.with_resources(_tied, {"CPU": 1}),
        param_space={"loss": tune.grid_search([0.1, 0.9, 0.2, 0.8])},
        tune_config=tune.TuneConfig(
            metric="eval_accuracy",
            mode="max",
            scheduler=build_scheduler(spec),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(name="tied", storage_path=str(tmp_path), verbose=0),
    )
    ran = {r.config["loss"]: r.metrics["epoch"] for r in tuner.fit()}
    # on accuracy alone every trial ties and none would stop; on the loss the worst two stop
    # at the first rung, the second best at the second (worse than the best there), and the
    # best trains to the end
    assert ran == {0.1: 1.0, 0.9: 0.25, 0.2: 0.5, 0.8: 0.25}


def _slow_tied(config):
    import time

    for epoch in (0.25, 0.5, 0.75, 1.0):
        time.sleep(0.3)
        tune.report({"epoch": epoch, "eval_accuracy": 0.5, "eval_loss": config["loss"] + 1 - epoch})


def test_no_trial_passes_a_rung_alone(local_ray, tmp_path):
    """The first two trials are the worst. Plain ASHA lets the first to reach a rung pass
    it; with rung_peers 2 they wait (paused) until a third has reported there, and stop."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = _spec(
        training={"num_train_epochs": 1},
        scheduler={"grace_period": 0.25, "reduction_factor": 3, "rung_peers": 2},
    )
    tuner = tune.Tuner(
        tune.with_resources(_slow_tied, {"CPU": 1}),
        param_space={"loss": tune.grid_search([0.9, 0.8, 0.1, 0.2, 0.3, 0.7])},
        tune_config=tune.TuneConfig(
            metric="eval_accuracy",
            mode="max",
            scheduler=build_scheduler(spec),
            # 2 run at once (2 CPUs); the generator leaves room for the 2 that wait
            search_alg=BasicVariantGenerator(max_concurrent=4),
        ),
        run_config=tune.RunConfig(name="peers", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    ran = {r.config["loss"]: r.metrics["epoch"] for r in results}
    assert all(r.error is None for r in results)
    assert ran[0.9] == 0.25 and ran[0.8] == 0.25, ran  # waited, then stopped at the rung
    assert ran[0.1] == 1.0, ran  # the best trains to the end
    assert sum(epoch == 1.0 for epoch in ran.values()) <= 2, ran
