"""Every use of Ray's non-public modules, in one place, each with why no public API does it.

Ray keeps these out of its public API, so an upgrade may move or change any of them.
``tests/cluster/test_ray_private.py`` calls each one on a real Ray and checks what
tunefleet relies on, so an upgrade that breaks one fails there, by name, before a
sweep does; ``tests/test_layers.py`` fails any other module that imports
``ray._private``, ``ray._raylet``, ``ray.train._internal`` or Tune's execution
internals. Written against Ray 2.60 (pinned in pyproject.toml).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# --- the processes of a local cluster this driver started ------------------------------


def local_cluster_pids() -> list[int]:
    """The processes of the Ray cluster this process started (``ray.init`` with no cluster
    to join: GCS, raylet, dashboard, log monitor, and their children: agents, workers);
    none when it joined one. ``ray.shutdown`` stops the ones it started with SIGTERM and a
    1-second grace, then SIGKILL; a raylet killed that way leaves its agents to find out
    on their own and report the death to a GCS that is gone (seen lingering over a minute
    on a loaded machine). Ray names its own processes only on the node object it keeps."""
    import psutil
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    pids: set[int] = set()
    for infos in (getattr(node, "all_processes", None) or {}).values():
        for info in infos:
            try:
                proc = psutil.Process(info.process.pid)
                pids.add(proc.pid)
                pids.update(child.pid for child in proc.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
    return sorted(pids)


# --- a Train run without Ray Datasets ------------------------------------------------


def without_dataset_manager(trainer_cls: type) -> type:
    """``trainer_cls`` (a Train V2 trainer) whose runs start no ``DatasetManager`` actor when
    given no Ray Datasets. Train adds its datasets callback to every run, and the callback
    starts that actor (a process: about 3.5 CPU-seconds on a 2-core AVX2 machine, imports
    mostly) before the workers' train context, datasets or not; tunefleet's workers read
    their rows from the object store, never from a Ray Dataset. No public option drops a
    default callback; the workers' shard provider is optional and stays None."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(trainer_cls):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


# --- Ray Train's checkpoint retention (warm PBT trials) ---------------------------------


def checkpoint_manager(checkpoint_config: Any) -> Any:
    """Ray Train's own bookkeeping of a run's checkpoints, applying a ``CheckpointConfig``'s
    retention (``num_to_keep`` by score) as a cold ``TorchTrainer`` run would: a warm PBT
    trial registers what it writes (``register_checkpoint``) so that the same ones are
    kept. Ray exposes the rule only inside a Train run."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager

    return _CheckpointManager(checkpoint_config)


def register_checkpoint(manager: Any, checkpoint: Any, metrics: dict[str, Any]) -> None:
    """Hand ``manager`` a checkpoint with the metrics it was reported with."""
    from ray.train._internal.session import _TrainingResult

    manager.register_checkpoint(_TrainingResult(checkpoint=checkpoint, metrics=metrics))


# --- what Tune copies into every trial actor's environment -----------------------------


def propagated_env_vars() -> set[str]:
    """The variables Tune copies from the driver's environment into every trial actor's
    runtime env. Tune has no setting for the list; it is a module global."""
    from ray.tune.execution import class_cache

    return set(class_cache.ENV_VARS_TO_PROPAGATE)


def set_propagated_env_vars(names: Iterable[str]) -> None:
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(names)


# --- the Job Submission SDK's token (tunefleet submit) ----------------------------------


def reload_auth_token() -> None:
    """Ray reads ``RAY_AUTH_MODE`` and the token once, when it is first imported; a
    process that sets them later (``--token-file``) must make Ray read them again. The
    SDK has no call for it."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    _enable_token_auth()
    AuthenticationTokenLoader.instance().reset_cache()


# --- what `ray job submit --working-dir` uploads ----------------------------------------


def walk_upload(
    working_dir: str, excludes: list[str], handler: Callable[[Path], None], quiet: str
) -> None:
    """Call ``handler`` on every path Ray's upload of ``working_dir`` takes: Ray's own walk
    with its own ignore rules (``excludes``, ``.gitignore``, ``.rayignore``), so the
    count, the size and "is this file shipped" agree with the upload exactly. ``quiet``:
    a logger name for the walk's messages (one per ignore file read), kept at WARNING."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).absolute()
    logger = logging.getLogger(quiet)
    logger.setLevel(logging.WARNING)
    _dir_travel(
        root, [_get_excludes(root, list(excludes))], handler, include_gitignore=True, logger=logger
    )


def upload_limit() -> int:
    """Ray's limit on an uploaded package (bytes): the GCS's maximum object size."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(GCS_STORAGE_MAX_SIZE)


# --- the autoscaler ----------------------------------------------------------------------


def autoscaler_config() -> Any | None:
    """The cluster config an autoscaler published to the GCS (its node groups), or None.
    No public API reads it."""
    from ray._private.state import state

    try:
        return state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: no autoscaler info
        return None


def autoscaler_status(address: str) -> Any:
    """The autoscaler v2's cluster status (``GetClusterStatusReply``), read from the GCS at
    ``address``: the public ``ray status`` prints it, but returns no object."""
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(address=address).get_cluster_status(timeout_s=10))
    return reply


def request_cluster_resources(address: str, bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler v2 to plan for ``bundles`` (a resource constraint; [] clears it):
    the channel behind ``ray.autoscaler.sdk.request_resources``, with the GCS address."""
    from ray.autoscaler.v2.sdk import request_cluster_resources as request

    request(address, [{"resources": b} for b in bundles])


# --- a restored Tuner's run config -----------------------------------------------------


def restored_run_config(tuner: Any) -> Any:
    """The ``RunConfig`` a restored ``Tuner`` runs with: the one pickled in ``tuner.pkl``
    when the run began, its callbacks and verbosity included. The live console holds a
    terminal and cannot travel in that pickle; a resume hands its own console in here.
    ``Tuner.restore`` takes no callbacks and Tune has no public setter."""
    return tuner._local_tuner.get_run_config()
