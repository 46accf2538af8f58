"""Which failures are retried, the record that stops a retry, and where a restore goes on."""

from __future__ import annotations

import json

import pytest

from tune_jobs import faults
from tune_jobs.warm import latest_resumable


@pytest.mark.parametrize(
    ("text", "transient"),
    [
        ("ray.exceptions.ActorDiedError: The actor died unexpectedly", True),
        ("RuntimeError: [../third_party/gloo/...] Connection closed by peer [127.0.0.1]", True),
        ("torch.distributed.DistBackendError: NCCL error", True),
        ("cluster.storage.StorageUnavailable: storage: write s3://b/k failed", True),
        ("trainers.engine.TrainingDiverged: the training loss is nan at step 7", False),
        ("trainers.engine.OutOfMemory: out of memory in training step 1 on cuda:0", False),
        ("OSError: no file named model.safetensors found in directory /m", False),
    ],
)
def test_only_what_the_cluster_broke_is_transient(text, transient):
    assert faults.is_transient(text) is transient


def test_a_recorded_failure_refuses_the_retry_with_the_same_cause(tmp_path):
    folder = str(tmp_path / "failures")
    faults.refuse_if_failed(folder, "trial_00001")  # nothing recorded: goes on
    faults.record(folder, "trial_00001", "Traceback ...\nTrainingDiverged: loss is nan at step 7")
    with pytest.raises(faults.TrialFailed) as info:
        faults.refuse_if_failed(folder, "trial_00001")
    assert str(info.value).splitlines()[-1] == "TrainingDiverged: loss is nan at step 7"
    faults.refuse_if_failed(folder, "trial_00002")  # another trial is not concerned
    faults.refuse_if_failed(None, "trial_00001")  # no folder (outside a run): nothing kept


def _checkpoint(path, step, resumable=True, manifest=True):
    path.mkdir(parents=True)
    if manifest:
        (path / "tunefleet_checkpoint.json").write_text(
            json.dumps({"step": step, "resumable": resumable})
        )


def test_a_restore_goes_on_from_the_newest_resumable_checkpoint(tmp_path):
    trial = tmp_path / "trial_00001"
    assert latest_resumable(str(trial)) is None
    _checkpoint(trial / "start0" / "checkpoint_000004", 4)
    _checkpoint(trial / "start0" / "checkpoint_000008", 8)
    _checkpoint(trial / "start1" / "checkpoint_000012", 12)
    _checkpoint(trial / "start1" / "checkpoint_000016", 16, resumable=False)  # weights only
    _checkpoint(trial / "start1" / "checkpoint_000020", 20, manifest=False)  # half written
    assert latest_resumable(str(trial)) == str(trial / "start1" / "checkpoint_000012")


def test_resume_takes_the_name_and_storage_from_the_folder(tmp_path):
    from tune_jobs.run import resume_spec
    from tune_jobs.spec import parse_spec

    run = tmp_path / "results" / "sweep-2"
    run.mkdir(parents=True)
    spec = parse_spec({"run": {"name": "sweep", "storage_path": "/elsewhere"}})
    (run / "job_spec.yaml").write_text(spec.to_yaml())
    (run / "tuner.pkl").write_bytes(b"")
    resumed = resume_spec(str(run) + "/", ["resources.max_concurrent_trials=1"])
    assert resumed.run.name == "sweep-2"  # the folder, not the spec's name (if_exists: new)
    assert resumed.run.storage_path == str(tmp_path / "results")
    assert resumed.run.if_exists == "resume"
    assert resumed.smoke.enabled is False
    assert resumed.resources.max_concurrent_trials == 1
