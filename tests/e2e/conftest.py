"""Helpers for end-to-end tests: the real command in a subprocess, offline, on a local Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.conftest import REPO


def tunefleet(
    *args: str, timeout: int = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m tune_jobs ARGS`` from the repo (no RAY_ADDRESS: a local debug cluster);
    ``env`` adds to this process's environment."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env = {**base, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tune_jobs", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_driver(spec_path, storage_path: str, stdout, env: dict[str, str] | None = None):
    """``tunefleet run`` in its own session (a local Ray of its own), output to ``stdout``."""
    return start_tunefleet(["run", str(spec_path), f"run.storage_path={storage_path}"], stdout, env)


def start_tunefleet(args: list[str], stdout, env: dict[str, str] | None = None):
    """``python -m tune_jobs ARGS`` in its own session, output to ``stdout``."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "tune_jobs", *args],
        cwd=REPO,
        env={**base, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(what: str, check, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, f"the driver ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s"
        time.sleep(0.3)


def kill_driver(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the driver mid-sweep; returns the processes of its local Ray cluster (found
    before the kill, while they are still its descendants), which live on without it."""
    ray_procs = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return ray_procs


def stop_driver(proc: subprocess.Popen, ray_procs: list[psutil.Process]) -> None:
    """Whatever a fixture started and the test did not already kill: the driver's process
    group, then its Ray cluster's processes, by pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    for child in ray_procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(ray_procs, timeout=30)
