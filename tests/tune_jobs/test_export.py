"""The export never takes a corrupt checkpoint: it falls back on the best one that verifies."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tests.conftest import worker_config
from trainers.loop import run_local


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_export_skips_a_corrupt_checkpoint_for_the_best_that_verifies(rt_small, tmp_path):
    from tune_jobs.run import export_verified
    from tune_jobs.spec import parse_spec

    cfg = worker_config(rt_small, per_device_train_batch_size=16, max_steps=10)
    at5, at10 = run_local(cfg, checkpoint_root=str(tmp_path / "trained")).checkpoints
    run_dir = tmp_path / "run"
    copies = {}
    for trial, src in (("trial_00000", at10), ("trial_00001", at5)):
        copies[trial] = run_dir / "train_runs" / trial / "start0" / Path(src).name
        shutil.copytree(src, copies[trial])
    leader = copies["trial_00000"]
    weights = leader / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a write cut short

    spec = parse_spec({"model": {"max_length": 48}, "search": {"metric": "eval_loss"}})
    log: list[str] = []
    manifest = json.loads((leader / "tunefleet_checkpoint.json").read_text())
    record = export_verified(
        spec, str(run_dir), str(leader), manifest["metrics"], rt_small, log.append
    )

    assert record["checkpoint"] == str(copies["trial_00001"])
    assert any(
        "model/model.safetensors has 1000 bytes" in line and "not exported" in line for line in log
    ), log
    assert any(f"exported {copies['trial_00001']} instead" in line for line in log), log
    exported = run_dir / "best_model" / "model.safetensors"
    assert _sha(exported) == _sha(copies["trial_00001"] / "model" / "model.safetensors")


def test_the_export_is_scored_in_the_precision_its_trial_trained_in(
    rt_small, tmp_path, monkeypatch
):
    """A trial that trained in bf16 on its device (a GPU, say), exported by a driver whose CPU
    lacks native bf16 (stubbed here: ``auto`` would give fp32 on it): the export is scored
    in bf16, from the checkpoint's manifest, and reproduces the trial's own validation
    loss exactly; scored in the driver's fp32 it would not (the matrix products round
    differently)."""
    from trainers import precision
    from tune_jobs import results
    from tune_jobs.spec import parse_spec

    cfg = worker_config(
        rt_small, {"precision": "bf16"}, per_device_train_batch_size=16, max_steps=5
    )
    (checkpoint,) = run_local(cfg, checkpoint_root=str(tmp_path / "trained")).checkpoints
    manifest = json.loads((Path(checkpoint) / "tunefleet_checkpoint.json").read_text())
    assert manifest["precision"] == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)  # the driver's CPU
    spec = parse_spec({"model": {"max_length": 48}, "search": {"metric": "eval_loss"}})
    assert precision.resolve(spec.distributed.precision, "cpu") == "fp32"
    reported = manifest["metrics"]
    record = results.export_best(checkpoint, str(tmp_path / "export"), spec, reported, rt_small)
    assert record["scored_in"] == "bf16"
    assert record["reloaded_validation"]["eval_loss"] == reported["eval_loss"]
    fp32 = results.score_model(
        str(tmp_path / "export"), rt_small.validation, rt_small.label_names, 48, splits=rt_small
    )
    assert fp32["eval_loss"] != reported["eval_loss"]  # 2e-6 apart when measured


def test_of_trials_that_tie_the_best_is_the_one_whose_checkpoint_leads():
    """Two trials tie (answer accuracy on a small set ties often): the export's leader is the
    first to end, since a tie does not beat it, so the best trial named must be that one,
    whichever order the trials are listed in; a strictly better trial still wins."""
    from tune_jobs.results import TrialSummary, best_trial

    def trial(name: str, value: float) -> TrialSummary:
        return TrialSummary(name, "TERMINATED", {}, {"m": value}, {"m": value}, 2, False)

    tied = [trial("trial_00000", 0.53), trial("trial_00001", 0.53), trial("trial_00002", 0.4)]
    assert best_trial(tied, "m", "max", "trial_00001").trial == "trial_00001"
    assert best_trial(tied[::-1], "m", "max", "trial_00000").trial == "trial_00000"
    assert best_trial(tied, "m", "max", None).trial == "trial_00000"
    assert best_trial(tied, "m", "min", "trial_00001").trial == "trial_00002"


def test_a_resumed_runs_written_leader_still_beats_worse_trials(tmp_path):
    """A driver killed after the best checkpoint was written: the resumed driver's new
    leader reads it back, so a worse trial that runs after the resume cannot take the
    export, and a better one still does (what tests/e2e/test_local_run.py's resume
    checks for a kill before the best is written)."""
    from trainers.checkpoint import MANIFEST
    from tune_jobs import layout
    from tune_jobs.leader import ExportLeader, read_leader

    Leader = ExportLeader.__ray_actor_class__  # the actor's class, in this process
    run_dir = str(tmp_path / "run")

    def checkpoint(trial: str) -> str:
        uri = tmp_path / "run" / "train_runs" / trial / "checkpoint_000010"
        uri.mkdir(parents=True)
        (uri / MANIFEST).write_text(json.dumps({"step": 10}))
        return str(uri)

    before = Leader("min", run_dir)  # the killed driver's
    before.written("trial_00001", checkpoint("trial_00001"), 0.61, {"eval_loss": 0.61})
    assert read_leader(run_dir)["trial"] == "trial_00001"

    resumed = Leader("min", run_dir)  # the resumed driver's: nothing in memory
    assert not resumed.improves(0.69)
    resumed.written("trial_00002", checkpoint("trial_00002"), 0.69, {"eval_loss": 0.69})
    assert read_leader(run_dir)["trial"] == "trial_00001"
    resumed.written("trial_00003", checkpoint("trial_00003"), 0.55, {"eval_loss": 0.55})
    assert read_leader(run_dir)["trial"] == "trial_00003"
    assert json.loads(Path(layout.leader_file(run_dir)).read_text())["value"] == 0.55
