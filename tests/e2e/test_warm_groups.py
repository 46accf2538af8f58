"""Warm worker groups on a local Ray cluster, with the real CLI, model and data.

Two trials run one after the other (``max_concurrent_trials: 1``), so Tune hands
the first trial's actor, and its warm group, to the second. The test kills the
first trial's worker process (SIGKILL, by its pid, as an OOM killer would)
while it trains: that trial errors, and the second trial must still run to its
end on a group built anew, not on the dead one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO
from tune_jobs.report_log import read_reports

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = {
    "model": {"max_length": 32},
    "data": {"max_train_samples": 256, "max_eval_samples": 32, "max_test_samples": 16},
    "training": {"max_steps": 60, "per_device_train_batch_size": 8, "eval_steps": 2},
    "search": {
        "num_samples": 1,
        "start_with_defaults": False,
        "space": {"learning_rate": {"grid": [1.0e-4, 5.0e-5]}},
    },
    "scheduler": {"type": "fifo", "time_attr": "step"},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.99, "max_concurrent_trials": 1},
    "run": {"name": "warm", "seed": 0},
}


def test_a_crashed_group_is_rebuilt_for_the_next_trial(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(SPEC))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tune_jobs",
            "run",
            str(tmp_path / "job.yaml"),
            f"run.storage_path={tmp_path}",
        ],
        cwd=REPO,
        env={**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = str(tmp_path / "warm")
    try:
        deadline = time.monotonic() + 300
        while not read_reports(run_dir, "trial_00000"):
            assert proc.poll() is None and time.monotonic() < deadline, "no first report"
            time.sleep(0.5)
        killed = read_reports(run_dir, "trial_00000")[0]["worker_pid"]
        os.kill(killed, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((tmp_path / "warm" / "summary.json").read_text())
    status = {t["trial"]: t["status"] for t in summary["trials"]}
    assert status == {"trial_00000": "ERROR", "trial_00001": "TERMINATED"}, out[-3000:]
    first, second = (read_reports(run_dir, t) for t in ("trial_00000", "trial_00001"))
    assert first[-1]["step"] < 60  # the crash cut it short
    # the second trial trained to its end, from step 0, in a process that is not the dead one
    assert [r["step"] for r in second] == list(range(2, 61, 2))
    assert second[0]["restored_from_step"] == -1
    assert killed not in {r["worker_pid"] for r in second}
    assert second[-1]["eval_accuracy"] > 0
    error = next(t["error"] for t in summary["trials"] if t["trial"] == "trial_00000")
    assert "warm group" in error, error  # the error says where it happened
