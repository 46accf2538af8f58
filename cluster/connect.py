"""Connect to a Ray cluster, or start the local single-node debug cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Environment every Ray worker gets. Offline by default: models and data come
#: from local folders or installed packages, and a hub call would only hang.
BASE_ENV_VARS: dict[str, str] = {
    "TOKENIZERS_PARALLELISM": "false",  # each worker already owns its CPU share
    # Fail a worker group that cannot start instead of retrying forever.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
    # Train V2 routes worker print() through its logger *and* stdout: every
    # progress line reached the console twice. Plain print, once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


@dataclass(frozen=True)
class Connection:
    """Where this driver is connected."""

    address: str | None  # None: a local cluster started by this process
    local: bool


def connect(
    address: str | None = None,
    local_num_cpus: int | None = None,
    env_vars: dict[str, str] | None = None,
) -> Connection:
    """Connect to ``address`` (or ``RAY_ADDRESS``); with neither, start a local cluster.

    A local cluster gets ``local_num_cpus`` CPUs (default: this machine's) and no GPUs.
    """
    import ray

    env = {**BASE_ENV_VARS, **(env_vars or {})}
    for key, value in env.items():
        os.environ.setdefault(key, value)  # the Train controller runs in this process's children
    target = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return Connection(target, local=not target)
    runtime_env = {"env_vars": env}
    if target:
        ray.init(address=target, runtime_env=runtime_env, log_to_driver=True)
        return Connection(target, local=False)
    ray.init(
        num_cpus=local_num_cpus or os.cpu_count() or 1,
        num_gpus=0,
        runtime_env=runtime_env,
        log_to_driver=True,
    )
    return Connection(None, local=True)


def disconnect() -> None:
    """Shut down this driver's Ray connection (and a local cluster it started)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
