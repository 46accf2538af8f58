"""Consider task similarity: the linear probe on the frozen MiniLM, on three tasks built
from the shipped Rotten Tomatoes corpus, and what it chooses for each.

- sentiment (fresh / rotten, the shipped task): sentence embeddings carry part of it;
- plot summary or review (the corpus's third category): they carry it nearly whole;
- the first letter of the movie's title (a-m or n-z) for a review: nothing in a
  sentence's meaning says it, a 180-degree turn for the model.
"""

from __future__ import annotations

import pandas as pd
import pytest

from trainers.data import rotten_tomatoes_path
from trainers.probe import balanced_accuracy
from tune_jobs import probe
from tune_jobs.preflight import load_data
from tune_jobs.run import defaults_points
from tune_jobs.spec import SpecError, parse_spec

SPACE = {"learning_rate": {"loguniform": [1e-5, 1e-4]}, "weight_decay": {"choice": [0.0, 0.01]}}


def _task(tmp_path, name):
    frame = pd.read_csv(rotten_tomatoes_path()).drop_duplicates("text")
    if name == "plot_or_review":
        frame = frame.assign(label=frame["category"].where(frame["category"] == "plot", "review"))
    else:
        frame = frame[frame["category"] != "plot"]
        first = frame["movie_name"].str.lower().str[0]
        frame = frame.assign(label=first.between("a", "m").map({True: "a-m", False: "n-z"}))
    path = tmp_path / f"{name}.csv"
    frame[["text", "label"]].sample(n=1200, random_state=0).to_csv(path, index=False)
    return {"source": "csv", "path": str(path)}


def _measure(data):
    spec = parse_spec({"data": data, "search": {"probe": True, "space": SPACE}})
    return spec, probe.measure(spec, load_data(spec))


def test_the_shipped_task_is_related(tmp_path):
    spec, sim = _measure({"source": "rotten_tomatoes", "max_train_samples": 800})
    assert 0.15 <= sim.closeness < 0.55 and sim.verdict == "related", sim
    assert sim.chance == 0.5 and 0.6 < sim.balanced_accuracy < 0.8
    assert sim.unfreeze_depth == [6] and sim.blocks == 6  # every block
    assert sim.learning_rate == (1e-5, 1e-4)  # the whole searched range
    assert sim.rows == (384, 256) and sim.seconds < 60
    adapted = probe.adapt(spec, sim)
    assert adapted.search.space["unfreeze_depth"] == 6  # one depth: fixed, not searched
    assert adapted.search.space["weight_decay"] == SPACE["weight_decay"]  # the rest: the user's
    # the defaults trial: the family's rate (BERT: 3e-5, inside the range); the depth is fixed
    point = {**defaults_points(adapted)[0], **probe.defaults_overrides(sim, adapted.search.space)}
    assert point["learning_rate"] == 3e-5 and "unfreeze_depth" not in point
    assert "a related task -> unfreeze_depth [6] of 6" in sim.line()


def test_a_task_the_features_already_carry_is_near(tmp_path):
    _, sim = _measure(_task(tmp_path, "plot_or_review"))
    assert sim.closeness >= 0.55 and sim.verdict == "near", sim
    assert sim.unfreeze_depth == [2, 3]  # the top third to half of 6 blocks
    assert sim.learning_rate == (1e-5, 3.2e-5)  # the lower half of the range (log scale)


def test_a_turn_away_from_what_the_model_knows_is_far(tmp_path):
    _, sim = _measure(_task(tmp_path, "title_letter"))
    assert sim.closeness < 0.15 and sim.verdict == "far", sim
    assert sim.unfreeze_depth == [6]  # every block
    assert sim.learning_rate == (3.2e-5, 1e-4)  # the upper half
    assert sim.default_learning_rate == 3.2e-5


def test_balanced_accuracy_gives_no_credit_for_the_majority():
    assert balanced_accuracy([0] * 10, [0] * 9 + [1]) == 0.5
    assert balanced_accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx((2 / 3 + 1) / 2)


def test_the_probe_is_for_classifiers():
    with pytest.raises(SpecError, match="search.probe"):
        parse_spec({"model": {"task": "causal_lm"}, "search": {"probe": True}})
