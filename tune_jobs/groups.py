"""Warm worker groups: one Ray Train worker group serves trial after trial.

A cold trial starts a Train run of its own: a controller, a synchronization
actor, a placement-group cleaner and the workers, each a fresh process that
imports torch and transformers, loads the model and tokenizes the data; a PBT
exploit starts all of that again. Here a trial is a Tune class ``Trainable``
(``tune_jobs.warm.WarmTrial``) that drives a ``WarmGroup``: one long-lived ``TorchTrainer`` run
whose workers run ``trainers.serve.serve`` and take commands through a
``Mailbox`` actor (``tune_jobs.mailbox``). With ``reuse_actors`` Tune hands the trainable,
and so its group, to the next trial (``reset_config``) and to exploits (``reset_config``
then ``load_checkpoint``); a new trainable leases a group that another gave
back: the base model and the tokenized data are loaded once per worker per
sweep.

The groups belong to the sweep, not to Tune's trial actors: a ``GroupPool``
actor (one per run, owned by the driver) hosts them, and a trial actor leases
one at its first step and gives it back when Tune stops the actor. Tune keeps a
stopped trial's actor for the next trial only while its actor cache has room,
which depends on the order of pauses and starts (measured: a synch PBT
population of two started a third group when Tune stopped a paused member's
actor and started a new one); the pool hands the next actor the group the
stopped one gave back.

    Tune --step()--> WarmTrial --Interval--> Mailbox <--poll-- workers (serve)
         <--metrics--          <--reply---          --reply--> (rank 0)

A group whose workers died (an error in a command, a killed process) is
closed and a new one is built for the next command; the failing trial errors
as before.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from typing import TYPE_CHECKING, Any

import ray

# Imported by WarmGroup, in the process that hosts the group (the pool's): a warm trial's
# actor, which only drives a group, never imports torch.
if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

from cluster import ray_private, storage
from trainers import metrics as M
from trainers.serve import End, Exit, Failed, Interval, Save, Start, pack, serve, unpack
from tune_jobs import faults, layout
from tune_jobs.layout import next_numbered
from tune_jobs.mailbox import Mailbox
from tune_jobs.space import trial_hparams
from tune_jobs.trial import (
    TrialPlan,
    loop_config,
)

#: Seconds between the driver's checks that the group is still alive while it waits.
WAIT_POLL_S = 5.0


class WorkerGroupError(RuntimeError):
    """The group's workers failed while serving a command (the message holds their error).

    ``transient``: the cluster failed (a worker died, a collective was cut), not the
    trial's code; Tune's retry from the last checkpoint may then succeed.
    """

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)  # args: the message only (Ray rebuilds it from them)
        self.transient = transient


class GroupLink:
    """A trial's side of a warm group: its name, storage and mailbox; ``call`` sends a
    command and waits for rank 0's reply. Where the group's Train run is hosted, and so
    whether it is alive, is the subclass's (``WarmGroup`` here, ``LeasedGroup`` in a pool)."""

    name: str
    filesystem: Any
    mailbox: Any

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def failure_text(self) -> str:
        """Why the group's Train run ended (its exception, or that it returned)."""
        raise NotImplementedError

    def wait_ended(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the group's Train run to end."""
        raise NotImplementedError

    @staticmethod
    def path_of(uri: str | None) -> str | None:
        """A checkpoint's URI as a path in the group's filesystem (what its workers read)."""
        return storage.resolve(uri)[1] if uri else None

    def call(self, command: Any) -> Any:
        """Send ``command`` to every worker; rank 0's reply (raises if the group failed)."""
        seq = ray.get(self.mailbox.send.remote(pack(command)))
        while True:
            ready, reply = ray.get(self.mailbox.result.remote(seq, WAIT_POLL_S))
            if ready:
                reply = unpack(reply)
                if isinstance(reply, Failed):
                    self.wait_ended(60)  # the run ends: its workers raised
                    raise WorkerGroupError(
                        f"warm group {self.name}: {reply.error}",
                        faults.is_transient(reply.types, reply.error),
                    )
                return reply
            if not self.alive:
                cause = [x for x in self.failure_text().splitlines() if x.strip()]
                # the last line is what a trial's summary shows: say where, and the cause
                raise WorkerGroupError(
                    "\n".join(
                        cause[:-1]
                        + [
                            f"warm group {self.name} died while serving "
                            f"{type(command).__name__}: {cause[-1].strip()[:300]}"
                        ]
                    ),
                    transient=True,  # its processes died without a word: the cluster's doing
                )


class WarmGroup(GroupLink):
    """One long-lived Train run serving commands, hosted by this process (a thread runs
    ``TorchTrainer.fit``; the Train controller it starts is owned by this process)."""

    def __init__(
        self, plan: TrialPlan, name: str, taken: set[str] | frozenset[str] = frozenset()
    ) -> None:
        """``name``: a prefix, numbered over the run's groups and the names in ``taken``."""
        from ray import train
        from ray.train import LoggingConfig
        from ray.train.torch import TorchTrainer

        spec, res = plan.spec, plan.resources
        self.name = next_numbered(plan.train_storage, name, taken)
        self.filesystem, _ = storage.resolve(plan.train_storage)
        self.mailbox = Mailbox.remote()
        base = loop_config(spec, trial_hparams(spec, {}), plan.data_ref, res, self.name)
        trainer = ray_private.without_dataset_manager(TorchTrainer)(
            serve,
            train_loop_config={
                "worker": base.to_dict(),
                "mailbox": self.mailbox,
                "filesystem": self.filesystem,
            },
            scaling_config=train.ScalingConfig(
                num_workers=res.num_workers,
                use_gpu=res.gpus_per_worker > 0,
                resources_per_worker=res.worker_bundle(),
                placement_strategy=res.placement_strategy,
            ),
            run_config=train.RunConfig(
                name=self.name,
                **storage.ray_storage(plan.train_storage),
                failure_config=train.FailureConfig(max_failures=0),
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True)
        self.thread.start()

    def _fit(self, trainer: TorchTrainer) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported by call()
            self.failure = exc

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def failure_text(self) -> str:
        return str(self.failure or "its Train run returned")

    def wait_ended(self, timeout: float) -> None:
        self.thread.join(timeout=timeout)

    def close(self) -> None:
        """Let the workers leave their loop and the run end; then drop the mailbox."""
        with contextlib.suppress(Exception):  # a mailbox already gone: nothing to tell
            if self.alive:
                ray.get(self.mailbox.send.remote(pack(Exit())))
                self.thread.join(timeout=120)
            ray.kill(self.mailbox)


#: Seconds a lease waits between looks for a group given back (or a lessee gone).
LEASE_POLL_S = 2.0


@ray.remote(num_cpus=0, max_concurrency=64)
class GroupPool:
    """The sweep's warm groups, hosted here so that they outlive the trial actors using them.

    ``lease``: a trial actor takes an idle group, or a new one while fewer than ``size``
    (the trials that run at once) exist; past that it waits for one given back rather
    than start a group whose workers would wait for the resources an idle one holds.
    ``give_back``: the actor is stopping; its group serves the next. ``renew``: the
    lessee's group died; it is closed and a new one takes its place under the same
    lease. A lessee that died without giving its group back (its process killed) is
    found when a lease waits (a probe of the dead actor fails at once), and its group is
    closed: it may be mid-command for a trial that is gone.

    ``make_group(plan, name)`` builds a group (``WarmGroup``; tests pass a lighter one).
    """

    def __init__(self, plan: TrialPlan, size: int, make_group: Any = None) -> None:
        self.plan, self.size = plan, max(1, size)
        self.make_group = make_group or WarmGroup
        self.groups: dict[str, Any] = {}
        self.idle: list[str] = []
        self.lessees: dict[str, Any] = {}  # group -> the trial actor holding it
        self.probes: dict[str, Any] = {}  # group -> a pending liveness probe of its lessee
        self.named: set[str] = set()  # every name given (a run's folder appears later)
        self.changed = threading.Condition()

    def lease(self, lessee: Any) -> tuple[str, Any, Any]:
        """``(name, mailbox, filesystem)`` of a group for ``lessee`` (an actor handle)."""
        waited = False
        with self.changed:
            while True:
                self._drop_dead_idle()
                if self.idle:
                    name = self.idle.pop()
                    break
                if len(self.groups) < self.size:
                    name = self._build()
                    break
                if not self._reclaim_from_dead_lessees():
                    if not waited:
                        print(f"warm groups: all {self.size} leased; waiting for one given back")
                        waited = True
                    self.changed.wait(LEASE_POLL_S)
            self.lessees[name] = lessee
            group = self.groups[name]
            return name, group.mailbox, group.filesystem

    def give_back(self, name: str) -> None:
        with self.changed:
            self.lessees.pop(name, None)
            self.probes.pop(name, None)
            if name in self.groups:
                self.idle.append(name)
            self.changed.notify_all()

    def renew(self, name: str) -> tuple[str, Any, Any]:
        """The lessee's group ``name`` died: close it; a new group under the same lease."""
        with self.changed:
            lessee = self.lessees.pop(name, None)
            self.probes.pop(name, None)
            group = self.groups.pop(name, None)
        if group is not None:
            group.close()
        with self.changed:
            new = self._build()
            self.lessees[new] = lessee
            return new, self.groups[new].mailbox, self.groups[new].filesystem

    def alive(self, name: str) -> bool:
        group = self.groups.get(name)
        return group is not None and group.alive

    def failure_text(self, name: str) -> str:
        group = self.groups.get(name)
        return group.failure_text() if group is not None else "closed by the pool"

    def wait_ended(self, name: str, timeout: float) -> None:
        group = self.groups.get(name)
        if group is not None:
            group.wait_ended(timeout)

    def names(self) -> dict[str, list[str]]:
        """Every group, and the idle ones (what the tests look at)."""
        return {"all": sorted(self.groups), "idle": sorted(self.idle)}

    def close_all(self, keep: int = 0) -> list[tuple[str, Any, Any]]:
        """The sweep is over: every group's run ends (in parallel; each waits for its
        workers) but ``keep`` idle ones, returned as leases for the driver's own model work
        (the export: ``trainers.serve.Call``); a later ``close_all()`` ends those too."""
        with self.changed:
            self._drop_dead_idle()
            kept = {n: self.groups[n] for n in self.idle[:keep]}
            groups = [g for n, g in self.groups.items() if n not in kept]
            self.groups, self.idle = dict(kept), list(kept)
            self.lessees.clear()
            self.probes.clear()
        closers = [threading.Thread(target=g.close, daemon=True) for g in groups]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join()
        return [(n, g.mailbox, g.filesystem) for n, g in kept.items()]

    def _build(self) -> str:
        # under self.changed: names are taken one at a time (group<k>, k over the run)
        group = self.make_group(self.plan, "group", frozenset(self.named))
        self.groups[group.name] = group
        self.named.add(group.name)
        return group.name

    def _drop_dead_idle(self) -> None:
        for name in [n for n in self.idle if not self.groups[n].alive]:
            self.idle.remove(name)
            self.groups.pop(name).close()

    def _reclaim_from_dead_lessees(self) -> bool:
        """Close the groups of lessees that died; any closed? A busy lessee's probe waits in
        its queue (it is alive); a dead one's fails at once."""
        dead = []
        for name, lessee in self.lessees.items():
            probe = self.probes.get(name)
            if probe is None:
                probe = self.probes[name] = lessee.__ray_ready__.remote()
            ready, _ = ray.wait([probe], timeout=0)
            if not ready:
                continue
            del self.probes[name]
            try:
                ray.get(probe)
            except ray.exceptions.RayActorError:
                dead.append(name)
        for name in dead:
            print(f"warm groups: the trial actor holding {name} died; closing it")
            del self.lessees[name]
            # closed apart: a live group's close waits for its workers (up to 120 s), and
            # every pool call waits for this lock meanwhile
            threading.Thread(target=self.groups.pop(name).close, daemon=True).start()
        return bool(dead)


class LeasedGroup(GroupLink):
    """A group of the sweep's ``GroupPool``, seen from the trial actor that leased it."""

    def __init__(self, pool: Any, lease: tuple[str, Any, Any]) -> None:
        self.pool = pool
        self.name, self.mailbox, self.filesystem = lease

    @property
    def alive(self) -> bool:
        return ray.get(self.pool.alive.remote(self.name))

    def failure_text(self) -> str:
        return ray.get(self.pool.failure_text.remote(self.name))

    def wait_ended(self, timeout: float) -> None:
        ray.get(self.pool.wait_ended.remote(self.name, timeout))


class ProcessGroup(GroupLink):
    """A single-process trial's worker: a ``trainers.serve.Server`` in the trial actor's own
    process, taking the same commands as a warm group's workers (``call`` runs them here).
    Tune hands the actor, and so the model and data it loaded, from trial to trial."""

    name = "process"  # what reports show as their ``train_run``: no Train run of its own

    def __init__(self, plan: TrialPlan) -> None:
        self.plan = plan
        self.filesystem, _ = storage.resolve(plan.train_storage)
        self.server: Any = None  # built by the first command (its failure is the trial's)
        self.failure: str | None = None

    @property
    def alive(self) -> bool:
        return self.failure is None

    def failure_text(self) -> str:
        return self.failure or "alive"

    def wait_ended(self, timeout: float) -> None:
        return None  # nothing runs apart from this process

    def call(self, command: Any) -> Any:
        """Run ``command`` here; a failure is raised as a group's would be, and ends this
        server (its state is then unknown: the next command gets a new one)."""
        from trainers.serve import ProcessContext, Server

        try:
            if self.server is None:
                spec, res = self.plan.spec, self.plan.resources
                base = loop_config(
                    spec, trial_hparams(spec, {}), self.plan.data_ref, res, self.name
                )
                board = self.plan.leaderboard  # the live console's (tune_jobs.console)
                context = ProcessContext(
                    self.filesystem,
                    res.gpus_per_worker > 0,
                    progress=None if board is None else board.step.remote,
                )
                self.server = Server(base, context)
            return self.server.handle(command)
        except Exception as exc:
            self.failure = traceback.format_exc(limit=8)
            raise WorkerGroupError(
                f"trial process: {self.failure}",
                faults.exception_is_transient(exc),
            ) from exc


def run_on_group(
    group: WarmGroup, plan: TrialPlan, hp: dict[str, Any], name: str, resume: str | None = None
) -> list[tuple[dict[str, Any], str | None]]:
    """One trial on ``group``, outside Tune (the smoke pass's restore check, benchmarks,
    tests): every report, with the URI of its checkpoint (a full one at every evaluation,
    all kept; none with ``save_checkpoints`` off)."""
    cfg = loop_config(
        plan.spec,
        hp,
        plan.data_ref,
        plan.resources,
        name,
        plan.schedule_hparams(),
        group.path_of(resume),
    )
    group.call(Start(cfg))
    trial_dir = storage.join(plan.train_storage, name)
    _, prefix = storage.resolve(storage.join(trial_dir, next_numbered(trial_dir, layout.START)))
    reports = []
    while True:
        reply = group.call(Interval())
        metrics, uri = dict(reply["metrics"]), None
        if hp["save_checkpoints"]:
            saved = group.call(Save(prefix))
            uri = storage.uri_of(group.filesystem, saved.pop("checkpoint"), like=plan.train_storage)
            metrics.update(saved)
        reports.append((metrics, uri))
        if reply["done"]:
            group.call(End())
            return reports


@ray.remote
class ProcessHost:
    """A fresh process hosting a ``ProcessGroup`` outside Tune (the smoke pass's restore
    check of a one-worker DDP trial): the same restore code, without a Train run's start."""

    def __init__(self, plan: TrialPlan) -> None:
        self.group = ProcessGroup(plan)

    def run(
        self, hp: dict[str, Any], name: str, resume: str | None
    ) -> list[tuple[dict[str, Any], str | None]]:
        return run_on_group(self.group, self.group.plan, hp, name, resume)


def resume_check(plan: TrialPlan, hp: dict[str, Any], uri: str, extra_steps: int) -> list[int]:
    """Restore a checkpoint in new worker processes for ``extra_steps`` more steps; the steps
    it reports. One DDP worker restores in one fresh process (``ProcessHost``: seconds);
    more workers, or DeepSpeed's per-rank shards, on a new warm group (a Train run).

    Run from the driver (outside Tune) by the smoke pass: proves that a
    checkpoint holds what is needed to continue.
    """
    import json

    from trainers.checkpoint import MANIFEST

    step = int(json.loads(storage.read_text(storage.join(uri, MANIFEST)))["step"])
    hp = {**hp, "max_steps": step + extra_steps, "eval_steps": extra_steps}
    spec, res = plan.spec, plan.resources
    if res.num_workers == 1 and spec.distributed.strategy == "ddp":
        host = ProcessHost.options(
            num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker
        ).remote(plan)
        try:
            reports = ray.get(host.run.remote(hp, "resume-check", uri))
        finally:
            ray.kill(host)
    else:
        group = WarmGroup(plan, "resume-check")
        try:
            reports = run_on_group(group, plan, hp, "resume-check", uri)
        finally:
            group.close()
    return [int(metrics[M.STEP]) for metrics, _ in reports]
