"""PBT with multi-worker trials: each trial a Ray Train ``TorchTrainer`` of 2 DDP workers.

An exploit here restarts the recipient's worker group: the trial's driver gets
the donor's Tune checkpoint (a pointer to the donor's Train checkpoint) and
starts a new Train run whose workers restore it with the recipient's mutated
hyperparameters.
"""

from __future__ import annotations

import pytest

from tests.e2e.pbt_checks import TWO_WORKER_POPULATION, check_exploit, run_population

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = TWO_WORKER_POPULATION


@pytest.fixture(scope="module")
def pbt_run(tmp_path_factory):
    return run_population(tmp_path_factory.mktemp("pbtw"), SPEC)


def test_exploits_restore_the_donors_weights_in_a_new_worker_group(pbt_run):
    run_dir, summary, rows, _ = pbt_run
    assert summary["exploits"], "no exploit in a population of 2 with synch=True"
    for exploit in summary["exploits"]:
        first, _ = check_exploit(rows, exploit, last_step=12)
        # a new Train run (worker group) of the recipient's own, not the donor's
        assert first["train_run"].startswith(exploit["recipient"] + "-start")
        assert first["train_run"] != rows[exploit["recipient"]][0]["train_run"]
        depth_one = first["trainable_params"] < 10_000_000
        assert depth_one == (exploit["new_config"]["unfreeze_depth"] == 1)


def test_every_report_is_attributed_to_its_own_trial(pbt_run):
    _, summary, rows, _ = pbt_run
    for trial, reports in rows.items():
        # no report lost across the pauses and restores of synch PBT
        assert [r["training_iteration"] for r in reports] == list(range(1, len(reports) + 1))
        assert len({r["trial_id"] for r in reports}) == 1
        assert all(r["train_run"].startswith(trial + "-start") for r in reports)
    assert summary["checkpoints"]["weights"] == "trained"
