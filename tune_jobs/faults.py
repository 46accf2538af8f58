"""Which trial failures are retried, and the record that keeps the others from being retried.

Tune retries a failed trial from its last checkpoint up to ``resources.max_failures``
times (``FailureConfig``), whatever the cause. That is right for the faults of the
cluster: a worker process killed (OOM killer, preemption), a node lost, a collective
cut by a dead peer, storage that stayed down past its own retries. It is wrong for an
error of the trial's own code (a loss that became NaN, a CUDA out-of-memory, a model
that does not build): retried from the same checkpoint with the same seed and data it
fails again, and each retry costs a worker group's start and up to an evaluation
interval. Kubernetes Jobs draw the same line (``podFailurePolicy``: ignore
disruptions, fail the Job on the application's exit codes).

So a trial whose code raised records why in ``<run>/failures/<trial>.json`` before it
fails; Tune's retry of it then fails at once with the same reason, before any worker
starts (``refuse_if_failed``). Tune offers no public hook to skip a retry by the
exception's type; the record also survives the driver, so ``tunefleet resume`` does not
re-run such a trial either.

Which is which is decided by the exception's type (``is_transient``), carried from a
warm group's worker by name (``trainers.serve.Failed.types``); words in the traceback
count only where no type in the chain decides.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

from cluster import storage
from cluster.storage import StorageUnavailable
from tune_jobs import layout


class TrialFailed(RuntimeError):
    """A trial's own code failed before; retrying it from the same checkpoint would too."""


def _names(*classes: type) -> frozenset[str]:
    return frozenset(f"{c.__module__}.{c.__qualname__}" for c in classes)


@functools.cache
def own_types() -> frozenset[str]:
    """tunefleet's own errors of a trial: its loss diverged, its batch does not fit, its
    model, config, data or checkpoint is unusable. Retried, each fails the same way."""
    from trainers.checkpoint import CorruptCheckpoint
    from trainers.config import ConfigError
    from trainers.data import DataError
    from trainers.engine import OutOfMemory, TrainingDiverged
    from trainers.model import ModelError

    return _names(
        TrainingDiverged, OutOfMemory, ModelError, ConfigError, DataError, CorruptCheckpoint
    )


@functools.cache
def cluster_types() -> frozenset[str]:
    """Errors that say the cluster failed: a process or node that died, an object lost
    with it, a collective cut by a dead peer, a connection dropped, storage that stayed
    unreachable past its retries."""
    import ray.exceptions as rx
    import torch.distributed as dist

    return _names(
        rx.RayActorError,  # ActorDiedError, ActorUnavailableError
        rx.NodeDiedError,
        rx.OwnerDiedError,
        rx.ObjectLostError,
        rx.WorkerCrashedError,
        dist.DistBackendError,
        dist.DistNetworkError,
        ConnectionError,  # reset, refused, aborted, broken pipe
        StorageUnavailable,
    )


#: Last resort, for an error whose type says nothing: gloo reports a dead peer as a bare
#: ``RuntimeError`` whose text alone names it.
TRANSIENT_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_transient(types: Sequence[str], text: str = "") -> bool:
    """Did the cluster fail rather than the trial's own code? Decided by the classes of the
    exception and of those it was raised from (``trainers.serve.error_types``: each
    one's MRO, outermost first): the first that is tunefleet's own or the cluster's
    decides. Only when none is either do the words of ``text`` count
    (``TRANSIENT_WORDS``); anything else is the trial's own (not retried)."""
    own, cluster = own_types(), cluster_types()
    for name in types:
        if name in own:
            return False
        if name in cluster:
            return True
    return any(word in text for word in TRANSIENT_WORDS)


def exception_is_transient(exc: BaseException) -> bool:
    """``is_transient`` of an exception caught in this process."""
    from trainers.serve import error_types

    return is_transient(error_types(exc), str(exc))


def record(folder: str | None, trial: str, error: BaseException | str) -> None:
    """Note that ``trial``'s own code failed (its retries then fail at once)."""
    if not folder:
        return
    text = str(error)
    storage.write_text(
        storage.join(folder, f"{trial}.json"),
        json.dumps({"trial": trial, "error": text, "type": type(error).__name__}, indent=2),
    )


def recorded(folder: str | None, trial: str) -> dict[str, Any] | None:
    """The failure recorded for ``trial``, or None."""
    if not folder:
        return None
    path = storage.join(folder, f"{trial}.json")
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def refuse_if_failed(folder: str | None, trial: str) -> None:
    """Raise ``TrialFailed`` if ``trial``'s code failed before (called as a trial starts)."""
    failure = recorded(folder, trial)
    if failure is None:
        return
    print(
        f"[{trial}] not retried: its own code failed before (see {layout.FAILURES_DIR}/{trial}.json)"
    )
    # the last line stays the original cause: the summary shows that line
    raise TrialFailed(
        "not retried: the trial's own code failed, and would fail again from the same "
        f"checkpoint:\n{failure['error']}"
    )


class PopulationGuard(Callback, Stopper):
    """Ends the whole run once any trial has failed for good (a Tune callback and stopper).

    For a synchronous PBT/PB2 population, whose members wait for one another at every
    interval: a member in ERROR would leave the rest paused forever (seen). Tune's
    ``fail_fast`` would also end the run on the first *recoverable* failure, so the
    retries would never happen; ``on_trial_error`` is called only once a trial is past
    its retries.
    """

    def __init__(self) -> None:
        self.failed: str | None = None

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed = str(trial)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        if self.failed:
            print(
                f"stopping the population: {self.failed} failed past its retries "
                "(a synchronous population would wait for it forever)",
                flush=True,
            )
        return self.failed is not None
