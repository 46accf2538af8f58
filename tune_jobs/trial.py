"""The per-trial driver: a Tune function trainable that runs one Ray Train run.

Ray 2.60 (Train V2) refuses ``Tuner(TorchTrainer)``; the supported shape is a
function trainable that builds and fits a ``TorchTrainer``. Tune must hold a
real checkpoint per report (the best model is exported from it, and PBT moves
it between trials), so the Train run's reports travel back to this driver:

    workers --ray.train.report--> Train controller --_ForwardToTune (queue)-->
    this driver --ray.tune.report(metrics, pointer checkpoint)--> Tune

The Tune checkpoint is a tiny folder holding a pointer (``POINTER_FILE``) to
the Train checkpoint, so weights are stored once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import train, tune
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.config import LoggingConfig
from ray.util.queue import Empty, Queue

from cluster import storage
from cluster.resources import TrialResources
from trainers import metrics as M
from trainers.config import Distributed, HParams, WorkerConfig
from trainers.loop import train_loop_per_worker
from tune_jobs.space import trial_hparams
from tune_jobs.spec import JobSpec

POINTER_FILE = "train_checkpoint.json"
_DONE = "__tunefleet_train_run_done__"


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a run shares (shipped to trials through ``tune.with_parameters``)."""

    spec: JobSpec
    data_ref: Any  # ray.ObjectRef to trainers.data.Splits
    train_storage: str  # where each trial's Ray Train runs are stored
    resources: TrialResources
    #: ``(from_step, config)`` switches of hyperparameters within each trial (a PBT replay)
    hp_schedule: tuple[tuple[int, dict[str, Any]], ...] = ()

    def schedule_hparams(self) -> list[tuple[int, dict[str, Any]]]:
        """The schedule as full hyperparameters for the worker loop."""
        return [(step, trial_hparams(self.spec, config)) for step, config in self.hp_schedule]


class _ForwardToTune(UserCallback):
    """Runs in the Train controller: ships each report to the trial's driver."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        path = checkpoint.path if checkpoint is not None else None
        self.queue.put((dict(metrics[0]), path))


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
    if spec.training.checkpoint_weights == "auto":
        return "trained" if spec.scheduler.type in ("pbt", "pb2") else "full"
    return spec.training.checkpoint_weights


def train_run_name(train_storage: str, trial_name: str) -> str:
    """A fresh Train run name for this start of the trial.

    A Train run whose (storage, name) exists is resumed by Ray, so every start
    (first start, fault restore, PBT exploit) needs its own name; counting the
    earlier ones keeps the name deterministic.
    """
    taken = [n for n in storage.list_names(train_storage) if n.startswith(f"{trial_name}-start")]
    return f"{trial_name}-start{len(taken)}"


def read_pointer(checkpoint_dir: str) -> dict[str, Any]:
    """The pointer a Tune checkpoint holds (``uri`` of the Train checkpoint, ``step``, ...)."""
    with open(os.path.join(checkpoint_dir, POINTER_FILE)) as fh:
        return json.load(fh)


def _pointer_checkpoint(
    train_storage: str, run_name: str, train_path: str, metrics: dict[str, Any]
) -> tune.Checkpoint:
    folder = tempfile.mkdtemp(prefix="tunefleet-pointer-")
    uri = storage.join(train_storage, run_name, os.path.basename(train_path.rstrip("/")))
    with open(os.path.join(folder, POINTER_FILE), "w") as fh:
        json.dump({"uri": uri, "train_run": run_name, "step": metrics.get("step")}, fh)
    return tune.Checkpoint.from_directory(folder)


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
    )


def build_trainer(
    plan: TrialPlan, hp: dict[str, Any], run_name: str, queue: Queue, resume: str | None, label: str
) -> TorchTrainer:
    """One Ray Train run of the worker loop, reporting through ``queue``."""
    spec, res = plan.spec, plan.resources
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(
            spec, hp, plan.data_ref, res, label, plan.schedule_hparams(), resume
        ).to_dict(),
        scaling_config=train.ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=res.worker_bundle(),
            placement_strategy=res.placement_strategy,
        ),
        run_config=train.RunConfig(
            name=run_name,
            **storage.ray_storage(plan.train_storage),
            callbacks=[_ForwardToTune(queue)],
            checkpoint_config=train.CheckpointConfig(**checkpoint_retention(spec)),
            failure_config=train.FailureConfig(max_failures=0),
            # Train's per-report INFO lines repeat every metric; the worker prints its own line.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def fit_forwarding(
    plan: TrialPlan,
    hp: dict[str, Any],
    run_name: str,
    resume: str | None,
    label: str,
    on_report: Callable[[dict[str, Any], str | None], None],
) -> None:
    """Fit a Train run in a thread; call ``on_report(metrics, checkpoint_path)`` here for each report."""
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(plan, hp, run_name, queue, resume, label)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            failure.append(exc)
        finally:
            queue.put((_DONE, None))

    thread = threading.Thread(target=fit, name=f"fit-{run_name}", daemon=True)
    thread.start()
    while True:
        try:
            metrics, path = queue.get(timeout=5)
        except Empty:
            if not thread.is_alive() and queue.empty():
                break
            continue
        if metrics == _DONE:
            break
        on_report(metrics, path)
    thread.join()
    if failure:
        raise failure[0]


class TuneTrialContext:
    """``trainers.report.WorkerContext`` for the single-process trial mode.

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
    """Tune function trainable: run the worker loop for one trial and report to Tune.

    ``resources.trial_mode`` picks a ``TorchTrainer`` (workers in a Ray Train
    worker group) or the loop inside this process.
    """
    hp = trial_hparams(plan.spec, config)
    trial_name = tune.get_context().get_trial_name()

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

    if plan.spec.resources.trial_mode == "single_process":
        from trainers.loop import train_loop

        cfg = loop_config(
            plan.spec,
            hp,
            plan.data_ref,
            plan.resources,
            trial_name,
            plan.schedule_hparams(),
            resume,
        )
        train_loop(cfg, TuneTrialContext(resume, plan.resources.gpus_per_worker > 0))
        return

    run_name = train_run_name(plan.train_storage, trial_name)

    def forward(metrics: dict[str, Any], path: str | None) -> None:
        checkpoint = (
            _pointer_checkpoint(plan.train_storage, run_name, path, metrics) if path else None
        )
        try:
            tune.report({**metrics, "train_run": run_name}, checkpoint=checkpoint)
        finally:  # tune.report has copied it to the trial's storage
            if checkpoint is not None:
                shutil.rmtree(checkpoint.path, ignore_errors=True)

    fit_forwarding(plan, hp, run_name, resume, trial_name, forward)


def resume_check(plan: TrialPlan, hp: dict[str, Any], uri: str, extra_steps: int) -> list[int]:
    """Restore a checkpoint into a new Train run for ``extra_steps`` more steps; the steps it reports.

    Run from the driver (outside Tune) by the smoke pass: proves that a
    checkpoint holds what is needed to continue.
    """
    from trainers.checkpoint import MANIFEST

    step = int(json.loads(storage.read_text(storage.join(uri, MANIFEST)))["step"])
    hp = {**hp, "max_steps": step + extra_steps, "eval_steps": extra_steps}
    steps: list[int] = []
    fit_forwarding(
        plan,
        hp,
        train_run_name(plan.train_storage, "resume-check"),
        uri,
        "resume-check",
        lambda metrics, _: steps.append(int(metrics["step"])),
    )
    return steps
