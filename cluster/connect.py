"""Connect to a Ray cluster, or start the local single-node debug cluster."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

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


#: Added for a local cluster only. It has no node a cloud can take back: Ray Train's
#: preemption watcher (an actor per Train run, polling the nodes) would watch nothing
#: and cost a process's start-up (about 3 CPU-seconds here) per warm group.
LOCAL_ENV_VARS: dict[str, str] = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


#: Where Ray's state and job clients look for the dashboard before anything else.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


@dataclass(frozen=True)
class Connection:
    """Where this driver is connected."""

    address: str | None  # None: a local cluster started by this process
    local: bool

    def describe(self) -> str:
        """One line: which cluster this run uses."""
        if self.local:
            return (
                "local Ray cluster started by this run (a cluster already running here is not used)"
            )
        return f"Ray cluster at {self.address}"


def job_env_vars() -> dict[str, str]:
    """Environment variables the submitted job's runtime env already sets (none outside a job).

    Ray refuses to merge a driver's runtime env with the job's when both set the
    same variable, so the driver adds only the ones the job lacks.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    runtime_env = json.loads(raw).get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})


def connect(
    address: str | None = None,
    local_num_cpus: int | None = None,
    env_vars: dict[str, str] | None = None,
) -> Connection:
    """Connect to ``address`` (or ``RAY_ADDRESS``); with neither, start a local cluster.

    A local cluster gets ``local_num_cpus`` CPUs (default: this machine's) and no GPUs.
    It is always a new one (``address="local"``): a plain ``ray.init()`` would
    attach to any ``ray start`` head on this machine, even a dead one whose
    address file was left behind.
    """
    import ray

    env = {**BASE_ENV_VARS, **(env_vars or {})}
    for key, value in env.items():
        os.environ.setdefault(key, value)  # the Train controller runs in this process's children
    target = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return Connection(target, local=not target)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if target:
        inherited = job_env_vars()
        own = {k: v for k, v in env.items() if k not in inherited}
        # Inside a job that already sets them (tunefleet submit): the job's runtime env as is.
        runtime_env = {"env_vars": own} if own else None
        ray.init(address=target, runtime_env=runtime_env, log_to_driver=True)
        _unwind_on_sigterm(on_sigterm)
        return Connection(target, local=False)
    env = {**env, **{k: os.environ.setdefault(k, v) for k, v in LOCAL_ENV_VARS.items()}}
    # Ray's state API (Train's placement-group cleaner uses it inside the cluster) finds
    # "its" cluster through RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else an address file
    # in Ray's temp folder: with a stale file it asked a dead address and the cleaner died
    # (DECISIONS 29); with another local cluster's file it asked that cluster, heard that
    # its controller did not exist and removed a live group's placement group (DECISIONS
    # 91). So the dashboard's port is chosen here and named in the environment before the
    # cluster starts: its raylet, and so every worker of it, inherits the name.
    port = _free_port()
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=local_num_cpus or os.cpu_count() or 1,
        num_gpus=0,
        runtime_env={"env_vars": env},
        log_to_driver=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
    )
    _unwind_on_sigterm(on_sigterm)
    return Connection(None, local=True)


def _unwind_on_sigterm(previous: Any) -> None:
    """After ``ray.init``: a SIGTERM (what Kubernetes sends a pod) unwinds this driver with
    the caller's handler (``ray.init`` replaced it), however long the unwinding takes.

    Ray's C++ failure-signal handler, installed when the driver connects, took the signal
    first, logged a stack and armed an alarm that aborts the process 3 s later (absl's
    ``alarm_on_failure_secs``): a retrain whose unwinding (MLflow runs marked KILLED, the
    local cluster stopped) took longer died of SIGABRT before it released the registry
    lock. Setting a Python handler again takes the signal back from it (the alarm is
    cancelled too, should one be armed). A caller that ignored SIGTERM still does; without
    a handler of the caller's, SIGTERM exits 143 through ``SystemExit``."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; ray.init set none there either

    def handler(signum: int, frame: Any) -> None:
        signal.alarm(0)
        if previous is signal.SIG_IGN:
            return
        if callable(previous):
            previous(signum, frame)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _free_port() -> int:
    """A TCP port nothing listens on now (127.0.0.1), for the local dashboard."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Seconds a local cluster's processes get to end after ``ray.shutdown`` before SIGKILL.
LOCAL_EXIT_GRACE_S = 3.0


def disconnect() -> None:
    """Shut down this driver's Ray connection, and a local cluster it started: every
    process of it, stopped by pid (an interrupted run leaves nothing running)."""
    import psutil
    import ray

    from cluster import ray_private

    if not ray.is_initialized():
        return
    procs = []
    for pid in ray_private.local_cluster_pids():
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))  # its start time: a reused pid is not it
    ray.shutdown()
    _, alive = psutil.wait_procs(procs, timeout=LOCAL_EXIT_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=LOCAL_EXIT_GRACE_S)
