"""PBT with multi-worker trials: each trial runs on a warm worker group of 2 DDP workers.

An exploit here does not restart anything: Tune hands the recipient's trial
actor the mutated hyperparameters (``reset_config``) and the donor's Tune
checkpoint (a pointer to the checkpoint the donor's workers wrote), and the
recipient's warm group restores it in place, as a new start of the trial. On a tiny random
BERT with MiniLM's tokenizer and six blocks (mechanics; MiniLM's own two-worker PBT run is
``test_deepspeed_pbt.py``).
"""

from __future__ import annotations

import pytest

from tests.e2e.pbt_checks import (
    TWO_WORKER_POPULATION,
    check_exploit,
    run_population,
    trains_at_depth,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = TWO_WORKER_POPULATION


@pytest.fixture(scope="module")
def pbt_run(tmp_path_factory, tiny_bert):
    spec = {
        **SPEC,
        "model": {**SPEC["model"], "name_or_path": tiny_bert},
        "tracking": {"tensorboard": False},  # the opt-out (checked below)
    }
    return run_population(tmp_path_factory.mktemp("pbtw"), spec)


def test_exploits_restore_the_donors_weights_on_the_warm_group(pbt_run):
    run_dir, summary, rows, _ = pbt_run
    assert summary["exploits"], "no exploit in a population of 2 with synch=True"
    for exploit in summary["exploits"]:
        first, _ = check_exploit(rows, exploit, last_step=8)
        before = [r for r in rows[exploit["recipient"]] if r["step"] <= exploit["step"]]
        # a new start of the recipient (restored from the donor) ...
        assert first["trial_start"] != before[-1]["trial_start"]
        assert trains_at_depth(rows, first, exploit["new_config"]["unfreeze_depth"])
    # ... on the groups the population started with: no worker group was started for an
    # exploit or a resumed member (two trials at a time: the sweep's pool holds two groups)
    groups = {r["train_run"] for reports in rows.values() for r in reports}
    assert groups == {"group0", "group1"}, groups


def test_every_report_is_attributed_to_its_own_trial(pbt_run):
    run_dir, summary, rows, _ = pbt_run
    for reports in rows.values():
        # no report lost across the pauses and restores of synch PBT
        assert [r["training_iteration"] for r in reports] == list(range(1, len(reports) + 1))
        assert len({r["trial_id"] for r in reports}) == 1
        assert all(r["trial_start"].startswith("start") for r in reports)
    assert summary["checkpoints"]["weights"] == "trained"
    # tracking.tensorboard: false writes no event file; Tune's result.json is there all the same
    assert not list(run_dir.glob("trial_*/events.out.tfevents.*"))
    assert list(run_dir.glob("trial_*/result.json"))
