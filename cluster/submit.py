"""Submit a tuning run to a Ray cluster as a Ray job, follow it, stop it, read its logs.

A thin layer over Ray's Job Submission SDK (``JobSubmissionClient``):

* the working directory is uploaded as the job's ``working_dir``, without what
  must not travel (``UPLOAD_EXCLUDES`` plus ``.gitignore``/``.rayignore``, which
  Ray reads itself), and refused before upload when it is over Ray's limit;
* the resolved job spec travels in the job's environment (``SPEC_ENV``), so the
  job runs exactly what was validated here, and nothing is written into the
  user's working directory;
* token authentication (``RAY_AUTH_MODE=token``) uses Ray's own token loader:
  ``RAY_AUTH_TOKEN``, a file named by ``RAY_AUTH_TOKEN_PATH`` (``--token-file``)
  or ``~/.ray/auth_token``. tunefleet never reads, prints or writes the token.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import ray_private
from cluster.connect import BASE_ENV_VARS

#: Environment variable that carries the resolved job spec (YAML) into the job.
SPEC_ENV = "TUNEFLEET_JOB_SPEC"

#: Never uploaded with the working directory (gitignore syntax, as Ray reads it).
UPLOAD_EXCLUDES: tuple[str, ...] = (
    ".git/",
    ".venv/",
    "venv/",
    "tunefleet-results/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    ".gpucheck/",
    ".whl/",
    "build/",
    "node_modules/",
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A submission that cannot go ahead (bad working dir, no cluster there, ...)."""


def use_token(token_file: str | None = None) -> str:
    """Turn on token authentication where a token is available; say where it comes from.

    Only names the source: the token itself stays with Ray's loader.
    """
    if token_file:
        if not os.path.isfile(token_file):
            raise SubmitError(f"--token-file: no such file: {token_file}")
        os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.abspath(token_file)
        os.environ.pop("RAY_AUTH_TOKEN", None)  # the file named on the command line wins
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return "token authentication off (RAY_AUTH_MODE=disabled)"
    if os.environ.get("RAY_AUTH_TOKEN"):
        source = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        source = f"the file {os.environ['RAY_AUTH_TOKEN_PATH']}"
    elif (Path.home() / ".ray" / "auth_token").is_file():
        source = "~/.ray/auth_token"
    else:
        return "no token (the cluster must not require one)"
    os.environ["RAY_AUTH_MODE"] = "token"
    ray_private.reload_auth_token()  # Ray read both at import: this process sends the token
    return f"token from {source}"


def uploaded_files(working_dir: str, excludes: tuple[str, ...] = UPLOAD_EXCLUDES) -> set[Path]:
    """The files (absolute paths) Ray would upload from ``working_dir``: the same walk and
    ignore rules Ray applies (its excludes, ``.gitignore``, ``.rayignore``)."""
    found: set[Path] = set()

    def handler(path: Path) -> None:
        if path.is_file():
            found.add(path.absolute())

    # Ray logs every ignore file it reads: quiet
    ray_private.walk_upload(working_dir, list(excludes), handler, quiet="tunefleet.upload")
    return found


def upload_size(working_dir: str, excludes: tuple[str, ...] = UPLOAD_EXCLUDES) -> tuple[int, int]:
    """(files, bytes) Ray would upload from ``working_dir``."""
    return _count(uploaded_files(working_dir, excludes))


def _count(files: set[Path]) -> tuple[int, int]:
    return len(files), sum(f.stat().st_size for f in files)


def upload_limit() -> int:
    """Ray's limit on an uploaded package (bytes)."""
    return ray_private.upload_limit()


def runtime_env(working_dir: str, spec_yaml: str) -> dict[str, Any]:
    """The job's runtime env: the working dir (with excludes) and the resolved spec."""
    return {
        "working_dir": os.path.abspath(working_dir),
        "excludes": list(UPLOAD_EXCLUDES),
        # tunefleet's worker environment goes in the job's own runtime env: a driver that
        # adds variables in ray.init gets a different runtime env from the job's, and the
        # working dir was seen deleted under it (nothing held the job's env any more).
        "env_vars": {
            **BASE_ENV_VARS,
            SPEC_ENV: spec_yaml,
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        },
    }


#: what a submitted job may run: a sweep, or a scheduled retrain
JOB_COMMANDS = ("run", "retrain")


def entrypoint(no_smoke: bool = False, command: str = "run") -> str:
    """The command the job runs on the cluster (the console script is not installed there
    by ``--working-dir``; the module form runs from the uploaded folder)."""
    if command not in JOB_COMMANDS:
        raise ValueError(f"command: one of {JOB_COMMANDS}, not {command!r}")
    return f"python -m tune_jobs {command} env:{SPEC_ENV}" + (" --no-smoke" if no_smoke else "")


def client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (default: ``RAY_API_SERVER_ADDRESS`` or
    ``RAY_ADDRESS``, as Ray's own CLI reads them)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError
        where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        raise SubmitError(f"cannot reach the Ray dashboard at {where}: {exc}") from exc


@dataclass(frozen=True)
class Submitted:
    """A job that was accepted by the cluster."""

    job_id: str
    address: str


def check_upload(working_dir: str, uploaded: set[Path] | None = None) -> tuple[int, int]:
    """(files, bytes) of the upload (``uploaded``: its files, when the caller has walked
    the folder already); ``SubmitError`` when it is over Ray's limit."""
    files, size = _count(uploaded_files(working_dir) if uploaded is None else uploaded)
    limit = upload_limit()
    if size >= limit:
        raise SubmitError(
            f"--working-dir: {working_dir} holds {size / 2**20:.0f} MiB in {files} files after "
            f"excludes, over Ray's upload limit of {limit / 2**20:.0f} MiB; add the large "
            "folders to .rayignore or submit from a smaller folder"
        )
    return files, size


def submit(
    address: str | None,
    spec_yaml: str,
    working_dir: str = ".",
    no_smoke: bool = False,
    command: str = "run",
) -> Submitted:
    """Upload the working dir and the spec, start the job; the job id.
    Call ``check_upload`` first: the walk over the folder is not repeated here."""
    jobs = client(address)
    job_id = jobs.submit_job(
        entrypoint=entrypoint(no_smoke, command),
        runtime_env=runtime_env(working_dir, spec_yaml),
        metadata={"tool": "tunefleet"},
    )
    return Submitted(job_id, jobs.get_address())


#: Seconds between the main thread's looks at the log stream while following (Ctrl-C lands
#: within one).
FOLLOW_POLL_S = 0.2


def follow(address: str | None, job_id: str, echo: Callable[[str], None] = print) -> str:
    """Print the job's logs as they come until it ends; its final status.

    ``KeyboardInterrupt`` propagates: the caller says the job goes on. The log stream
    (an asyncio websocket) runs in a daemon thread while the main thread waits in short
    steps, so Ctrl-C lands at once, whatever the stream is doing: run in the main thread,
    ``asyncio.run`` answered SIGINT by cancelling the stream and waiting for it to close,
    which once took over 60 s (a fresh-clone CI run).
    """
    jobs = client(address)
    ended = threading.Event()
    failure: list[BaseException] = []

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            echo(chunk.rstrip("\n"))

    def stream() -> None:
        try:
            asyncio.run(tail())
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
            failure.append(exc)
        finally:
            ended.set()

    threading.Thread(target=stream, name="tunefleet-follow", daemon=True).start()
    while not ended.wait(FOLLOW_POLL_S):
        pass
    if failure:
        raise failure[0]
    return wait(jobs, job_id)


def wait(jobs: Any, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's status once terminal (the log stream can close a moment before)."""
    deadline = time.monotonic() + timeout_s
    status = str(jobs.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = str(jobs.get_job_status(job_id).value)
    return status


def status(address: str | None, job_id: str) -> tuple[str, str]:
    """(status, message) of a job."""
    info = client(address).get_job_info(job_id)
    return str(info.status.value), info.message or ""


def stop(address: str | None, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the cluster to stop the job; its status once it has ended (or after ``timeout_s``)."""
    jobs = client(address)
    jobs.stop_job(job_id)
    return wait(jobs, job_id, timeout_s)


def logs(address: str | None, job_id: str) -> str:
    """Everything the job has printed so far."""
    return client(address).get_job_logs(job_id)
