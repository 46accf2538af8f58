"""What every trial shares: the plan, the worker config, checkpoint rules and pointers.

Every trial is a ``tune_jobs.warm.WarmTrial``: multi-worker trials drive a warm
worker group, a ``trial_mode: single_process`` trial the worker loop in its own
process (``tune_jobs.groups.ProcessGroup``). The workers write checkpoints to
storage; Tune holds a tiny folder per checkpoint with a pointer (``POINTER_FILE``)
to it, so weights are stored once (PBT moves pointers between trials).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from cluster.resources import TrialResources
from trainers.config import Distributed, HParams, WorkerConfig
from tune_jobs.space import trial_hparams
from tune_jobs.spec import JobSpec

POINTER_FILE = "train_checkpoint.json"


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a run shares (shipped to trials through ``tune.with_parameters``)."""

    spec: JobSpec
    data_ref: Any  # ray.ObjectRef to trainers.data.Splits
    train_storage: str  # where each trial's Ray Train runs are stored
    resources: TrialResources
    #: ``(from_step, config)`` switches of hyperparameters within each trial (a PBT replay)
    hp_schedule: tuple[tuple[int, dict[str, Any]], ...] = ()
    #: the sweep's best metric so far (a ``tune_jobs.leader.ExportLeader`` actor), or None
    leaderboard: Any = None
    #: the sweep's warm groups (a ``tune_jobs.groups.GroupPool`` actor), or None
    groups: Any = None
    #: where trials record a failure of their own code, which is then not retried
    #: (``tune_jobs.faults``); None: nothing recorded
    failures_dir: str | None = None

    def schedule_hparams(self) -> list[tuple[int, dict[str, Any]]]:
        """The schedule as full hyperparameters for the worker loop."""
        return [(step, trial_hparams(self.spec, config)) for step, config in self.hp_schedule]


#: Under PBT/PB2, how many recent checkpoints each trial keeps: a donor's checkpoint
#: must outlive the interval in which recipients may clone it (Tune refuses to
#: restore a deleted one).
PBT_KEEP_CHECKPOINTS = 4


def checkpoint_layout(spec: JobSpec) -> str:
    """``training.checkpoint_weights`` with ``auto`` resolved: the delta under PBT/PB2.
    A DeepSpeed engine writes its own (sharded) checkpoints."""
    if spec.distributed.strategy == "deepspeed":
        return "deepspeed"
    if spec.adapter.type == "lora":
        return "trained"  # the adapter alone: the base never changes
    if spec.training.checkpoint_weights == "auto":
        return "trained" if spec.scheduler.type in ("pbt", "pb2") else "full"
    return spec.training.checkpoint_weights


def read_pointer(checkpoint_dir: str) -> dict[str, Any]:
    """The pointer a Tune checkpoint holds (``uri`` of the Train checkpoint, ``step``, ...)."""
    with open(os.path.join(checkpoint_dir, POINTER_FILE)) as fh:
        return json.load(fh)


def loop_config(
    spec: JobSpec,
    hp: dict[str, Any],
    data_ref: Any,
    resources: TrialResources,
    name: str = "trial",
    hp_schedule: list[tuple[int, dict[str, Any]]] | None = None,
    resume_from: str | None = None,
    seed: int | None = None,
) -> WorkerConfig:
    """What every worker of a trial is told (see ``trainers.config``); ``seed``: the
    trial's own (a reevaluation's), else ``run.seed``."""
    return WorkerConfig(
        model=spec.model.name_or_path,
        max_length=spec.model.max_length,
        data=data_ref,
        hp=HParams.from_dict(hp),
        metric=spec.search.metric,
        mode=spec.search.resolved_mode,
        seed=spec.run.seed if seed is None else seed,
        threads=resources.worker_threads,
        checkpoint_weights=checkpoint_layout(spec),
        distributed=Distributed.from_dict(spec.distributed.model_dump()),
        name=name,
        fingerprint_weights=spec.run.fingerprint_weights,
        hp_schedule=tuple((step, HParams.from_dict(h)) for step, h in hp_schedule or ()),
        resume_from=resume_from,
        trust_remote_code=spec.model.trust_remote_code,
        task=spec.model.task,
    )


def checkpoint_location(checkpoint: Any) -> str:
    """Where a Tune checkpoint's training state lives: the checkpoint its pointer names."""
    with checkpoint.as_directory() as folder:
        return read_pointer(folder)["uri"]
