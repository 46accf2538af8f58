"""The retrain registry on a local folder and on a real S3-compatible server (moto)."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.cluster_procs import S3Server
from tune_jobs.registry import LOCK_FILE, REGISTRY_DIR, Registry, RegistryLocked

BUCKET = "tunefleet-registry"


@pytest.fixture(scope="module")
def s3_root(tmp_path_factory):
    """An S3 prefix on a moto server started for this module (credentials in the env)."""
    import boto3

    server = S3Server()
    server.start(str(tmp_path_factory.mktemp("s3") / "s3.log"))
    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server.endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}/retrain"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "results")
    base = request.getfixturevalue("s3_root")
    return f"{base}/{request.node.name.replace('[', '-').rstrip(']')}"


def test_champion_and_history_round_trip(root):
    reg = Registry(root)
    assert reg.champion() is None and reg.history() == []
    with reg.lock(ttl_s=60):
        reg.record({"run": "r1", "decision": "promoted"})
        reg.promote({"run": "r1", "score": 0.8})
        reg.record({"run": "r2", "decision": "kept"})
    assert reg.champion() == {"run": "r1", "score": 0.8}
    assert [e["run"] for e in reg.history()] == ["r1", "r2"]


def test_a_second_retrain_is_refused_while_the_lock_is_held(root):
    reg = Registry(root)
    with (
        reg.lock(ttl_s=60, owner="first"),
        pytest.raises(RegistryLocked, match="owner first"),
        Registry(root).lock(ttl_s=60),
    ):
        pass
    with reg.lock(ttl_s=60):  # released: taken again
        pass


def test_an_expired_lock_is_taken_over_once(root):
    reg = Registry(root)
    stale = json.dumps({"owner": "crashed", "acquired_at": 0, "expires_at": 1}, sort_keys=True)
    from cluster import storage

    storage.write_text(storage.join(root, REGISTRY_DIR, LOCK_FILE), stale)
    with reg.lock(ttl_s=60, owner="second") as held:
        assert held["owner"] == "second"
        with pytest.raises(RegistryLocked), Registry(root).lock(ttl_s=60):
            pass
    assert not storage.exists(storage.join(root, REGISTRY_DIR, LOCK_FILE))


def test_registry_command_prints_the_champion_and_the_history(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    reg = Registry(str(tmp_path))
    with reg.lock(ttl_s=60):
        entry = {
            "time": "2026-11-28 01:00",
            "run": "retrain-0001",
            "data": {"rows": 300, "hash": "ab" * 8},
        }
        reg.record(
            {
                **entry,
                "challenger_score": 0.81,
                "champion_score": None,
                "decision": "promoted",
                "reason": "first retrain: no champion yet",
            }
        )
        reg.promote(
            {"run": "retrain-0001", "export_dir": str(tmp_path / "retrain-0001/best_model")}
        )
    out = subprocess.run(
        [sys.executable, "-m", "tune_jobs", "registry", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "champion: retrain-0001" in out.stdout
    assert "promoted" in out.stdout and "first retrain" in out.stdout and "0.81" in out.stdout
