"""Each non-public Ray API tunefleet uses (``cluster.ray_private``), checked for what tunefleet
relies on. A Ray upgrade that moves or changes one fails here, by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ray import train

from cluster import ray_private


def test_ray_trains_retention_keeps_the_best_and_the_latest(tmp_path):
    """num_to_keep 2 by the highest score: registering scores 1, 3, 2 deletes the folder of
    1; then 0, the worst but the latest (a resume needs it), is kept beyond the two."""
    config = train.CheckpointConfig(
        num_to_keep=2, checkpoint_score_attribute="acc", checkpoint_score_order="max"
    )
    manager = ray_private.checkpoint_manager(config)
    folders = {}
    for score in (1, 3, 2, 0):
        folders[score] = tmp_path / f"checkpoint_{score}"
        folders[score].mkdir()
        checkpoint = train.Checkpoint(str(folders[score]))
        ray_private.register_checkpoint(manager, checkpoint, {"acc": score, "step": score})
    assert {s for s, f in folders.items() if f.exists()} == {3, 2, 0}


def test_tunes_propagated_variables_can_be_read_and_set():
    """Tune copies the cloud credentials by default (why tunefleet removes them)."""
    before = ray_private.propagated_env_vars()
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= before
    try:
        ray_private.set_propagated_env_vars(before - {"AWS_SECRET_ACCESS_KEY"} | {"TF_TEST"})
        from ray.tune.execution import class_cache  # what Tune itself reads

        assert "TF_TEST" in class_cache.ENV_VARS_TO_PROPAGATE
        assert "AWS_SECRET_ACCESS_KEY" not in class_cache.ENV_VARS_TO_PROPAGATE
    finally:
        ray_private.set_propagated_env_vars(before)


def test_the_upload_walk_follows_rays_ignore_rules(tmp_path):
    (tmp_path / "keep.py").write_text("x")
    (tmp_path / "skip.tmp").write_text("x")
    (tmp_path / "excluded").mkdir()
    (tmp_path / "excluded" / "big.bin").write_text("x")
    (tmp_path / ".gitignore").write_text("*.tmp\n")
    seen = []
    ray_private.walk_upload(str(tmp_path), ["excluded"], seen.append, quiet="tf-test")
    files = {p.name for p in seen if p.is_file()}
    assert files == {"keep.py", ".gitignore"}
    assert 100 * 2**20 <= ray_private.upload_limit() <= 10 * 2**30


def test_the_token_reload_makes_ray_read_a_token_set_after_import(tmp_path):
    """In a process of its own (the setting is process-wide): Ray imported first, then the
    token set, reloaded, and found by Ray's own loader."""
    token = tmp_path / "token"
    token.write_text("a" * 64)
    code = (
        "import os, ray\n"
        "from cluster import ray_private\n"
        f"os.environ.update(RAY_AUTH_MODE='token', RAY_AUTH_TOKEN_PATH={str(token)!r})\n"
        "ray_private.reload_auth_token()\n"
        "from ray._raylet import AuthenticationTokenLoader\n"
        "print(AuthenticationTokenLoader.instance().has_token())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_the_autoscaler_calls_answer_on_a_cluster_without_one(local_ray):
    """No autoscaler here: no published config, a status whose autoscaler never reported,
    and a resource constraint that can be set and cleared. (With an autoscaler:
    tests/e2e/test_autoscaling.py.)"""
    assert ray_private.autoscaler_config() is None or hasattr(
        ray_private.autoscaler_config(), "node_group_configs"
    )
    status = ray_private.autoscaler_status(local_ray)
    assert status.autoscaling_state.autoscaler_state_version == 0
    ray_private.request_cluster_resources(local_ray, [{"CPU": 1.0}])
    ray_private.request_cluster_resources(local_ray, [])


def _trainable(config):  # never run: the test restores a Tuner, it does not fit one
    return {"score": 1}


def test_a_restored_tuners_run_config_is_the_one_it_began_with(tmp_path):
    """``Tuner.restore`` takes no callbacks: a resume replaces the console the run began
    with (pickled as ``NotCarried``) through ``restored_run_config``."""
    from ray import tune

    from tune_jobs.console import NotCarried, Output, SweepConsole

    console = SweepConsole(Output(open(os.devnull, "w")), "score", "max", [], 1, "fifo")  # noqa: SIM115
    tune.Tuner(
        _trainable,
        run_config=tune.RunConfig(name="r", storage_path=str(tmp_path), callbacks=[console]),
    )
    restored = tune.Tuner.restore(str(tmp_path / "r"), _trainable)
    config = ray_private.restored_run_config(restored)
    assert [type(c) for c in config.callbacks] == [NotCarried]
    config.callbacks = [console]
    assert ray_private.restored_run_config(restored).callbacks == [console]


def test_a_local_clusters_processes_are_named_and_all_end_with_the_run():
    """In a process of its own, as a run's driver: the pids named are the cluster's (its
    GCS, raylet and their children, its workers among them, none outside it), and every
    one has ended once ``disconnect`` returns; with the cluster shut down, none is named."""
    code = """
import json, os, psutil, ray
from cluster import connect, ray_private
connect.connect(local_num_cpus=1)
@ray.remote
def pid():
    return os.getpid()
worker = ray.get(pid.remote())
pids = ray_private.local_cluster_pids()
names = {psutil.Process(p).name() for p in pids}
me = psutil.Process()
outside = [p for p in pids if psutil.Process(p) not in me.children(recursive=True)]
connect.disconnect()
left = [p for p in pids if psutil.pid_exists(p)
        and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
print(json.dumps({"worker": worker, "pids": pids, "names": sorted(names),
                  "outside": outside, "left": left, "after": ray_private.local_cluster_pids()}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"gcs_server", "raylet"} <= set(seen["names"]), seen["names"]
    assert seen["worker"] in seen["pids"]
    assert seen["outside"] == []  # only what the run itself started
    assert seen["left"] == [], seen["left"]
    assert seen["after"] == []


def test_a_train_run_without_datasets_starts_no_dataset_manager():
    """Ray Train's default callbacks, less the datasets callback when the trainer has no
    datasets (it started a DatasetManager actor per run regardless); with datasets it stays.
    A Ray that renames the callback or the hook fails here. The warm groups' runs (every
    end-to-end sweep) show the workers start without it."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    trainer_cls = ray_private.without_dataset_manager(TorchTrainer)
    scaling = train.ScalingConfig(num_workers=1)
    plain = TorchTrainer(lambda c: None, scaling_config=scaling)._create_default_callbacks()
    cut = trainer_cls(lambda c: None, scaling_config=scaling)._create_default_callbacks()
    assert [type(c) for c in plain if not isinstance(c, DatasetsCallback)] == [type(c) for c in cut]
    assert any(isinstance(c, DatasetsCallback) for c in plain)
    with_data = trainer_cls(lambda c: None, scaling_config=scaling, datasets={"train": [1]})
    assert any(isinstance(c, DatasetsCallback) for c in with_data._create_default_callbacks())
