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
"""

from __future__ import annotations

import json
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

from cluster import storage

FAILURES_DIR = "failures"

#: Text of an error that says the cluster failed, not the trial's code: a process or node
#: that died, a collective cut by a dead peer, storage that stayed unreachable.
TRANSIENT_MARKERS = (
    "ActorDiedError",
    "RayActorError",
    "ActorUnavailableError",
    "NodeDiedError",
    "OwnerDiedError",
    "ObjectLostError",
    "WorkerCrashedError",
    "DistBackendError",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "StorageUnavailable",
)


class TrialFailed(RuntimeError):
    """A trial's own code failed before; retrying it from the same checkpoint would too."""


def is_transient(error_text: str) -> bool:
    """Does this error (its traceback text) say the cluster failed rather than the trial?"""
    return any(marker in error_text for marker in TRANSIENT_MARKERS)


def failures_dir(run_dir: str) -> str:
    return storage.join(run_dir, FAILURES_DIR)


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
    print(f"[{trial}] not retried: its own code failed before (see {FAILURES_DIR}/{trial}.json)")
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
