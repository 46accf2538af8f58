"""Per-trial resource arithmetic, checked before any trial starts.

A trial reserves a small CPU share for its driver (the Tune function that only
forwards results) plus ``num_workers`` bundles for its Ray Train workers. Tune
must never run more trials at once than the cluster can hold, or the surplus
trials' drivers sit on CPUs while their workers wait forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cluster import ray_private


class ResourceError(ValueError):
    """A resource request that can never be satisfied; names the spec key."""


@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.01
    single_process: bool = False  # the loop runs in the trial itself: no separate driver share
    placement_strategy: str = "PACK"  # of the workers' placement group

    @property
    def cpus(self) -> float:
        """CPUs one trial holds: driver + workers (single process: the one worker)."""
        if self.single_process:
            return self.cpus_per_worker
        return self.driver_cpus + self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        """GPUs one trial holds."""
        return self.num_workers * self.gpus_per_worker

    @property
    def worker_threads(self) -> int:
        """Torch intra-op threads per worker: its CPU share, at least one."""
        return max(1, round(self.cpus_per_worker))

    def trial_bundle(self) -> dict[str, float]:
        """What Tune reserves for the trial process itself."""
        return self.worker_bundle() if self.single_process else {"CPU": self.driver_cpus}

    def worker_bundle(self) -> dict[str, float]:
        """Ray resources of one worker."""
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    def bundles(self) -> list[dict[str, float]]:
        """Every bundle one trial reserves: its own, then one per worker."""
        if self.single_process:
            return [self.trial_bundle()]
        return [self.trial_bundle()] + [self.worker_bundle()] * self.num_workers


@dataclass(frozen=True)
class ClusterCapacity:
    """Totals and the largest single node of a cluster."""

    cpus: float
    gpus: float
    max_node_cpus: float
    max_node_gpus: float
    nodes: int = 1
    #: capacity counts nodes an autoscaler can still start (not only the ones up now)
    autoscaling: bool = False


def max_concurrent_trials(
    trial: TrialResources, cluster: ClusterCapacity, requested: int | None = None
) -> int:
    """How many trials can run at once; ``ResourceError`` if not even one fits."""
    eps = 1e-9  # fractional resources: 2 x 0.99 + 2 x 0.01 must fit into 2.0
    if trial.cpus_per_worker > cluster.max_node_cpus + eps:
        raise ResourceError(
            f"resources.cpus_per_worker: {trial.cpus_per_worker:g} CPUs per worker, but the largest "
            f"node has {cluster.max_node_cpus:g}; use at most {cluster.max_node_cpus:g}"
        )
    if trial.gpus_per_worker > cluster.max_node_gpus + eps:
        raise ResourceError(
            f"resources.gpus_per_worker: {trial.gpus_per_worker:g} GPUs per worker, but the largest "
            f"node has {cluster.max_node_gpus:g}; use at most {cluster.max_node_gpus:g}"
        )
    if trial.placement_strategy == "STRICT_PACK" and not trial.single_process:
        need_cpus = trial.num_workers * trial.cpus_per_worker
        need_gpus = trial.num_workers * trial.gpus_per_worker
        if need_cpus > cluster.max_node_cpus + eps or need_gpus > cluster.max_node_gpus + eps:
            per_node = math.floor(cluster.max_node_cpus / trial.cpus_per_worker + eps)
            if trial.gpus_per_worker:
                per_node = min(
                    per_node, math.floor(cluster.max_node_gpus / trial.gpus_per_worker + eps)
                )
            raise ResourceError(
                f"resources.placement_strategy: STRICT_PACK puts all {trial.num_workers} workers "
                f"on one node ({need_cpus:g} CPUs, {need_gpus:g} GPUs) but the largest node has "
                f"{cluster.max_node_cpus:g} CPUs and {cluster.max_node_gpus:g} GPUs; use "
                f"num_workers <= {per_node} or placement_strategy: PACK"
            )
    spread = trial.placement_strategy == "STRICT_SPREAD" and not trial.single_process
    if spread and trial.num_workers > cluster.nodes:
        raise ResourceError(
            f"resources.placement_strategy: STRICT_SPREAD puts each of {trial.num_workers} "
            f"workers on its own node but the cluster has {cluster.nodes}; use num_workers <= "
            f"{cluster.nodes} or placement_strategy: SPREAD"
        )
    fits = math.floor(cluster.cpus / trial.cpus + eps)
    if trial.gpus:
        fits = min(fits, math.floor(cluster.gpus / trial.gpus + eps))
    if fits < 1:
        need_cpu = f"{trial.cpus:g} CPUs" + (f" and {trial.gpus:g} GPUs" if trial.gpus else "")
        workers_fit = max(
            1, math.floor((cluster.cpus - trial.driver_cpus) / trial.cpus_per_worker + eps)
        )
        raise ResourceError(
            f"resources.num_workers: one trial needs {need_cpu} ({trial.num_workers} workers x "
            f"{trial.cpus_per_worker:g} CPUs + {trial.driver_cpus:g} for its driver) but the cluster "
            f"has {cluster.cpus:g} CPUs"
            + (f" and {cluster.gpus:g} GPUs" if trial.gpus else "")
            + f"; e.g. num_workers={workers_fit} or a smaller cpus_per_worker"
        )
    return min(fits, requested) if requested else fits


def capacity_of_running_cluster() -> ClusterCapacity:
    """Capacity of the cluster this process is connected to.

    On an autoscaling cluster (KubeRay's or Ray's autoscaler publishes its node
    types to the GCS) this is what the cluster can grow to: a trial that fits a
    node type the autoscaler can start is not refused because no such node is
    up yet, and Tune's pending trials are what asks the autoscaler for nodes.
    Without an autoscaler it is the nodes alive now.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [n["Resources"].get("CPU", 0.0) for n in nodes]
    gpus = [n["Resources"].get("GPU", 0.0) for n in nodes]
    now = ClusterCapacity(
        sum(cpus), sum(gpus), max(cpus, default=0.0), max(gpus, default=0.0), len(nodes)
    )
    return with_node_types(now, autoscaler_node_types())


#: Stand-in for "no upper bound" in a node type's max_count (-1 in the autoscaler's config).
UNBOUNDED_NODES = 1000


def autoscaler_node_types() -> list[tuple[dict[str, float], int]]:
    """(resources of one node, max nodes) per node type the autoscaler can start; [] without one."""
    config = ray_private.autoscaler_config()
    if config is None:
        return []
    types = []
    for group in config.node_group_configs:
        count = UNBOUNDED_NODES if group.max_count == -1 else int(group.max_count)
        if count > 0:
            types.append(({k: float(v) for k, v in group.resources.items()}, count))
    return types


def with_node_types(
    now: ClusterCapacity, node_types: list[tuple[dict[str, float], int]]
) -> ClusterCapacity:
    """The capacity a cluster can reach: what is up now, or every node type at its max count."""
    if not node_types:
        return now
    cpus = sum(r.get("CPU", 0.0) * n for r, n in node_types)
    gpus = sum(r.get("GPU", 0.0) * n for r, n in node_types)
    return ClusterCapacity(
        cpus=max(now.cpus, cpus),
        gpus=max(now.gpus, gpus),
        max_node_cpus=max([now.max_node_cpus] + [r.get("CPU", 0.0) for r, _ in node_types]),
        max_node_gpus=max([now.max_node_gpus] + [r.get("GPU", 0.0) for r, _ in node_types]),
        nodes=max(now.nodes, sum(n for _, n in node_types)),
        autoscaling=True,
    )


def autoscaler_can_place(bundles: list[dict[str, float]], timeout_s: float = 60.0) -> bool | None:
    """Ask the cluster's autoscaler whether it can ever hold one trial's ``bundles``.

    ``None`` when no autoscaler (v2) reports to this cluster. Ray 2.60's
    autoscaler does not publish its node types to the GCS, so tunefleet asks it
    directly: the bundles go in as a resource constraint
    (``request_cluster_resources``, the channel behind
    ``ray.autoscaler.sdk.request_resources``), and once the autoscaler has
    seen that cluster state it either lists the constraint as infeasible (no
    node type holds it) or plans nodes for it. The constraint is cleared again
    before returning. Seconds, at the autoscaler's update interval.
    """
    import time

    import ray

    address = ray.get_runtime_context().gcs_address

    def status() -> Any:
        return ray_private.autoscaler_status(address)

    # An autoscaler reports every few seconds (AUTOSCALER_UPDATE_INTERVAL_S, 5 by
    # default); a cluster that was just started may not have heard from it yet.
    deadline = time.monotonic() + 12
    while status().autoscaling_state.autoscaler_state_version == 0:
        if time.monotonic() > deadline:
            return None
        time.sleep(1)
    ray_private.request_cluster_resources(address, bundles)
    try:
        asked = status().cluster_resource_state.cluster_resource_state_version
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            state = status().autoscaling_state
            if state.last_seen_cluster_resource_state_version < asked:
                continue  # the autoscaler has not seen the constraint yet
            return not state.infeasible_cluster_resource_constraints
        return True  # no verdict in time: let Tune's requests wait rather than refuse
    finally:
        ray_private.request_cluster_resources(address, [])
