"""Per-trial resource arithmetic: concurrency that never deadlocks, impossible requests refused."""

from __future__ import annotations

import pytest

from cluster.resources import ClusterCapacity, ResourceError, TrialResources, max_concurrent_trials

TWO_CPUS = ClusterCapacity(cpus=2, gpus=0, max_node_cpus=2, max_node_gpus=0)


def test_fractional_workers_let_two_trials_share_two_cores():
    assert max_concurrent_trials(TrialResources(1, 0.99), TWO_CPUS) == 2
    # a whole CPU per worker plus the driver's share leaves room for one trial only
    assert max_concurrent_trials(TrialResources(1, 1.0), TWO_CPUS) == 1


def test_requested_concurrency_is_capped_by_the_cluster():
    cap = ClusterCapacity(cpus=64, gpus=16, max_node_cpus=16, max_node_gpus=8)
    trial = TrialResources(num_workers=4, cpus_per_worker=2, gpus_per_worker=1)
    assert max_concurrent_trials(trial, cap) == 4  # GPUs bind: 16 / 4
    assert max_concurrent_trials(trial, cap, requested=2) == 2
    assert max_concurrent_trials(trial, cap, requested=10) == 4


def test_a_trial_that_can_never_fit_is_refused_with_the_key():
    with pytest.raises(ResourceError, match="resources.num_workers") as info:
        max_concurrent_trials(TrialResources(2, 1.0), TWO_CPUS)
    assert "num_workers=1" in str(info.value)


def test_a_worker_larger_than_any_node_is_refused():
    cap = ClusterCapacity(cpus=32, gpus=0, max_node_cpus=8, max_node_gpus=0)
    with pytest.raises(ResourceError, match="resources.cpus_per_worker"):
        max_concurrent_trials(TrialResources(1, 12), cap)
    with pytest.raises(ResourceError, match="resources.gpus_per_worker"):
        max_concurrent_trials(TrialResources(1, 1, gpus_per_worker=1), cap)


def test_worker_threads_follow_the_cpu_share():
    assert TrialResources(1, 0.49).worker_threads == 1
    assert TrialResources(1, 4).worker_threads == 4


def test_strict_placement_that_can_never_fit_is_refused():
    cap = ClusterCapacity(cpus=32, gpus=16, max_node_cpus=8, max_node_gpus=4, nodes=4)
    trial = TrialResources(8, 1, gpus_per_worker=1, placement_strategy="STRICT_PACK")
    with pytest.raises(ResourceError, match="resources.placement_strategy") as info:
        max_concurrent_trials(trial, cap)
    assert "num_workers <= 4" in str(info.value)  # 4 GPUs on the largest node
    assert max_concurrent_trials(TrialResources(8, 1, 1, placement_strategy="PACK"), cap) == 2
    spread = TrialResources(5, 1, placement_strategy="STRICT_SPREAD")
    with pytest.raises(ResourceError, match="num_workers <= 4"):
        max_concurrent_trials(spread, cap)
