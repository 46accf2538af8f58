"""The local debug cluster's connection (``cluster.connect``) on a real Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from tests.conftest import REPO


def test_every_process_of_a_local_cluster_asks_its_own_dashboard():
    """An actor that no Tune trial created (as the sweep's group pool, which hosts the Train
    runs and so their placement-group cleaners) reaches its own cluster through Ray's state
    API after another cluster has rewritten the address file in Ray's temp folder: it
    finds itself alive. Before the dashboard's address was in the environment the cluster
    started with, the state API followed the file (DECISIONS 91)."""
    code = """
import json, os, ray
from cluster import connect
connect.connect(local_num_cpus=1)
# what a second local cluster on this machine does when it starts
tmp = os.path.join(os.environ["RAY_TMPDIR"], "ray")
os.makedirs(tmp, exist_ok=True)
with open(os.path.join(tmp, "ray_current_cluster"), "w") as fh:
    fh.write("127.0.0.1:1")

@ray.remote(num_cpus=0)
class Probe:
    def look(self):
        from ray.util.state import get_actor
        me = ray.get_runtime_context().get_actor_id()
        state = get_actor(me, timeout=20)
        return os.environ.get(connect.API_SERVER_ENV), state.state if state else None

probe = Probe.remote()
seen, state = ray.get(probe.look.remote())
print(json.dumps({"seen": seen, "driver": os.environ[connect.API_SERVER_ENV], "state": state}))
connect.disconnect()
"""
    ray_tmp = tempfile.mkdtemp(prefix="tf-conn-")  # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["seen"] == seen["driver"], seen
    assert seen["state"] == "ALIVE", seen


def test_a_sigterm_unwinds_the_driver_with_its_own_handler_however_long_it_takes(tmp_path):
    """SIGTERM (what Kubernetes sends a pod) to a driver connected to a local cluster: the
    driver's own handler runs (``ray.init`` had replaced it) and its ``finally`` blocks run
    to the end although they take 4 s, then the local cluster is stopped. Before, Ray's C++
    failure handler aborted the process 3 s after the signal (SIGABRT, exit -6) and a
    retrain that took longer to unwind never released its lock."""
    code = """
import os, signal, sys, time
from cluster import connect

def mine(signum, frame):
    open(os.path.join(sys.argv[1], "handler"), "w").write(str(signum))
    sys.exit(99)

signal.signal(signal.SIGTERM, mine)
connect.connect(local_num_cpus=1)
print("ready", flush=True)
try:
    while True:
        time.sleep(0.1)
finally:
    time.sleep(4)  # MLflow runs marked KILLED, a lock released: unwinding takes a while
    connect.disconnect()
    open(os.path.join(sys.argv[1], "unwound"), "w").write("yes")
"""
    ray_tmp = tempfile.mkdtemp(prefix="tf-term-")  # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 99  # the driver's own handler's exit, not SIGABRT (-6)
    assert (tmp_path / "handler").read_text() == str(int(signal.SIGTERM))
    assert (tmp_path / "unwound").read_text() == "yes"
