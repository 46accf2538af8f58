"""What every trial shares: the plan, the worker config, checkpoint rules and pointers.

Multi-worker trials run on warm worker groups (``tune_jobs.warm``); a
``trial_mode: single_process`` trial runs the worker loop inside its Tune
function trainable (``run_trial``). Either way Tune holds a real checkpoint per
report (the best model is exported from it, and PBT moves it between trials).
For warm groups it is a tiny folder holding a pointer (``POINTER_FILE``) to the
checkpoint the workers wrote to storage, so weights are stored once.
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import train, tune

from cluster import storage
from cluster.resources import TrialResources
from trainers import metrics as M
from trainers.config import Distributed, HParams, WorkerConfig
from tune_jobs import faults
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


def checkpoint_retention(spec: JobSpec) -> dict[str, Any]:
    """Which checkpoints a trial keeps (kwargs of Train's and Tune's CheckpointConfig).

    Normally the best by the searched metric (exported at the end) plus, always,
    the latest (to resume from); under PBT/PB2 the most recent few, which are
    the ones an exploit can ask for.
    """
    if spec.scheduler.type in ("pbt", "pb2"):
        return {"num_to_keep": PBT_KEEP_CHECKPOINTS}
    return {
        "num_to_keep": 1,
        "checkpoint_score_attribute": spec.search.metric,
        "checkpoint_score_order": spec.search.resolved_mode,
    }


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
) -> WorkerConfig:
    """What every worker of a trial is told (see ``trainers.config``)."""
    return WorkerConfig(
        model=spec.model.name_or_path,
        max_length=spec.model.max_length,
        data=data_ref,
        hp=HParams.from_dict(hp),
        metric=spec.search.metric,
        mode=spec.search.resolved_mode,
        seed=spec.run.seed,
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


class TuneTrialContext:
    """``trainers.context.WorkerContext`` for the single-process trial mode.

    The worker loop runs inside the Tune trial itself (no worker group), and
    each report carries the checkpoint files to Tune directly: an exploit or a
    restore costs about a second instead of a worker-group restart.
    """

    rank = 0
    world_size = 1

    def __init__(self, resume_from: str | None, use_gpu: bool) -> None:
        import torch

        self.resume_from = resume_from
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.node_id = ray.get_runtime_context().get_node_id()

    def prepare_model(self, model: Any) -> Any:
        return model.to(self.device)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        if not self.resume_from:
            yield None
            return
        with train.Checkpoint(self.resume_from).as_directory() as folder:
            yield folder

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**metrics, M.WORKER_NODES: self.node_id}, checkpoint=checkpoint)


def checkpoint_location(checkpoint: Any, storage_root: str) -> str:
    """Where a Tune checkpoint's training state lives: the Train checkpoint it points
    to (TorchTrainer mode) or the Tune checkpoint itself (single-process mode), as a
    path or URI in the form of ``storage_root``."""
    with checkpoint.as_directory() as folder:
        if os.path.exists(os.path.join(folder, POINTER_FILE)):
            return read_pointer(folder)["uri"]
    return storage.uri_of(checkpoint.filesystem, checkpoint.path, like=storage_root)


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """Tune function trainable of ``trial_mode: single_process``: the worker loop in this
    process, reporting to Tune. (Multi-worker trials are ``tune_jobs.warm.WarmTrial``.)"""
    from trainers.loop import train_loop

    hp = trial_hparams(plan.spec, config)
    trial_name = tune.get_context().get_trial_name()
    faults.refuse_if_failed(plan.failures_dir, trial_name)
    resume = None
    incoming = tune.get_checkpoint()  # a fault restore, or a PBT donor's checkpoint
    if incoming is not None:
        resume = checkpoint_location(incoming, plan.train_storage)
        if not storage.exists(resume):
            # The donor's files are gone (deleted run folder): start this trial's
            # hyperparameters from scratch rather than fail the whole population.
            print(
                f"[{trial_name}] checkpoint {resume} no longer exists; starting from step 0",
                flush=True,
            )
            resume = None
    cfg = loop_config(
        plan.spec, hp, plan.data_ref, plan.resources, trial_name, plan.schedule_hparams(), resume
    )
    try:
        train_loop(cfg, TuneTrialContext(resume, plan.resources.gpus_per_worker > 0))
    except Exception as exc:  # raised here, in the trial's process (a killed one never is)
        if not faults.exception_is_transient(exc):
            faults.record(plan.failures_dir, trial_name, traceback.format_exc(limit=8))
        raise
