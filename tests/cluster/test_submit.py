"""Submission helpers that need no cluster: the upload, the entrypoint, the token source."""

from __future__ import annotations

import os

import pytest

from cluster import submit
from cluster.connect import BASE_ENV_VARS


def test_upload_skips_what_must_not_travel(tmp_path):
    (tmp_path / "tune_jobs").mkdir()
    (tmp_path / "tune_jobs" / "cli.py").write_text("x" * 100)
    for junk in (".venv/lib", "tunefleet-results/run", ".git/objects", "__pycache__", ".gpucheck"):
        (tmp_path / junk).mkdir(parents=True)
        (tmp_path / junk / "big.bin").write_bytes(b"0" * 100_000)
    files, size = submit.upload_size(str(tmp_path))
    assert (files, size) == (1, 100)


def test_upload_honours_rayignore(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "huge.csv").write_bytes(b"0" * 5000)
    (tmp_path / "keep.py").write_text("y")
    (tmp_path / ".rayignore").write_text("data/\n")
    files, size = submit.upload_size(str(tmp_path))
    assert (files, size) == (2, 1 + len("data/\n"))  # keep.py and the ignore file itself


def test_runtime_env_carries_the_spec_and_the_worker_environment(tmp_path):
    env = submit.runtime_env(str(tmp_path), "run: {name: x}\n")
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"][submit.SPEC_ENV] == "run: {name: x}\n"
    assert BASE_ENV_VARS.items() <= env["env_vars"].items()
    assert ".venv/" in env["excludes"]
    assert submit.entrypoint() == f"python -m tune_jobs run env:{submit.SPEC_ENV}"
    assert submit.entrypoint(no_smoke=True).endswith("--no-smoke")


def test_token_source_is_named_never_read(tmp_path, monkeypatch):
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.use_token() == "no token (the cluster must not require one)"
    token = tmp_path / "tok"
    token.write_text("s3cr3t-token-value")
    said = submit.use_token(str(token))
    assert said == f"token from the file {token}" and "s3cr3t" not in said
    assert os.environ["RAY_AUTH_MODE"] == "token"
    with pytest.raises(submit.SubmitError, match="--token-file"):
        submit.use_token(str(tmp_path / "missing"))


def test_an_upload_over_rays_limit_is_refused_before_submitting(tmp_path, monkeypatch):
    (tmp_path / "big.bin").write_bytes(b"0" * 2048)
    monkeypatch.setattr(submit, "upload_limit", lambda: 1024)
    with pytest.raises(submit.SubmitError, match="--working-dir: .* over Ray's upload limit"):
        submit.check_upload(str(tmp_path))
    monkeypatch.setattr(submit, "upload_limit", lambda: 4096)
    assert submit.check_upload(str(tmp_path)) == (1, 2048)


def test_a_retrain_job_is_checked_here_before_anything_is_submitted():
    """``submit --retrain`` runs ``tune_jobs retrain`` on the cluster; a spec without a
    promotion set is refused here (exit 2), with no cluster to talk to at all."""
    from tests.e2e.conftest import tunefleet

    assert (
        submit.entrypoint(command="retrain") == f"python -m tune_jobs retrain env:{submit.SPEC_ENV}"
    )
    with pytest.raises(ValueError, match="one of"):
        submit.entrypoint(command="smoke")
    proc = tunefleet("submit", "debug-local", "--retrain", "--address", "http://127.0.0.1:9")
    assert proc.returncode == 2, proc.stderr
    assert "data.promotion_fraction" in proc.stderr and "submitting" not in proc.stdout


STALLED_FOLLOW = """
import asyncio, signal, sys
# a terminal's Ctrl-C: a shell starts a background job with SIGINT ignored (a CI runner may)
signal.signal(signal.SIGINT, signal.default_int_handler)
from cluster import submit

class StalledDashboard:
    '''A dashboard whose log stream delivers a line, then neither ends nor lets go when
    cancelled (a close handshake that never completes).'''

    async def tail_job_logs(self, job_id):
        yield "first line of the job's log"
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(3600)

submit.client = lambda address: StalledDashboard()
try:
    submit.follow("http://127.0.0.1:9", "raysubmit_x", echo=lambda s: print(s, flush=True))
except KeyboardInterrupt:
    print("detached", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_detaches_even_from_a_log_stream_that_will_not_let_go():
    """The window where Ctrl-C was lost (issue 20): SIGINT while the log stream waits on
    its websocket. A stalled dashboard cannot be made on purpose here, so this one is a
    stand-in (the real dashboard: tests/e2e/test_cluster.py); the SIGINT is sent once
    the stream has delivered a line, so it lands inside the stream's wait, every run.
    ``follow`` must raise KeyboardInterrupt at once; run in the main thread,
    ``asyncio.run`` answered SIGINT by cancelling the stream and waiting for it: forever."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_FOLLOW],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "first line of the job's log"
        time.sleep(0.5)  # the stream is now inside its wait
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 130, err[-2000:]
        assert "detached" in out
        assert time.monotonic() - sent < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
