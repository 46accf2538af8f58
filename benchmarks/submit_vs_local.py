"""The same sweep run locally and submitted to a two-node Ray cluster, side by side.

Starts what the cluster tests start (a head and a second node by ``ray start``,
token auth, a moto S3 server on 127.0.0.1), submits the sweep of
``tests/e2e/test_cluster.py`` with ``tunefleet submit`` into the bucket, then
runs the very same spec locally (a local Ray with as many CPUs as the cluster,
results on local disk). Prints:

  * submit to first metric: from the start of ``tunefleet submit`` to the
    first report's timestamp;
  * wall time: the whole ``tunefleet submit`` command (upload, job, export, log
    follow) vs the whole local ``tunefleet run``, and each run's own
    ``wall_time_s`` from its summary;
  * bytes written to the bucket per trial.

Everything it starts is stopped by process id.

    .venv/bin/python benchmarks/submit_vs_local.py
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import boto3  # noqa: E402
import yaml  # noqa: E402

from tests.e2e.cluster_procs import RayCluster, S3Server, s3_objects  # noqa: E402
from tests.e2e.test_cluster import BUCKET, SPEC, submit_env  # noqa: E402


def tunefleet(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tune_jobs", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return proc, time.monotonic() - started


def main() -> None:
    work = tempfile.mkdtemp(prefix="tf-bench-")
    temp_dir = f"/tmp/tf-b-{secrets.token_hex(3)}"
    os.makedirs(temp_dir)
    token = os.path.join(work, "token")
    with open(token, "w") as fh:
        fh.write(secrets.token_hex(32))
    s3 = S3Server()
    s3.start(os.path.join(work, "s3.log"))
    aws = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(8),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3.endpoint,
    }
    env = {
        **os.environ,
        **aws,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token,
        "HF_HUB_OFFLINE": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    env.pop("RAY_ADDRESS", None)
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    cluster = RayCluster(temp_dir=temp_dir, env=env)
    spec_path = os.path.join(work, "job.yaml")
    with open(spec_path, "w") as fh:
        fh.write(yaml.safe_dump(SPEC))
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_node(num_cpus=2)
        assert len(cluster.wait_for_nodes(2)) == 2
        began = time.time()
        sub, sub_wall = tunefleet(
            [
                "submit",
                spec_path,
                "--no-smoke",
                "--address",
                cluster.dashboard,
                "--token-file",
                token,
            ],
            submit_env(),
        )
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        summary = json.loads(
            client.get_object(Bucket=BUCKET, Key="runs/sweep/summary.json")["Body"].read()
        )
        first = min(
            json.loads(line)["timestamp"]
            for t in summary["trials"]
            for line in client.get_object(
                Bucket=BUCKET, Key=f"runs/sweep/reports/{t['trial']}.jsonl"
            )["Body"]
            .read()
            .decode()
            .splitlines()
            if line.strip()
        )
        written = sum(len(b) for k, b in s3_objects(client, BUCKET) if k.startswith("runs/sweep/"))
    finally:
        cluster.stop()
        s3.stop()
    local_env = {**submit_env()}
    loc, loc_wall = tunefleet(
        ["run", spec_path, f"run.storage_path={work}/local", "resources.local_num_cpus=4"],
        local_env,
    )
    assert loc.returncode == 0, loc.stdout[-3000:] + loc.stderr[-3000:]
    with open(os.path.join(work, "local", "sweep", "summary.json")) as fh:
        local_summary = json.load(fh)
    trials = len(summary["trials"])
    print(
        f"sweep: {trials} trials x 2 DDP workers, MiniLM, {SPEC['data']['max_train_samples']} rows, 1 epoch"
    )
    print(f"submit to first metric (two-node cluster): {first - began:.1f} s")
    print(
        f"wall time, whole command: submitted {sub_wall:.1f} s vs local {loc_wall:.1f} s "
        f"(ratio {sub_wall / loc_wall:.2f})"
    )
    print(
        f"wall time, the run itself (summary.json): submitted {summary['wall_time_s']} s vs "
        f"local {local_summary['wall_time_s']} s"
    )
    print(
        f"bytes written to S3 per trial: {written / trials / 2**20:.1f} MiB "
        f"({written / 2**20:.1f} MiB for {trials} trials, summary and export included)"
    )


if __name__ == "__main__":
    main()
