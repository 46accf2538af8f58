"""MLflow tracking (``tune_jobs.mlflow_tracking``) against a real ``mlflow server`` started
here (SQLite backend, local artifact store; stopped by its process group id): the
sweep's parent run, a nested run per trial with its metrics by step, the best model as
an artifact and a registered version, the champion alias, a resume logging into the
same runs, a stopped sweep marked KILLED, and no planted secret anywhere MLflow keeps."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from ray.tune.experiment import Trial

from tests.e2e.cluster_procs import MlflowServer, environment
from tune_jobs.mlflow_tracking import MlflowCallback, MlflowRuns, set_champion
from tune_jobs.space import trial_hparams
from tune_jobs.spec import parse_spec

PLANTED = {
    "HF_TOKEN": "hf_plantedTOKEN0123456789",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED0123",
    "AWS_SECRET_ACCESS_KEY": "planted-secret-key-0123",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password",
    "MLFLOW_TRACKING_USERNAME": "planted-user",
}


@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server


def spec_for(server: MlflowServer, storage: Path, name: str, **tracking):
    return parse_spec(
        {
            "search": {"space": {"learning_rate": {"loguniform": [1e-5, 1e-3]}}},
            "tracking": {"mlflow_uri": server.uri, **tracking},
            "run": {"name": name, "storage_path": str(storage)},
        },
        source="test",
    )


def trial(n: int, lr: float) -> Trial:
    return Trial("WarmTrial", config={"learning_rate": lr}, trial_id=f"abc_{n:05d}", stub=True)


def report(step: int, acc: float, lr: float) -> dict:
    return {
        "step": step,
        "eval_accuracy": acc,
        "eval_loss": 1 - acc,
        "lr": lr,
        "worker_pid": 4242,  # bookkeeping: not tracked
        "config": {"learning_rate": lr},
    }


def export_folder(run_dir: Path) -> Path:
    folder = run_dir / "best_model"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# card\n")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "job_spec.yaml").write_text("run: {}\n")
    return folder


def summary_of(run_dir: Path, best_trial: str | None) -> dict:
    best = None
    if best_trial:
        best = {
            "trial": best_trial,
            "config": {"learning_rate": 3e-5},
            "metrics": {"eval_accuracy": 0.8},
            "test": {"eval_accuracy": 0.79},
            "export_dir": str(run_dir / "best_model"),
        }
    return {
        "metric": "eval_accuracy",
        "majority_baseline": {"validation_accuracy": 0.5},
        "wall_time_s": 12.5,
        "trials": [{}, {}],
        "failed_trials": {"trial_00001": "boom"},
        "best": best,
    }


@pytest.fixture(scope="module")
def swept(server, tmp_path_factory):
    """A two-trial sweep through the Tune callback, with secrets planted in the
    environment: trial 0 reports twice and finishes, trial 1 is mutated (PBT) and fails."""
    storage = tmp_path_factory.mktemp("runs")
    spec = spec_for(server, storage, "tracked", registered_model="sentiment")
    run_dir = storage / "tracked"
    export = export_folder(run_dir)
    said: list[str] = []
    with environment(**PLANTED):
        runs = MlflowRuns(spec, str(run_dir), said.append)
        callback = MlflowCallback(runs, lambda config: trial_hparams(spec, config))
        a, b = trial(0, 3e-5), trial(1, 1e-4)
        callback.on_trial_start(0, [], a)
        callback.on_trial_start(0, [], b)
        callback.on_trial_result(0, [], a, report(10, 0.70, 3e-5))
        callback.on_trial_result(0, [], b, report(10, 0.60, 1e-4))
        callback.on_trial_result(0, [], a, report(20, 0.80, 3e-5))
        callback.on_trial_result(0, [], b, report(20, 0.65, 1.2e-4))  # mutated at step 20
        callback.on_trial_complete(0, [], a)
        callback.on_trial_error(0, [], b)
        # the reevaluation's experiment: its trial_00000 retrains the sweep's on seed 1
        again = MlflowCallback(runs, lambda config: trial_hparams(spec, config), "reevaluate/")
        seeded = trial(0, 3e-5)
        seeded.config = {**seeded.config, "seed": 1, "reevaluates": "trial_00000"}
        again.on_trial_start(0, [], seeded)
        again.on_trial_result(0, [], seeded, report(20, 0.78, 3e-5))
        again.on_trial_complete(0, [], seeded)
        result = runs.finish(summary_of(run_dir, "trial_00000"), None)
        set_champion(spec, result, said.append)
    return spec, run_dir, export, result, said


def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.uri)


def test_a_sweep_is_a_parent_run_with_a_nested_run_per_trial(server, swept):
    spec, run_dir, _, result, said = swept
    c = client(server)
    parent = c.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tracked"
    assert parent.data.params["search.metric"] == "eval_accuracy"
    assert parent.data.params["best_trial"] == "trial_00000"
    assert parent.data.metrics["best_eval_accuracy"] == pytest.approx(0.8)
    assert parent.data.metrics["test_eval_accuracy"] == pytest.approx(0.79)
    children = c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    # the reevaluation's retraining is a run of its own beside the sweep's same-numbered trial
    assert set(by_name) == {"trial_00000", "trial_00001", "reevaluate/trial_00000"}
    again = by_name["reevaluate/trial_00000"]
    assert again.info.status == "FINISHED"
    assert again.data.params["searched.seed"] == "1"
    history = c.get_metric_history(again.info.run_id, "eval_accuracy")
    assert [(m.step, m.value) for m in history] == [(20, pytest.approx(0.78))]
    assert by_name["trial_00000"].info.status == "FINISHED"
    assert by_name["trial_00001"].info.status == "FAILED"
    first = by_name["trial_00000"]
    assert float(first.data.params["learning_rate"]) == pytest.approx(3e-5)
    assert first.data.params["searched.learning_rate"] == "3e-05"
    history = c.get_metric_history(first.info.run_id, "eval_accuracy")
    assert [(m.step, m.value) for m in history] == [(10, 0.70), (20, pytest.approx(0.80))]
    assert "worker_pid" not in first.data.metrics  # bookkeeping is not tracked
    # a PBT mutation shows as the searched value over steps
    mutated = c.get_metric_history(by_name["trial_00001"].info.run_id, "config.learning_rate")
    assert [(m.step, m.value) for m in mutated] == [(10, 1e-4), (20, pytest.approx(1.2e-4))]
    assert any(line.startswith(f"mlflow: run {parent.info.run_id}") for line in said)


def test_the_best_model_is_an_artifact_and_a_registered_version_with_the_alias(server, swept):
    _, _, export, result, said = swept
    c = client(server)
    names = {a.path for a in c.list_artifacts(result["run_id"], "best_model")}
    assert names == {"best_model/model.safetensors", "best_model/README.md"}
    local = c.download_artifacts(result["run_id"], "best_model/model.safetensors")
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert digest(local) == digest(export / "model.safetensors")
    assert {a.path for a in c.list_artifacts(result["run_id"])} >= {
        "summary.json",
        "job_spec.yaml",
    }
    version = c.get_model_version("sentiment", result["version"])
    assert version.run_id == result["run_id"]
    assert c.get_model_version_by_alias("sentiment", "champion").version == result["version"]
    assert f"mlflow: sentiment@champion is now version {result['version']}" in said


def test_no_planted_secret_reaches_mlflow(server, swept):
    """MLflow's database and its whole artifact store, byte for byte."""
    kept = [Path(server.database)] + [p for p in Path(server.artifacts).rglob("*") if p.is_file()]
    for path in kept:
        body = path.read_bytes()
        for secret in PLANTED.values():
            assert secret.encode() not in body, (secret, path)


def test_a_resumed_sweep_logs_into_the_same_runs_and_a_stopped_one_is_killed(server, swept):
    spec, run_dir, _, result, said = swept
    c = client(server)
    again = MlflowRuns(spec, str(run_dir), said.append)  # what tunefleet resume does
    assert again.ids["parent"] == result["run_id"]
    again.trial_started("trial_00000", {}, {"learning_rate": 3e-5})
    trial_run = again.ids["trials"]["trial_00000"]
    assert c.get_run(trial_run).info.status == "RUNNING"
    again.abandon()  # the resumed driver was stopped (SIGTERM)
    assert c.get_run(result["run_id"]).info.status == "KILLED"
    assert c.get_run(trial_run).info.status == "KILLED"
    failed = again.ids["trials"]["trial_00001"]
    assert c.get_run(failed).info.status == "FAILED"  # an ended run keeps its status


def test_an_mlflow_that_goes_away_is_said_once_and_the_sweep_goes_on(server, tmp_path):
    spec = spec_for(server, tmp_path, "outage")
    said: list[str] = []
    runs = MlflowRuns(spec, str(tmp_path / "outage"), said.append)
    from mlflow.tracking import MlflowClient

    with environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"):
        runs.client = MlflowClient("http://127.0.0.1:9")  # the server gone (nothing listens)
        runs.trial_started("trial_00000", {}, {"learning_rate": 3e-5})
        runs.trial_result("trial_00000", report(10, 0.7, 3e-5))
        assert runs.finish(summary_of(tmp_path, None), None) is None
    assert len(said) == 1 and said[0].startswith("mlflow: could not start trial_00000's run")
    assert "the run goes on" in said[0]
