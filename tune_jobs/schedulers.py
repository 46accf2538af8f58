"""Job spec -> Tune trial scheduler."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from tune_jobs.spec import JobSpec, budget_in


def build_scheduler(spec: JobSpec, budget: float | None = None) -> Any:
    """ASHA on the spec's metric (or FIFO). ``budget``: the training budget in time_attr units."""
    sched = spec.scheduler
    if sched.type == "fifo":
        return FIFOScheduler()
    max_t = sched.max_t or budget or budget_in(sched.time_attr, spec.training)
    return ASHAScheduler(
        time_attr=sched.time_attr,
        max_t=max_t,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )
