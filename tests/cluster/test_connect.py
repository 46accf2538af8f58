"""The local debug cluster's connection (``cluster.connect``) on a real Ray."""

from __future__ import annotations

import json
import os
import shutil
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
