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


def tunefleet_in_terminal(
    *args: str, columns: int = 80, timeout: int = 900
) -> subprocess.CompletedProcess:
    """``tunefleet`` as a person runs it: stdout and stderr a terminal (a pseudo-terminal of
    ``columns`` x 24), so the live console draws. The output is everything the terminal
    received, control codes included."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env = {**base, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tune_jobs", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        reader.join(timeout=30)
        os.close(master)
    text = b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, "")


def start_driver(
    spec_path,
    storage_path: str,
    stdout,
    env: dict[str, str] | None = None,
    verbose: bool = False,
):
    """``tunefleet run`` in its own session (a local Ray of its own), output to ``stdout``
    (``verbose``: with Ray's own output, which otherwise goes to the run's driver log)."""
    args = ["run", str(spec_path), f"run.storage_path={storage_path}"]
    return start_tunefleet(args + (["--verbose"] if verbose else []), stdout, env)


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
