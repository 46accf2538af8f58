"""Faults injected into one real sweep (local Ray, real CLI, model and data).

Three trials of the same configuration run one after another on warm worker
groups, each evaluating and writing a full checkpoint every 4 steps
(``training.checkpoint_every_s: 0``), each reporting the SHA-256 of its weights:

1. trial_00000's worker process is SIGKILLed (by its pid, as an OOM killer
   would) after its first report. Tune restarts the trial
   (``resources.max_failures``) from its last checkpoint.
2. Once trial_00000 has finished and trial_00001 has reported, the driver
   itself is SIGKILLed, and its Ray processes after it (by pid).
3. ``tunefleet resume RUN_DIR`` continues the sweep.

The run lives in a bucket on a real S3-compatible server (moto) reached through a
link that the test cuts for 12 s while trial_00001 trains (longer than the S3
client's own retries): storage must wait it out, the trial must go on without a
restart, and nothing written is lost.

Every trial must end with the weights of an undisturbed run: the same SHA-256
for all three (same seed, same data order, restored exactly).

The driver and the resume run with a fake hub token and cloud keys planted in
their environment; no file the run or its Ray cluster writes may hold them.

Then a LoRA causal-LM sweep (a tiny random Llama) of single-process trials: one trial's
process is SIGKILLed, then the driver, and after ``tunefleet resume`` every trial ends
with the same base and adapter SHA-256 as the twin that ran whole after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import time

import psutil
import pytest
import yaml

from cluster import storage
from tests.conftest import REPO, RT_INSTRUCTION
from tests.e2e.cluster_procs import Outage, S3Server, s3_objects
from tests.e2e.conftest import kill_driver, start_driver, stop_driver, tunefleet, wait_for
from tune_jobs.report_log import read_reports

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_STEPS, EVAL_STEPS = 40, 4
OUTAGE_S = 12.0
BUCKET = "faults"
TOKEN = "hf_planted" + secrets.token_hex(12)  # found nowhere a run writes, or the test fails
KEY = "planted/" + secrets.token_hex(16)
PLANTED = {"HF_TOKEN": TOKEN, "AWS_ACCESS_KEY_ID": "AKIAPLANTED", "AWS_SECRET_ACCESS_KEY": KEY}
SPEC = {
    "model": {"max_length": 32},
    "data": {"max_train_samples": 256, "max_eval_samples": 32, "max_test_samples": 16},
    "training": {
        "max_steps": MAX_STEPS,
        "per_device_train_batch_size": 8,
        "eval_steps": EVAL_STEPS,
        "checkpoint_every_s": 0,
        # the top block and the head train; each checkpoint holds just those (7 MiB, not
        # 261): what a restore needs, at a twelfth of the bytes through the S3 server
        "unfreeze_depth": 1,
        "checkpoint_weights": "trained",
    },
    "search": {
        "num_samples": 3,
        "start_with_defaults": False,
        "space": {"learning_rate": {"choice": [5.0e-5]}},
    },
    "scheduler": {"type": "fifo", "time_attr": "step"},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.99, "max_concurrent_trials": 1},
    "run": {"name": "faults", "seed": 0, "fingerprint_weights": True},
}


def _saved_entry(run_dir: str, trial: str) -> tuple[dict, str] | None:
    """``trial``'s state and run metadata (JSON) in Tune's saved experiment state (what a
    restart or a resume reads); None before it is there."""
    for name in storage.list_names(run_dir):
        if not name.startswith("experiment_state-"):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            for state, meta in json.loads(storage.read_text(storage.join(run_dir, name)))[
                "trial_data"
            ]:
                state = json.loads(state)
                if state["trial_id"].endswith(trial[-5:]):
                    return state, meta
    return None


def _saved(run_dir: str, trial: str) -> tuple[str | None, int]:
    """``trial``'s status and last step in Tune's saved experiment state: ``(None, -1)``
    before it is there."""
    entry = _saved_entry(run_dir, trial)
    if entry is None:
        return None, -1
    state, meta = entry
    return state["status"], int((json.loads(meta).get("last_result") or {}).get("step", -1))


def _saved_checkpoint(run_dir: str, trial: str) -> int:
    """The step of ``trial``'s latest checkpoint in Tune's saved experiment state (what a
    restart or a resume restores from); -1 before there is one. Tune registers a function
    trainable's checkpoint in a second round trip after the report (a ``save`` task), so a
    report in the log does not yet mean a checkpoint Tune can restore."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    entry = _saved_entry(run_dir, trial)
    if entry is None:
        return -1
    manager = _TrainingRunMetadata.from_json_state(entry[1]).checkpoint_manager
    latest = manager.latest_checkpoint_result if manager else None
    return int(latest.metrics["step"]) if latest else -1


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """``(storage root, link, S3 client)``: a bucket on moto behind an ``Outage`` link."""
    import boto3

    server = S3Server()
    server.start(str(tmp_path_factory.mktemp("s3") / "s3.log"))
    link = Outage(server.port)
    link.restore()
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=PLANTED["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=KEY,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield f"s3://{BUCKET}/runs?endpoint_override={link.endpoint}&scheme=http", link, client
    finally:
        link.cut()
        server.stop()


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory, bucket):
    root, link, client = bucket
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "job.yaml").write_text(yaml.safe_dump(SPEC))
    run_dir = storage.join(root, "faults")
    ray_tmp = tempfile.mkdtemp(prefix="tf-faults-")  # short: Ray's socket paths are limited
    planted = {**PLANTED, "AWS_DEFAULT_REGION": "us-east-1", "RAY_TMPDIR": ray_tmp}
    log = open(tmp / "driver.log", "w")  # noqa: SIM115 - read after the driver is gone
    # Tune saves its experiment state every 2 s (default: at least 10 s), so the test knows
    # sooner what a resume will find
    # --verbose: Tune's reporter and Ray's output in the captured log, read below; the
    # resume runs without it and leaves its driver log in the bucket
    proc = start_driver(
        tmp / "job.yaml", root, log, {**planted, "TUNE_GLOBAL_CHECKPOINT_S": "2"}, verbose=True
    )
    ray_procs: list[psutil.Process] = []
    try:
        wait_for("first report", lambda: read_reports(run_dir, "trial_00000"), proc)
        killed_worker = read_reports(run_dir, "trial_00000")[0]["worker_pid"]
        os.kill(killed_worker, signal.SIGKILL)
        wait_for(
            "trial_00000 finished and a trial_00001 report",
            lambda: (
                _saved(run_dir, "trial_00000")[0] == "TERMINATED"
                and read_reports(run_dir, "trial_00001")
            ),
            proc,
            timeout_s=600,
        )
        link.cut()  # the storage goes away while trial_00001 trains
        time.sleep(OUTAGE_S)
        link.restore()
        # the driver dies once Tune's saved state holds two more of trial_00001's evaluations
        # (and so a checkpoint to continue from)
        wait_for("trial_00001 at step 12", lambda: _saved(run_dir, "trial_00001")[1] >= 12, proc)
        ray_procs = kill_driver(proc)
    finally:
        stop_driver(proc, ray_procs)
        log.close()
    # read once its trials' processes are gone too: none can report after this
    before_resume = {t: read_reports(run_dir, t) for t in ("trial_00000", "trial_00001")}
    driver_log = (tmp / "driver.log").read_text()
    resumed = tunefleet("resume", run_dir, timeout=900, env=planted)
    (tmp / "resume.log").write_text(resumed.stdout + resumed.stderr)
    leaks = _files_holding((TOKEN, KEY), [str(tmp), ray_tmp])
    objects = list(s3_objects(client, BUCKET))
    leaks += [
        f"s3://{BUCKET}/{key}"
        for key, body in objects
        if TOKEN.encode() in body or KEY.encode() in body
    ]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return {
        "leaks": leaks,
        "run_dir": run_dir,
        "killed_worker": killed_worker,
        "before_resume": before_resume,
        "driver_log": driver_log,
        "resumed": resumed,
        "bucket_logs": {key: body for key, body in objects if key.endswith("logs/driver.log")},
    }


def _files_holding(needles: tuple[str, ...], folders: list[str]) -> list[str]:
    """Every file under ``folders`` that holds one of ``needles``."""
    found = []
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as fh:
                    body = fh.read()
                found += [path for n in needles if n.encode() in body]
    return found


def _starts(reports: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in reports:
        out.setdefault(r["trial_start"], []).append(r)
    return out


def test_the_resumed_sweep_ends_with_every_trial_once(faulted_run):
    resumed = faulted_run["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads(storage.read_text(storage.join(faulted_run["run_dir"], "summary.json")))
    assert sorted(t["trial"] for t in summary["trials"]) == [
        "trial_00000",
        "trial_00001",
        "trial_00002",
    ]
    assert {t["status"] for t in summary["trials"]} == {"TERMINATED"}, summary["trials"]
    assert summary["failed_trials"] == {}


def test_a_killed_worker_costs_at_most_one_interval(faulted_run):
    run_dir = faulted_run["run_dir"]
    starts = _starts(read_reports(run_dir, "trial_00000"))
    assert sorted(starts) == ["start0", "start1"], starts.keys()  # one restart
    before, after = starts["start0"], starts["start1"]
    last_reported = before[-1]["step"]
    # restored from the checkpoint of the last evaluation before the kill: what was lost is
    # the training since then, less than one evaluation interval
    assert after[0]["restored_from_step"] == last_reported
    assert after[0]["step"] == last_reported + EVAL_STEPS
    assert after[-1]["step"] == MAX_STEPS
    assert faulted_run["killed_worker"] not in {r["worker_pid"] for r in after}
    assert "restoring" in faulted_run["driver_log"]


def test_the_killed_driver_is_resumed_without_rerunning_finished_trials(faulted_run):
    run_dir = faulted_run["run_dir"]
    first = read_reports(run_dir, "trial_00000")
    assert first == faulted_run["before_resume"]["trial_00000"]  # finished: not re-run
    second = _starts(read_reports(run_dir, "trial_00001"))
    assert len(second) == 2, second.keys()  # continued once, after the resume
    cut = faulted_run["before_resume"]["trial_00001"][-1]["step"]
    resumed = second[sorted(second)[-1]]
    restored = resumed[0]["restored_from_step"]
    # from a checkpoint, not step 0: the one Tune's saved state points to, or the trial's
    # newest if that one was superseded; which may be an evaluation whose report died with
    # the driver, one interval past the last report logged
    assert 0 < restored <= cut + EVAL_STEPS and restored % EVAL_STEPS == 0, [
        line for line in faulted_run["resumed"].stdout.splitlines() if "trial_00001]" in line
    ][:5]
    assert resumed[-1]["step"] == MAX_STEPS
    third = read_reports(run_dir, "trial_00002")
    assert [r["step"] for r in third] == list(range(EVAL_STEPS, MAX_STEPS + 1, EVAL_STEPS))


def test_every_trial_ends_with_the_undisturbed_weights(faulted_run):
    run_dir = faulted_run["run_dir"]
    finals = {
        t: read_reports(run_dir, t)[-1] for t in ("trial_00000", "trial_00001", "trial_00002")
    }
    assert {r["step"] for r in finals.values()} == {MAX_STEPS}
    # trial_00002 ran undisturbed; the other two were restored from checkpoints
    shas = {t: r["weights_sha256"] for t, r in finals.items()}
    assert len(set(shas.values())) == 1, shas


def test_the_resumed_drivers_own_output_is_in_the_bucket(faulted_run):
    """Not --verbose: Ray's and Tune's output went to the run folder's log, uploaded at the
    end (the secret check below reads it too); the terminal had tunefleet's lines only."""
    logs = faulted_run["bucket_logs"]
    assert len(logs) == 1 and next(iter(logs)).endswith("faults/logs/driver.log"), list(logs)
    assert b"Started a local Ray instance" in next(iter(logs.values()))
    resumed = faulted_run["resumed"].stdout
    assert "Trial status" not in resumed and "Trial status" in faulted_run["driver_log"]


def test_no_planted_secret_in_anything_the_run_wrote(faulted_run):
    """Every object in the bucket (spec, summary, reports, checkpoints, export), the driver's
    output and the local Ray cluster's own folder (session logs, runtime-env logs)."""
    assert faulted_run["leaks"] == []
    resumed = faulted_run["resumed"]
    for needle in (TOKEN, KEY):
        assert needle not in resumed.stdout + resumed.stderr
        assert needle not in faulted_run["driver_log"]


def test_the_outage_was_waited_out_and_nothing_written_was_lost(faulted_run):
    """The link was cut for longer than the S3 client's own retries: the run's storage
    calls waited it out (logged retries), trial_00001 trained through it without a restart
    (one start, every evaluation in order), and what the run wrote is whole."""
    assert "retry" in faulted_run["driver_log"]
    before = faulted_run["before_resume"]["trial_00001"]
    assert {r["trial_start"] for r in before} == {"start0"}
    assert [r["step"] for r in before] == list(
        range(EVAL_STEPS, before[-1]["step"] + 1, EVAL_STEPS)
    )
    run_dir = faulted_run["run_dir"]
    summary = json.loads(storage.read_text(storage.join(run_dir, "summary.json")))
    export = storage.join(run_dir, "best_model")
    assert summary["best"]["export_dir"] == export
    assert json.loads(storage.read_text(storage.join(export, "metrics.json")))
    assert storage.exists(storage.join(export, "model.safetensors"))
    # the report and the model card, written into the bucket by the resume
    assert "finished" in storage.read_text(storage.join(run_dir, "report.html"))
    assert storage.exists(storage.join(run_dir, "report_files", "curves.png"))
    assert storage.exists(storage.join(export, "README.md"))


# --- single-process trials: the trial's own process is the worker ------------------------

# A LoRA causal LM here (the warm-group sweep above is a classifier): a tiny random Llama
# (0.1 s a step on an AMX CPU, 0.5 s on an AVX2 one, with SmolLM2's vocabulary), evaluated
# and checkpointed every 10 steps. Tune saves its experiment state every half second, and
# the restarted process has at least 30 steps to run after its first checkpoint: a window
# of seconds for the driver kill (with 40 steps and a save every 2 s, a fast machine
# finished the restarted trial before its checkpoint was in the saved state). Two trials of
# one config, one after the other:
# 1. trial_00000's process is SIGKILLed once Tune's saved state holds its first checkpoint;
#    Tune restarts it from its latest checkpoint;
# 2. once Tune's saved state holds a checkpoint of the restarted trial (still running), the
#    driver is SIGKILLed with its Ray processes, and ``tunefleet resume`` continues it;
# 3. trial_00001 runs whole after the resume: the undisturbed twin.
SINGLE_STEPS, SINGLE_EVAL = 60, 10
SINGLE = {
    "model": {"task": "causal_lm", "max_length": 160},
    "data": {
        "instruction_template": RT_INSTRUCTION,
        "max_train_samples": 128,
        "max_eval_samples": 32,
        "max_test_samples": 16,
    },
    "training": {
        "max_steps": SINGLE_STEPS,
        "per_device_train_batch_size": 8,
        "eval_steps": SINGLE_EVAL,
        "checkpoint_every_s": 0,
    },
    "adapter": {"type": "lora", "r": 4, "alpha": 8},
    "search": {**SPEC["search"], "num_samples": 2, "space": {"learning_rate": {"choice": [1e-3]}}},
    "scheduler": {"type": "fifo", "time_attr": "step"},
    "resources": {
        "trial_mode": "single_process",
        "cpus_per_worker": 0.99,
        "max_concurrent_trials": 1,
    },
    "smoke": {"enabled": False},
    "run": {**SPEC["run"], "name": "single"},
}
LORA_TRIALS = ("trial_00000", "trial_00001")


def _restarted_checkpoint_saved(run_dir: str, killed: int) -> bool:
    """trial_00000 runs again in a new process and Tune's saved state holds a checkpoint of
    that process's (not one of the killed process's, which may already be step 20)."""
    restarted = [r for r in read_reports(run_dir, "trial_00000") if r["pid"] != killed]
    return (
        bool(restarted)
        and _saved(run_dir, "trial_00000")[0] == "RUNNING"
        and _saved_checkpoint(run_dir, "trial_00000") >= restarted[0]["step"]
    )


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("single")
    # relative to the directory the driver runs in (the repo), as a user would write it: the
    # trials' processes run elsewhere (Ray's session folder) and must get it absolute
    relative = os.path.relpath(tiny_llama, REPO)
    spec = {**SINGLE, "model": {**SINGLE["model"], "name_or_path": relative}}
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    run_dir = str(tmp / "single")
    ray_tmp = tempfile.mkdtemp(prefix="tf-single-")  # short: Ray's socket paths are limited
    env = {"RAY_TMPDIR": ray_tmp}
    log = open(tmp / "driver.log", "w")  # noqa: SIM115 - read after the driver is gone
    proc = start_driver(tmp / "job.yaml", str(tmp), log, {**env, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"})
    ray_procs: list[psutil.Process] = []
    try:
        wait_for(
            "trial_00000's first checkpoint in Tune's saved state",
            lambda: _saved_checkpoint(run_dir, "trial_00000") >= SINGLE_EVAL,
            proc,
        )
        killed = read_reports(run_dir, "trial_00000")[0]["pid"]
        os.kill(killed, signal.SIGKILL)
        wait_for(
            "a saved checkpoint of the restarted trial_00000",
            lambda: _restarted_checkpoint_saved(run_dir, killed),
            proc,
        )
        ray_procs = kill_driver(proc)
    finally:
        stop_driver(proc, ray_procs)
        log.close()
    before_resume = {t: read_reports(run_dir, t) for t in LORA_TRIALS}
    resumed = tunefleet("resume", run_dir, timeout=600, env=env)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return {
        "run_dir": run_dir,
        "model": (relative, tiny_llama),
        "killed": killed,
        "before_resume": before_resume,
        "driver_log": (tmp / "driver.log").read_text(),
        "resumed": resumed,
    }


def test_a_killed_lora_trial_and_driver_resume_to_the_undisturbed_adapter(single_process_run):
    """trial_00000 outlives its own process and then the driver: it ends on the base and
    adapter SHA-256 of trial_00001, which ran whole after the resume."""
    run = single_process_run
    run_dir, resumed = run["run_dir"], run["resumed"]
    assert resumed.returncode == 0, (
        run["driver_log"][-2000:] + resumed.stdout[-3000:] + resumed.stderr[-3000:]
    )
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    assert {t["trial"]: t["status"] for t in summary["trials"]} == dict.fromkeys(
        LORA_TRIALS, "TERMINATED"
    )
    assert summary["checkpoints"]["weights"] == "trained"  # adapter-only checkpoints
    # the model was given relative to the repo; the run (and so the resume) holds it absolute
    relative, absolute = run["model"]
    assert relative.startswith("..") and absolute == os.path.abspath(absolute)
    with open(os.path.join(run_dir, "job_spec.yaml")) as fh:
        assert yaml.safe_load(fh)["model"]["name_or_path"] == absolute
    reports = {t: read_reports(run_dir, t) for t in LORA_TRIALS}
    # the twin: one process, from step 0, every evaluation, all of it after the resume
    twin = reports["trial_00001"]
    assert run["before_resume"]["trial_00001"] == []
    assert {r["pid"] for r in twin} == {twin[0]["pid"]}
    assert [(r["step"], r["restored_from_step"]) for r in twin] == [
        (step, -1) for step in range(SINGLE_EVAL, SINGLE_STEPS + 1, SINGLE_EVAL)
    ]
    # trial_00000, by process: killed after its first checkpoint, restarted by Tune from it,
    # cut with the driver, continued by the resume from a later checkpoint
    starts: dict[int, list[dict]] = {}
    for r in reports["trial_00000"]:
        starts.setdefault(r["pid"], []).append(r)
    killed, restarted, continued = starts.values()
    assert killed[0]["pid"] == run["killed"]
    # from the checkpoint Tune held at the kill, or the killed process's last one if its
    # save was registered in time: at most an interval lost
    restored = restarted[0]["restored_from_step"]
    assert SINGLE_EVAL <= restored <= killed[-1]["step"], (restored, killed[-1]["step"])
    assert restored >= killed[-1]["step"] - SINGLE_EVAL
    assert restarted == run["before_resume"]["trial_00000"][len(killed) :]
    # from the checkpoint Tune's saved state held at the kill (step 20 or later), or a newer
    # one whose report died with the driver
    restored = continued[0]["restored_from_step"]
    assert 2 * SINGLE_EVAL <= restored <= restarted[-1]["step"] + SINGLE_EVAL, restored
    assert continued[-1]["step"] == SINGLE_STEPS
    assert continued[-1]["weights_sha256"] == twin[-1]["weights_sha256"]
