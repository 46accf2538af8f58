"""Which failures are retried, the record that stops a retry, and where a restore goes on."""

from __future__ import annotations

import json

import pytest
import ray.exceptions as rx
import torch.distributed as dist

from cluster.storage import StorageUnavailable
from trainers.engine import OutOfMemory, TrainingDiverged
from trainers.model import ModelError
from tune_jobs import faults, layout
from tune_jobs.layout import latest_resumable


def _raised(error: BaseException, cause: BaseException | None = None) -> BaseException:
    """``error`` as Python leaves it once raised and caught (``from cause``, if given)."""
    try:
        if cause is None:
            raise error
        try:
            raise cause
        except BaseException as inner:
            raise error from inner
    except BaseException as exc:  # noqa: BLE001 - the test wants it whatever it is
        return exc


GLOO_DEAD_PEER = "[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer"
CASES = [
    # the cluster's doing, by type
    pytest.param(rx.ActorDiedError(), None, True, id="actor-died"),
    pytest.param(dist.DistBackendError("NCCL communicator was aborted"), None, True, id="nccl"),
    pytest.param(StorageUnavailable("storage: write failed after 300 s"), None, True, id="storage"),
    pytest.param(ConnectionResetError(104, "reset"), None, True, id="connection-reset"),
    pytest.param(RuntimeError("the step failed"), rx.ActorDiedError(), True, id="raised-from"),
    # the trial's own, by type, whatever its words say
    pytest.param(
        TrainingDiverged("loss is nan at step 7 (Connection reset by peer)"), None, False, id="nan"
    ),
    pytest.param(OutOfMemory("out of memory in step 1 on cuda:0"), None, False, id="oom"),
    pytest.param(
        ModelError("model.name_or_path: no weights"), ConnectionResetError(), False, id="own-outer"
    ),
    pytest.param(OSError("no file named model.safetensors in /m"), None, False, id="missing-file"),
    pytest.param(KeyError("input_ids"), None, False, id="a-bug"),
    # no type decides: gloo's dead peer is a bare RuntimeError, named only by its words
    pytest.param(RuntimeError(GLOO_DEAD_PEER), None, True, id="gloo-words"),
    pytest.param(RuntimeError("shape mismatch"), None, False, id="other-words"),
]


@pytest.mark.parametrize(("error", "cause", "transient"), CASES)
def test_a_failure_is_retried_only_when_the_cluster_caused_it(error, cause, transient):
    """Real exceptions of each kind, raised and caught: decided by their classes (and those
    of the exceptions they were raised from), and the same after crossing a process as a
    warm group's ``Failed`` reply (pickled, as Ray sends it), types by name only."""
    import pickle
    import traceback

    from trainers.serve import Failed, error_types

    exc = _raised(error, cause)
    assert faults.exception_is_transient(exc) is transient
    trace = "".join(traceback.format_exception(exc))
    reply = pickle.loads(pickle.dumps(Failed(trace, error_types(exc))))
    assert faults.is_transient(reply.types, reply.error) is transient


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
    # the last one written, whole or not (the smoke pass's restore check takes it)
    assert layout.latest_checkpoint(str(trial)) == str(trial / "start1" / "checkpoint_000020")
    assert layout.next_numbered(str(trial), layout.START) == "start2"


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
