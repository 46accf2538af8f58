"""``checkpoint_writes``: the one checkpoint policy of every trial (warm group or single process)."""

from __future__ import annotations

import pytest

from tune_jobs.warm import Writes, checkpoint_writes


def _writes(value, held, since_full_s=10.0, every_s=900.0, mode="min", **kw):
    asked = []

    def leads() -> bool:
        asked.append(value)
        return kw.pop("leads", False)

    out = checkpoint_writes(
        value,
        held=held,
        since_full_s=since_full_s,
        population=kw.pop("population", False),
        every_s=every_s,
        sharded=kw.pop("sharded", False),
        mode=mode,
        leads_sweep=leads,
    )
    return out, asked


@pytest.mark.parametrize(
    ("case", "args", "expected"),
    [
        # the trial's first evaluation is its best so far: held, nothing written yet
        ("first", (0.7, None), Writes(full=False, best=True, hold=True, lead_now=False)),
        # better than the held one (lower loss): replaces it in memory
        ("better", (0.6, 0.7), Writes(full=False, best=True, hold=True, lead_now=False)),
        # worse: nothing at all
        ("worse", (0.8, 0.7), Writes(full=False, best=False, hold=False, lead_now=False)),
        # a tie is not better: the earlier evaluation stays held
        ("tie", (0.7, 0.7), Writes(full=False, best=False, hold=False, lead_now=False)),
    ],
)
def test_the_best_evaluation_is_held_not_written(case, args, expected):
    assert _writes(*args)[0] == expected, case


def test_higher_is_better_under_max():
    assert _writes(0.8, 0.7, mode="max")[0].best
    assert not _writes(0.6, 0.7, mode="max")[0].best


def test_a_full_checkpoint_is_due_every_interval_and_then_the_best_is_not_held():
    due, _ = _writes(0.6, 0.7, since_full_s=900.0)
    assert due == Writes(full=True, best=True, hold=False, lead_now=False)  # written, in full
    assert _writes(0.8, 0.7, since_full_s=900.0)[0] == Writes(True, False, False, False)
    assert _writes(0.8, 0.7, since_full_s=899.9)[0].full is False
    # 0: every evaluation
    assert _writes(0.8, 0.7, since_full_s=0.0, every_s=0)[0].full is True


def test_a_population_writes_every_evaluation_and_holds_nothing():
    out, asked = _writes(0.6, 0.7, population=True)
    assert out == Writes(full=True, best=False, hold=False, lead_now=False)
    assert asked == []  # the export takes Tune's record of the best trial's checkpoints


def test_sharded_weights_are_written_when_they_lead_the_sweep_never_held():
    out, asked = _writes(0.6, None, sharded=True, leads=True)
    assert out == Writes(full=False, best=False, hold=False, lead_now=True)
    assert asked == [0.6]  # the sweep was asked
    out, _ = _writes(0.9, None, sharded=True, leads=False)
    assert out == Writes(full=False, best=False, hold=False, lead_now=False)
    out, _ = _writes(0.9, None, sharded=True, leads=False, since_full_s=900.0)
    assert out == Writes(full=True, best=False, hold=False, lead_now=False)


def test_only_a_sharded_trial_asks_the_sweep():
    assert _writes(0.6, 0.7)[1] == []
