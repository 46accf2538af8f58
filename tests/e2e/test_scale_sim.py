"""Scale, simulated (issue 22), at a size CI affords: a Ray cluster of two fake nodes with
8 GPUs each that exist only as resources, 4-GPU trials (a trial bundle and four worker
bundles, tunefleet's own arithmetic), under tunefleet's ASHA and PBT.

The trials are the one mock (no GPU is here): ``benchmarks/scale_sim.py``'s synthetic
curves stand in for training. The scheduler, search, report log and summaries are
tunefleet's. The benchmark runs the same at several hundred trials and prints the
scheduler's time per decision and the driver's memory.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "scale_sim.py")


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("scale_sim", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import ray

    cluster = module.start_cluster(2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield module
    finally:
        ray.shutdown()
        cluster.shutdown()  # the nodes this test started, by their processes


# PBT: 5 members on 4 slots, so one waits, paused, at each of its 2 exploit points
@pytest.mark.parametrize(("scheduler", "trials", "epochs"), [("asha", 20, 3.0), ("pbt", 5, 1.5)])
def test_every_trial_runs_and_is_accounted_for(sim, tmp_path, scheduler, trials, epochs):
    row = sim.simulate(scheduler, trials, str(tmp_path), timeout_s=300, tick_s=0.01, epochs=epochs)
    assert not row["timed_out"], row  # no deadlock: the sweep ended by itself
    assert row["trials_made"] == row["trials_summarized"] == trials, row
    assert row["statuses"] == {"TERMINATED": trials}, row
    assert row["reports"] >= trials  # every trial reported
    assert row["decisions"] == row["reports"]  # the scheduler was asked about each
    if scheduler == "asha":
        # ASHA on the loss stops most trials at its first rungs
        assert row["stopped_early"] >= trials // 2, row
    else:
        assert row["ran_to_the_end"] == trials, row  # PBT runs every member to the end
    assert row["decision_ms_median"] < 50, row
