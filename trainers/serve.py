"""A warm worker: one Ray Train worker that serves trial after trial, on command.

A warm worker group is one long-lived ``TorchTrainer`` run whose workers run
``serve`` instead of a single trial's loop (``tune_jobs.groups`` drives it); a
single-process trial hosts one ``Server`` in its own process and sends it the same
commands (``ProcessContext``). Each worker builds what a trial would build every time (``trainers.loop.Worker``:
torch and transformers imported, the tokenizer, its tokenized shards, the base
model in memory) once, then takes commands from a mailbox actor:

    Start(cfg)        a trial's state: the base model, or ``cfg.resume_from``
    Interval()        train to the next evaluation, evaluate, reply with the
                      report (rank 0)
    Save(prefix, weights_only)
                      write the state as it is now (just evaluated) under
                      ``prefix`` in storage: the driver decides which
                      evaluations are worth their bytes
    Hold()            keep a CPU copy of the weights as they are now (just
                      evaluated: the trial's best so far), replacing the last one
    SaveHeld(prefix)  write that copy, weights only (DDP groups)
    End()             drop the trial's state and its held copy (the base stays)
    Exit()            leave the loop: the Train run ends

Every rank takes every command in the same order; rank 0 replies. A command
that raises on a worker ends the Train run (the driver sees it and rebuilds
the group for the next trial); the error's text reaches the driver first.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainers.config import WorkerConfig
from trainers.context import RayTrainContext

# The commands below are read by processes that never train (a warm trial's actor):
# torch and transformers are imported where a worker starts, not here.
if TYPE_CHECKING:
    from trainers.loop import TrialRun

#: Seconds a worker waits for a command in one poll (it polls again; an idle group
#: costs one small actor call per worker per poll).
POLL_S = 30.0


@dataclass(frozen=True)
class Start:
    cfg: WorkerConfig  # the trial's config; ``resume_from`` is the checkpoint to restore


@dataclass(frozen=True)
class Interval:
    pass


@dataclass(frozen=True)
class Save:
    prefix: str  # storage path (in the group's filesystem) for ``checkpoint_<step>``
    weights_only: bool = False  # an export candidate: no optimizer or RNG state


@dataclass(frozen=True)
class Hold:
    pass


@dataclass(frozen=True)
class SaveHeld:
    prefix: str  # storage path (in the group's filesystem) for ``checkpoint_<step>``


@dataclass(frozen=True)
class End:
    pass


@dataclass(frozen=True)
class Call:
    """``fn(*args)`` on rank 0 (the other ranks wait for the next command): the model work
    after a sweep (the export's reload and scoring) in a process that has torch and the
    model's libraries loaded, not a new one. Object refs among ``args`` arrive resolved.
    What ``fn`` raises comes back as ``Raised``: the caller's to handle, the group lives."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Raised:
    error: BaseException


@dataclass
class Held:
    """A trial's best evaluation so far, kept in memory until the driver decides it is worth
    writing (rank 0 only: DDP replicas are identical)."""

    state: dict[str, Any]  # the parameters that differ from the base model, on the CPU
    report: dict[str, Any]
    step: int


@dataclass(frozen=True)
class Exit:
    pass


@dataclass(frozen=True)
class Failed:
    """What rank 0 replies when a command raised on it (the run then ends): the traceback,
    and the classes of the exception and of those it was raised from (``error_types``),
    by name, so the driver can tell the trial's own errors from the cluster's by type
    (``tune_jobs.faults``) without unpickling the exception itself."""

    error: str
    types: tuple[str, ...] = ()


def error_types(exc: BaseException) -> tuple[str, ...]:
    """``module.QualName`` of every class (the whole MRO) of ``exc`` and of each exception
    in its chain (``__cause__``, else ``__context__``), outermost first."""
    names: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names += [f"{c.__module__}.{c.__qualname__}" for c in type(current).__mro__]
        current = current.__cause__ or current.__context__
    return tuple(names)


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint taken at ``step`` (under an ``Interval``'s prefix)."""
    return f"checkpoint_{step:06d}"


#: How often a single-process trial tells the driver its step between evaluations (s).
PROGRESS_EVERY_S = 1.0


class StorageContext:
    """``WorkerContext`` of a worker that serves commands: checkpoints are read from and
    written to storage (``filesystem``), and reports go back as replies, not through Ray."""

    rank: int
    world_size: int
    node_ids: str
    filesystem: Any

    def stepped(self, name: str, step: int, total: int) -> None:
        return None

    @contextlib.contextmanager
    def checkpoint_dir(self, uri: str | None) -> Iterator[str | None]:
        """A local copy of the checkpoint at ``uri`` (a path in the group's filesystem)."""
        if not uri:
            yield None
            return
        import ray.train

        with ray.train.Checkpoint(uri, filesystem=self.filesystem).as_directory() as folder:
            yield folder

    def save(
        self, run: TrialRun, report: dict[str, Any], command: Save, held: Held | None = None
    ) -> dict[str, Any] | None:
        """Write the trial's state now (or its ``held`` copy, weights only) and upload this
        rank's part; rank 0's reply once every rank's part is in storage."""
        import pyarrow.fs
        import torch.distributed as dist

        from trainers import metrics as M
        from trainers.loop import save_held, save_state

        s = run.state
        step = held.step if held else s.step
        uri = f"{command.prefix}/{checkpoint_name(step)}"
        figures: dict[str, float] = {}
        started = time.perf_counter()
        if self.rank == 0 or (s.engine.every_rank_saves and held is None):
            with tempfile.TemporaryDirectory(prefix=f"tunefleet-step{step}-") as tmp:
                if held is None:
                    figures = save_state(tmp, run.worker, run.cfg, s, report, command.weights_only)
                else:
                    figures = save_held(tmp, run, held)
                self.filesystem.create_dir(uri, recursive=True)
                pyarrow.fs.copy_files(
                    tmp,
                    uri,
                    source_filesystem=pyarrow.fs.LocalFileSystem(),
                    destination_filesystem=self.filesystem,
                )
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's shards are in storage before the driver hears of them
        if self.rank != 0:
            return None
        figures[M.CHECKPOINT_SECONDS] = time.perf_counter() - started  # upload included
        return {"checkpoint": uri, **figures}


class WarmContext(StorageContext, RayTrainContext):
    """A Ray Train worker of a warm group."""

    def __init__(self, filesystem: Any) -> None:
        RayTrainContext.__init__(self, resume_from=None)
        self.filesystem = filesystem


class ProcessContext(StorageContext):
    """A single-process trial: the Tune trial's own process is its one worker (rank 0 of 1)."""

    rank = 0
    world_size = 1

    def __init__(
        self,
        filesystem: Any,
        use_gpu: bool,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        import ray
        import torch

        self.filesystem = filesystem
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.node_ids = ray.get_runtime_context().get_node_id()
        self.progress = progress  # the driver's console: (trial, step, total), fire and forget
        self._told = 0.0

    def stepped(self, name: str, step: int, total: int) -> None:
        now = time.monotonic()
        if self.progress is not None and (now - self._told >= PROGRESS_EVERY_S or step == total):
            self._told = now
            self.progress(name, step, total)

    def prepare_model(self, model: Any) -> Any:
        return model.to(self.device)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        yield None  # ``Start`` names the checkpoint to restore (``checkpoint_dir``)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        raise RuntimeError("a served trial replies with its reports (Interval)")


class Server:
    """One worker's side of the protocol, in whatever process hosts it (a warm group's Ray
    Train worker through ``serve``, or a single-process trial's own process): the
    worker's cached model and data, the trial it runs and its held copy. ``handle`` runs
    one command and returns its reply (rank 0's is the one the driver reads)."""

    def __init__(self, base: WorkerConfig, ctx: StorageContext) -> None:
        from trainers.loop import Worker

        self.base = base
        self.ctx = ctx
        self.worker = Worker(base, ctx)
        self.run: TrialRun | None = None
        self.report: dict[str, Any] = {}
        self.held: Held | None = None

    def handle(self, command: Any) -> Any:
        from trainers import metrics as M

        ctx = self.ctx
        result: Any = None
        if isinstance(command, Start):
            self.run, self.held = None, None
            gc.collect()
            cfg = command.cfg
            _same_group(self.base, cfg)
            with ctx.checkpoint_dir(cfg.resume_from) as folder:
                self.run = self.worker.start(cfg, folder)
            result = {
                "step": self.run.state.step,
                "last_step": self.run.state.last_step,
                "pid": os.getpid(),  # rank 0's process (tests kill it to fake a crash)
            }
        elif isinstance(command, Interval):
            run = _running(self.run)
            run.train_to_next_evaluation()
            self.report = run.evaluate()
            result = {"metrics": {**self.report, M.WORKER_NODES: ctx.node_ids}, "done": run.done}
        elif isinstance(command, Save):
            result = ctx.save(_running(self.run), self.report, command)
        elif isinstance(command, Hold):
            if ctx.rank == 0:
                from trainers.loop import trained_state

                # what differs from the base only (an adapter under LoRA), not the whole model
                state = _running(self.run).state
                self.held = Held(
                    trained_state(state.model, state.trained), dict(self.report), state.step
                )
        elif isinstance(command, SaveHeld):
            if ctx.rank == 0 and self.held is None:
                raise RuntimeError("warm group: SaveHeld without Hold")
            result = ctx.save(_running(self.run), self.report, Save(command.prefix), self.held)
        elif isinstance(command, End):
            self.run, self.held = None, None
            gc.collect()
        elif isinstance(command, Call) and ctx.rank == 0:
            import ray

            args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in command.args]
            try:
                result = command.fn(*args)
            except Exception as exc:  # noqa: BLE001 - the caller's (a corrupt checkpoint...)
                result = Raised(exc)
        if self.run is not None:  # serving and awaiting commands is not training time
            self.run.progress.since = time.perf_counter()
        return result


def pack(message: Any) -> bytes:
    """A command or reply as a warm group's mailbox holds it: pickled here, so the mailbox
    never deserializes it and never imports what it is made of (``tune_jobs.mailbox``).
    Bytes, not an object put in the store: a reply must outlive its sender (a worker
    that replies with its failure and then exits owns nothing a reader can get)."""
    from ray import cloudpickle

    return cloudpickle.dumps(message)


def unpack(packed: bytes) -> Any:
    """The message ``pack`` pickled."""
    from ray import cloudpickle

    return cloudpickle.loads(packed)


def serve(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of a warm group: serve commands until ``Exit``."""
    import ray

    mailbox = config["mailbox"]
    ctx = WarmContext(config["filesystem"])
    server = Server(WorkerConfig.from_dict(config["worker"]), ctx)
    for seq in itertools.count():
        packed = None
        while packed is None:
            packed = ray.get(mailbox.command.remote(seq, POLL_S))
        command = unpack(packed)
        if isinstance(command, Exit):
            return
        try:
            result = server.handle(command)
        except BaseException as exc:
            if ctx.rank == 0:
                failed = Failed(traceback.format_exc(limit=8), error_types(exc))
                ray.get(mailbox.reply.remote(seq, pack(failed)))
            raise
        if ctx.rank == 0:
            ray.get(mailbox.reply.remote(seq, pack(result)))


def _running(run: TrialRun | None) -> TrialRun:
    if run is None:
        raise RuntimeError("warm group: a training command before Start")
    return run


def _same_group(base: WorkerConfig, cfg: WorkerConfig) -> None:
    """A trial must fit the group it is sent to: same model, data, threads, strategy. Not
    the seed: a trial may carry its own (a reevaluation's), and the worker keeps a
    pristine model per seed (``trainers.loop.BaseModels``)."""
    for key in ("model", "max_length", "threads", "distributed"):
        if getattr(base, key) != getattr(cfg, key):
            raise ValueError(
                f"warm group: trial {cfg.name} has {key}={getattr(cfg, key)!r}, the group "
                f"{getattr(base, key)!r}"
            )
