"""``trainers.metrics``: the one place that says which of two values is better."""

from __future__ import annotations

import math

import pytest

from trainers import metrics as M


@pytest.mark.parametrize(
    ("value", "than", "mode", "beats"),
    [
        (0.8, 0.7, "max", True),
        (0.7, 0.8, "max", False),
        (0.3, 0.4, "min", True),
        (0.4, 0.3, "min", False),
        (0.5, 0.5, "max", False),  # a tie does not beat
        (0.5, None, "min", True),  # anything beats nothing yet
        (0.5, math.nan, "max", True),
        (None, 0.5, "max", False),  # a missing value beats nothing
        (math.nan, None, "min", False),
    ],
)
def test_better(value, than, mode, beats):
    assert M.better(value, than, mode) is beats


def test_gain_is_positive_when_better():
    assert M.gain(0.8, 0.7, "max") == pytest.approx(0.1)
    assert M.gain(0.3, 0.4, "min") == pytest.approx(0.1)
    assert M.gain(0.4, 0.3, "min") == pytest.approx(-0.1)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_rank_sorts_the_best_first_and_missing_last(mode):
    values = [0.5, None, 0.9, math.nan, 0.1]
    ranked = sorted(values, key=lambda v: M.rank(v, mode))
    assert ranked[:3] == ([0.9, 0.5, 0.1] if mode == "max" else [0.1, 0.5, 0.9])
    assert all(v is None or math.isnan(v) for v in ranked[3:])
