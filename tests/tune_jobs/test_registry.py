"""The retrain registry on a local folder and on a real S3-compatible server (moto)."""

from __future__ import annotations

import json

import pytest

from tune_jobs.registry import LOCK_FILE, REGISTRY_DIR, Registry, RegistryError, RegistryLocked


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


def _promotion(n: int, score: float, champion: dict | None, decision: str) -> dict:
    run = f"nightly-retrain-{n:04d}"
    return {
        "retrain": n,
        "time": f"2026-11-2{n}T01:00:00Z",
        "run": run,
        "data": {"rows": 300 + 100 * n, "sha256": "ab" * 32},
        "promotion": {"rows": 90 + 30 * n, "ids_sha256": "cd" * 32},
        "challenger": {
            "run": run,
            "trial": "trial_00001",
            "config": {"learning_rate": 1e-4 * n},
            "export_dir": f"/results/{run}/best_model",
            "promotion_accuracy": score,
        },
        "champion": champion,
        "p_value": None if champion is None else 0.04,
        "decision": decision,
        "reason": "first retrain: no champion yet" if champion is None else "challenger beats",
    }


def test_rollback_switches_the_champion_back_and_records_it(root):
    reg = Registry(root)
    with reg.lock(ttl_s=60):
        for n, score, decision in ((1, 0.70, "promote"), (2, 0.74, "promote"), (3, 0.71, "keep")):
            entry = _promotion(n, score, reg.champion(), decision)
            if decision == "promote":
                reg.promote(entry["challenger"])
            reg.record(entry)
        assert reg.champion()["run"] == "nightly-retrain-0002"
        back = reg.rollback(by="ops")
        assert back["run"] == "nightly-retrain-0001" and reg.champion() == back
        assert back["export_dir"] == "/results/nightly-retrain-0001/best_model"
        last = reg.history()[-1]
        assert (
            last["decision"] == "rollback" and "from nightly-retrain-0002 by ops" in last["reason"]
        )
        with pytest.raises(RegistryError, match="no model was promoted before"):
            reg.rollback()  # nothing before the first champion
        with pytest.raises(
            RegistryError, match="never promoted; promoted runs: nightly-retrain-0001"
        ):
            reg.rollback("nightly-retrain-0003")  # a run that was kept, not promoted
        assert reg.rollback("nightly-retrain-0002")["run"] == "nightly-retrain-0002"


def _two_promotions(root) -> Registry:
    """A registry under ``root`` whose champion is nightly-retrain-0002, promoted after 0001."""
    reg = Registry(str(root))
    with reg.lock(ttl_s=60):
        for n, score in ((1, 0.81), (2, 0.83)):
            entry = _promotion(n, score, reg.champion(), "promote")
            reg.promote(entry["challenger"])
            reg.record(entry)
    return reg


def test_registry_command_prints_the_table_and_rolls_back(tmp_path):
    import subprocess

    from tests.e2e.conftest import tunefleet

    _two_promotions(tmp_path)

    def registry(*args: str) -> subprocess.CompletedProcess:
        return tunefleet("registry", str(tmp_path), *args, timeout=120)

    out = registry()
    assert out.returncode == 0, out.stderr
    assert "champion: nightly-retrain-0002 trial_00001" in out.stdout
    assert "0.81 (nightly-retrain-0001)" in out.stdout and "first retrain" in out.stdout
    rolled = registry("--rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert "champion is now nightly-retrain-0001" in rolled.stdout
    assert Registry(str(tmp_path)).champion()["run"] == "nightly-retrain-0001"
    bad = registry("--rollback", "nightly-retrain-0009")
    assert bad.returncode == 2 and "never promoted" in bad.stderr
    assert not (tmp_path / REGISTRY_DIR / LOCK_FILE).exists()


def test_a_rollback_takes_the_lock_for_the_time_asked(tmp_path, monkeypatch, capsys):
    """``--lock-ttl-s`` is the expiry the rollback's lock is taken with (600 s unless
    given), the lock is held while the champion changes, and released after."""
    from tune_jobs.cli import ROLLBACK_LOCK_TTL_S, main

    _two_promotions(tmp_path)
    taken, lock = [], Registry.lock

    def spy(self, ttl_s):
        taken.append(ttl_s)
        return lock(self, ttl_s=ttl_s)

    monkeypatch.setattr(Registry, "lock", spy)
    assert main(["registry", str(tmp_path), "--rollback", "--lock-ttl-s", "90"]) == 0
    assert main(["registry", str(tmp_path), "--rollback", "nightly-retrain-0002"]) == 0
    assert taken == [90.0, ROLLBACK_LOCK_TTL_S]
    assert ROLLBACK_LOCK_TTL_S == 600
    assert "champion is now nightly-retrain-0002" in capsys.readouterr().out
    assert not (tmp_path / REGISTRY_DIR / LOCK_FILE).exists()
