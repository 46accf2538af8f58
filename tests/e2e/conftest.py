"""Helpers for end-to-end tests: the real command in a subprocess, offline, on a local Ray."""

from __future__ import annotations

import os
import subprocess
import sys

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
