"""The promotion decision and the paired test behind it."""

from __future__ import annotations

import pytest

from tune_jobs.promotion import decide, mcnemar_p


def test_first_retrain_promotes_and_ties_keep_the_champion():
    assert decide(0.70, None, 0.01).promote
    tie = decide(0.80, 0.80, 0.0)
    assert not tie.promote and "ties keep the champion" in tie.reason


def test_a_gain_must_reach_min_improvement():
    assert not decide(0.805, 0.80, 0.01).promote
    assert decide(0.82, 0.80, 0.01).promote
    worse = decide(0.75, 0.80, 0.0)
    assert not worse.promote and "does not beat" in worse.reason


def test_mcnemar_counts_only_the_rows_exactly_one_model_gets_right():
    champion = [True] * 50 + [False] * 50
    same = list(champion)
    assert mcnemar_p(champion, same) == 1.0
    # the challenger fixes 20 of the champion's mistakes and breaks 2 of its successes
    better = [True] * 48 + [False] * 2 + [True] * 20 + [False] * 30
    p = mcnemar_p(champion, better)
    assert p < 0.001
    assert decide(0.68, 0.50, 0.0, p_value=p, alpha=0.05).promote
    # a small gain on few discordant rows is not significant
    slight = [True] * 49 + [False] + [True] * 3 + [False] * 47
    p_slight = mcnemar_p(champion, slight)
    assert p_slight > 0.05
    kept = decide(0.52, 0.50, 0.0, p_value=p_slight, alpha=0.05)
    assert not kept.promote and "not significant" in kept.reason
    with pytest.raises(ValueError):
        mcnemar_p([True], [True, False])
