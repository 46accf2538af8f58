"""Every Tune trial: ``WarmTrial``, driving warm workers command by command, and what it writes.

``WarmTrial`` is a Tune class ``Trainable``. A multi-worker trial leases a warm
group from the sweep's ``GroupPool`` at its first step; a single-process trial
serves itself (``tune_jobs.groups.ProcessGroup``: the worker loop in this
actor's process). Either way it sends the same commands (``trainers.serve``);
with ``reuse_actors`` Tune hands the actor (its lease, or its loaded model) to
the next trial (``reset_config``) and to exploits (``reset_config`` then
``load_checkpoint``).

Checkpoints: one policy for every trial decides what each evaluation is worth
(``checkpoint_writes``); the workers write it straight to storage
(``<train_storage>/<trial>/start<k>/checkpoint_<step>``) and Tune holds a
pointer of a few bytes to it (``tune_jobs.trial.POINTER_FILE``).

``ExportLeader`` (``tune_jobs.leader``) keeps the best checkpoint written in the sweep.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import train, tune
from ray.tune.result import DONE, SHOULD_CHECKPOINT

from cluster import ray_private, storage
from trainers import metrics as M
from trainers.serve import End, Hold, Interval, Save, SaveHeld, Start
from tune_jobs import faults, layout
from tune_jobs.groups import GroupLink, LeasedGroup, ProcessGroup, WorkerGroupError
from tune_jobs.layout import latest_resumable, next_numbered
from tune_jobs.space import REEVALUATES, SEED, trial_hparams
from tune_jobs.trial import (
    PBT_KEEP_CHECKPOINTS,
    POINTER_FILE,
    TrialPlan,
    loop_config,
    read_pointer,
)


@dataclass
class TrialCheckpoints:
    """What one trial (not one actor: Tune hands an actor from trial to trial) has
    written and holds. A new trial on the actor starts a new one; an exploit (the same
    trial, new hyperparameters) keeps it."""

    trial: str
    kept: Any = None  # pbt/pb2: Ray Train's checkpoint manager (the most recent few)
    latest: tuple[str, dict[str, Any]] | None = None  # (URI, metrics) last written
    full: str | None = None  # the latest checkpoint to resume from exactly
    records: set[str] = field(default_factory=set)  # written because they led the sweep
    held: dict[str, Any] | None = None  # the best report, its weights in the workers' memory


@dataclass(frozen=True)
class Writes:
    """What one evaluation is worth writing (``checkpoint_writes``)."""

    full: bool  # the whole state now (weights, optimizer, RNG): an exact resume, a PBT donor
    best: bool  # the trial's best evaluation so far: its candidate for the export
    hold: bool  # its weights kept in the worker's memory, written at the trial's end if they lead
    lead_now: bool  # it leads the sweep and cannot be held (sharded): written now, at least weights


def checkpoint_writes(
    value: float | None,
    *,
    held: float | None,
    since_full_s: float,
    population: bool,
    every_s: float,
    sharded: bool,
    mode: str,
    leads_sweep: Callable[[], bool],
) -> Writes:
    """The checkpoint policy of every trial, on a warm group or in its own process, after an
    evaluation scoring ``value`` (``held``: the trial's best so far; ``since_full_s``: seconds
    since its last full checkpoint).

    - pbt/pb2 (``population``): the full state at every evaluation, which exploits copy;
      the export takes the best trial's best of them (Tune's checkpoint record).
    - Otherwise the full state at most every ``every_s`` seconds (0: every evaluation), for
      a resume; and the trial's best evaluation, written in full if due anyway, else held
      in memory and written at the trial's end only if it beats every checkpoint written
      before (``tune_jobs.leader``: the export's one source).
    - A sharded engine's weights (DeepSpeed) cannot be held: an evaluation that leads the
      sweep (``leads_sweep``, asked only then) is written at once instead.
    - ``value`` None (no score, or a screened one: ``trainers.metrics.SCREENED``): only the
      resume's full state, when due.
    """
    full = population or every_s == 0 or since_full_s >= every_s
    if population:
        return Writes(full=True, best=False, hold=False, lead_now=False)
    if value is None:  # no score, or a screened one (a sample's): no claim to the export
        return Writes(full=full, best=False, hold=False, lead_now=False)
    if sharded:
        return Writes(full=full, best=False, hold=False, lead_now=leads_sweep())
    best = M.better(value, held, mode)
    return Writes(full=full, best=best, hold=best and not full, lead_now=False)


class WarmTrial(tune.Trainable):
    """A Tune trial that runs on a warm worker group, leased from the sweep's ``GroupPool``
    for as long as this actor lives (Tune may hand the actor to further trials), or, in
    single-process mode, on the worker loop in this actor's own process.

    What gets written is ``checkpoint_writes``'s answer after each evaluation; the held
    best is written when the trial ends, only if it beats every checkpoint written before
    (the export takes the best written: ``train_runs/leader.json``). Whenever Tune itself
    asks for a checkpoint (a pause), the state is written in full then.
    """

    def setup(self, config: dict[str, Any], plan: TrialPlan) -> None:
        self.plan = plan
        self.group: GroupLink | None = None
        self.pbt = plan.spec.scheduler.type in ("pbt", "pb2")
        self.ckpt: TrialCheckpoints | None = None  # the trial's, kept across its exploits
        self._begin(config)

    def _begin(self, config: dict[str, Any]) -> None:
        """A new trial on this actor: nothing is sent until its first step."""
        from ray.train import CheckpointConfig

        self.hp = trial_hparams(self.plan.spec, config)
        # a reevaluation's trial: its own seed, and the config it retrains (its leader's key)
        self.seed = int(config.get(SEED, self.plan.spec.run.seed))
        self.leader_key: str | None = config.get(REEVALUATES)
        self.resume: str | None = None  # a checkpoint to start from (load_checkpoint)
        self.started = False
        self.step_now = -1  # the step of the last report
        self.last_metrics: dict[str, Any] = {}  # the last report's metrics
        if self.ckpt is None or self.ckpt.trial != self.trial_name:  # not an exploit
            kept = None
            if self.pbt:  # Ray Train's own manager deletes what exploits can no longer ask for
                retention = CheckpointConfig(num_to_keep=PBT_KEEP_CHECKPOINTS)
                kept = ray_private.checkpoint_manager(retention)
            self.ckpt = TrialCheckpoints(self.trial_name, kept=kept)

    def _group(self) -> GroupLink:
        """The group this actor leased, leased at its first step; renewed if its workers died.
        A single-process trial (no pool) serves itself: a ``ProcessGroup`` in this process."""
        pool = self.plan.groups
        if pool is None:
            if self.group is None or not self.group.alive:
                self.group, self.started = ProcessGroup(self.plan), False
            return self.group
        if self.group is not None and not self.group.alive:
            print(f"[{self.trial_name}] warm group {self.group.name} died; starting a new one")
            self.group = LeasedGroup(pool, ray.get(pool.renew.remote(self.group.name)))
            self.started = False
        if self.group is None:
            lessee = ray.get_runtime_context().current_actor
            self.group = LeasedGroup(pool, ray.get(pool.lease.remote(lessee)))
        return self.group

    def step(self) -> dict[str, Any]:
        if not self.started:  # a retry of a trial whose own code failed fails at once
            faults.refuse_if_failed(self.plan.failures_dir, self.trial_name)
        try:
            return self._step()
        except WorkerGroupError as exc:
            if not exc.transient:
                faults.record(self.plan.failures_dir, self.trial_name, exc)
            raise

    def _step(self) -> dict[str, Any]:
        group = self._group()
        plan = self.plan
        if not self.started:
            cfg = loop_config(
                plan.spec,
                self.hp,
                plan.data_ref,
                plan.resources,
                self.trial_name,
                plan.schedule_hparams(),
                group.path_of(self.resume),
                seed=self.seed,
            )
            self.worker_pid = group.call(Start(cfg))["pid"]
            self.started = True
            self.full_at = time.monotonic()
            trial_dir = storage.join(plan.train_storage, self.trial_name)
            self.start_name = next_numbered(trial_dir, layout.START)
            self.start_dir = storage.join(trial_dir, self.start_name)
        reply = group.call(Interval())
        metrics = dict(reply["metrics"])
        metrics[M.TRAIN_RUN] = group.name
        metrics[M.TRIAL_START] = self.start_name
        metrics[M.WORKER_PID] = self.worker_pid
        self.last_metrics = metrics
        self.step_now = int(metrics[M.STEP])
        if self.hp["save_checkpoints"] and self._write(metrics):
            metrics[SHOULD_CHECKPOINT] = True
        if reply["done"]:
            self._release()
            metrics[DONE] = True
        return metrics

    def _write(self, metrics: dict[str, Any]) -> bool:
        """Carry out ``checkpoint_writes`` for this evaluation; written now?"""
        spec = self.plan.spec
        leader = self.plan.leaderboard
        value = None if M.screened(metrics) else metrics.get(spec.search.metric)
        ckpt = self.ckpt
        writes = checkpoint_writes(
            value,
            held=ckpt.held["value"] if ckpt.held else None,
            since_full_s=time.monotonic() - self.full_at,
            population=self.pbt,
            every_s=spec.training.checkpoint_every_s,
            sharded=spec.distributed.strategy == "deepspeed",
            mode=spec.search.resolved_mode,
            leads_sweep=lambda: (
                leader is None or ray.get(leader.offer.remote(value, self.leader_key))
            ),
        )
        uri = None
        if writes.full or writes.lead_now:
            uri = self._save(metrics, full=writes.full, record=writes.best or writes.lead_now)
        if writes.lead_now and leader is not None:
            ray.get(leader.written.remote(self.trial_name, uri, value, metrics, self.leader_key))
        if writes.hold:
            self.group.call(Hold())  # kept in memory, written at the end if it leads
        if writes.best:
            ckpt.held = {"value": value, "metrics": dict(metrics), "uri": uri}
        return uri is not None

    def _release(self) -> None:
        """The trial is over: write its held best if it beats every checkpoint written."""
        if self.ckpt is None:
            return
        held, self.ckpt.held = self.ckpt.held, None
        leaderboard = self.plan.leaderboard
        if held is None or leaderboard is None or self.group is None or not self.group.alive:
            return
        key = self.leader_key
        if not self.started or not ray.get(leaderboard.improves.remote(held["value"], key)):
            return
        if held["uri"]:  # written in full when it was evaluated
            ray.get(
                leaderboard.written.remote(
                    self.ckpt.trial, held["uri"], held["value"], held["metrics"], key
                )
            )
            return
        _, prefix = storage.resolve(self.start_dir)
        reply = self.group.call(SaveHeld(prefix))
        uri = storage.uri_of(
            self.group.filesystem, reply["checkpoint"], like=self.plan.train_storage
        )
        metrics = {**held["metrics"], **{k: v for k, v in reply.items() if k != "checkpoint"}}
        ray.get(leaderboard.written.remote(self.ckpt.trial, uri, held["value"], metrics, key))

    def _save(self, metrics: dict[str, Any], full: bool, record: bool = False) -> str:
        """Have the workers write the state as it is now; keep what is still needed."""
        group = self.group
        _, prefix = storage.resolve(self.start_dir)
        reply = group.call(Save(prefix, weights_only=not full))
        uri = storage.uri_of(group.filesystem, reply["checkpoint"], like=self.plan.train_storage)
        metrics.update({k: v for k, v in reply.items() if k != "checkpoint"})
        ckpt = self.ckpt
        ckpt.latest = (uri, dict(metrics))
        if record:
            ckpt.records.add(uri)
        if full:
            self.full_at = time.monotonic()
            previous, ckpt.full = ckpt.full, uri
            if not self.pbt and previous and previous != uri and previous not in ckpt.records:
                storage.delete_dir(previous)  # superseded: only the latest resumes
        return uri

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        """A pointer to what the workers wrote for this report (written in full now, if
        Tune asks for a report that wrote nothing: a pause)."""
        import json

        ckpt = self.ckpt
        if ckpt.latest is None or int(ckpt.latest[1][M.STEP]) != self.step_now:
            if self.group is None or not self.started:
                raise RuntimeError(f"{self.trial_name}: nothing to checkpoint yet")
            self._save(dict(self.last_metrics), full=True)
        uri, metrics = ckpt.latest
        pointer = {
            "uri": uri,
            "resume": ckpt.full,
            M.TRAIN_RUN: metrics.get(M.TRAIN_RUN),
            "step": metrics[M.STEP],
        }
        with open(os.path.join(checkpoint_dir, POINTER_FILE), "w") as fh:
            json.dump(pointer, fh)
        if self.pbt and uri == ckpt.full:
            fs, path = storage.resolve(uri)
            checkpoint = train.Checkpoint(path, filesystem=fs)
            ray_private.register_checkpoint(ckpt.kept, checkpoint, metrics)
        return checkpoint_dir

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        """Restore (a fault restore, a resumed run, or a PBT donor's checkpoint): the next step
        starts from the pointer's resumable checkpoint; with none left, from step 0."""
        pointer = read_pointer(checkpoint_dir)
        uri = pointer.get("resume", pointer["uri"])
        own = f"/{self.trial_name}/start" in pointer["uri"]  # not a PBT donor's
        if own and (uri is None or not storage.exists(uri)):
            # Tune's saved state lags the run by up to its snapshot period, and a
            # superseded full checkpoint is deleted at once: after a driver crash the
            # pointer may name one that is gone. The trial's newest resumable one is then
            # the place to go on from (it is also the furthest along).
            newest = latest_resumable(storage.join(self.plan.train_storage, self.trial_name))
            if newest is not None:
                print(f"[{self.trial_name}] {uri} is gone; its newest checkpoint is {newest}")
                uri = newest
        if uri is None or not storage.exists(uri):
            # No resumable state (a weights-only report, or files deleted): start this
            # trial's hyperparameters from scratch rather than fail the whole run.
            print(f"[{self.trial_name}] no checkpoint to resume at {uri}; starting from step 0")
            uri = None
        else:
            print(
                f"[{self.trial_name}] restoring {uri} (reported at step {pointer['step']})",
                flush=True,
            )
        self.resume, self.started = uri, False

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """The next trial (or an exploit's new hyperparameters) on this actor and its group."""
        if self.ckpt is not None and self.ckpt.trial != self.trial_name:  # the last one is over
            self._release()
        if self.group is not None and self.group.alive and self.started:
            self.group.call(End())
        self._begin(new_config)
        return True

    def cleanup(self) -> None:
        try:
            self._release()  # a trial stopped (by the scheduler) as the actor goes
        finally:
            # a dead group (the pool sees it), or the pool closed at the sweep's end
            with contextlib.suppress(WorkerGroupError, ray.exceptions.RayActorError):
                if self.group is not None:
                    if self.started and self.group.alive:
                        self.group.call(End())  # the next lessee finds no trial loaded
                    if self.plan.groups is not None:
                        ray.get(self.plan.groups.give_back.remote(self.group.name))
