"""MLflow tracking (``tracking.mlflow_uri``; the ``mlflow`` extra).

One parent run for the sweep (the run's facts as params; at the end its best scores,
the summary, the report, the spec and the exported model as artifacts), and a run
nested under it per trial (the trial's hyperparameters; its metrics by optimizer step,
as TensorBoard gets them). Where ``tracking.registered_model`` is set, the exported
model becomes a new version of that registered model; ``tunefleet retrain`` points the
alias ``champion`` at a version it promotes (``set_champion``).

Everything goes from the driver through ``MlflowClient`` (no fluent API, no global
active run), so the workers need neither mlflow nor its credentials. The runs' ids are
kept in ``<run>/tracking/mlflow.json``: a resumed sweep logs into the same runs.

What is sent is chosen, never the environment: hyperparameters, metric names, the
spec's model/data/search facts, paths. A URI with credentials is refused in the spec
(they come from ``MLFLOW_TRACKING_TOKEN`` and the like, which mlflow reads itself).
An MLflow that goes away mid-sweep is said once and the sweep goes on: tracking is a
copy of what the run folder holds, never the reason a sweep fails. An MLflow that is
not there when the run starts is refused before Ray (``check_reachable``, exit 2).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from cluster import storage
from trainers import metrics as M
from tune_jobs import layout
from tune_jobs.console import DriverCallback
from tune_jobs.spec import JobSpec, Problem
from tune_jobs.tables import fmt

#: The alias a promoted retrain version gets.
CHAMPION_ALIAS = "champion"
#: MLflow's limit on a param's value (characters).
PARAM_MAX = 6000
#: Seconds the start-up check waits for an answer.
REACH_TIMEOUT_S = 5.0
#: The MLflow client's HTTP patience, where the user set none: its defaults (7 retries
#: with doubling backoff, 120 s a request) would hold Tune's loop for minutes on an outage.
CLIENT_PATIENCE = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def check_reachable(spec: JobSpec) -> list[Problem]:
    """Problems with ``tracking.mlflow_uri``, found before Ray starts: mlflow not installed,
    or no MLflow server answering at an http(s) URI."""
    uri = spec.tracking.mlflow_uri
    if not uri:
        return []
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return [
            Problem(
                "tracking.mlflow_uri",
                uri,
                "needs mlflow: pip install 'tunefleet[mlflow]' (or leave tracking.mlflow_uri out)",
            )
        ]
    if not uri.startswith(("http://", "https://")):
        return []  # a local folder or database: created on first use
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=REACH_TIMEOUT_S) as answer:
            if answer.status == 200:
                return []
            said = f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        said = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        said = str(getattr(exc, "reason", exc))
    return [
        Problem(
            "tracking.mlflow_uri",
            uri,
            f"no MLflow server answers at {health} ({said}): start it (mlflow server "
            "--host 0.0.0.0 --port 5000), fix the address, or leave tracking.mlflow_uri out",
        )
    ]


def _client(uri: str) -> Any:
    for key, value in CLIENT_PATIENCE.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:PARAM_MAX]) for k, v in sorted(values.items()) if v is not None]


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def sweep_params(spec: JobSpec) -> dict[str, Any]:
    """The parent run's params: what the sweep is (no paths beyond the model's name)."""
    return {
        "model": spec.model.name_or_path,
        "task": spec.model.task,
        "data.source": spec.data.source,
        "search.metric": spec.search.metric,
        "search.mode": spec.search.resolved_mode,
        "search.num_samples": spec.search.num_samples,
        "search.algorithm": spec.search.algorithm,
        "search.space": ", ".join(spec.search.space),
        "scheduler": spec.scheduler.type,
        "adapter": spec.adapter.type,
        "strategy": spec.distributed.strategy,
        "trial_mode": spec.resources.trial_mode,
        "seed": spec.run.seed,
    }


class MlflowRuns:
    """The sweep's MLflow runs, from the driver. Any MLflow failure is said once
    (``say``) and turns tracking off for the rest of the sweep."""

    def __init__(self, spec: JobSpec, run_dir: str, say: Any) -> None:
        self.spec, self.run_dir, self.say = spec, run_dir, say
        self.uri = str(spec.tracking.mlflow_uri)
        self.ids_file = layout.mlflow_ids(run_dir)
        self.client: Any = None
        self.ids: dict[str, Any] = {}
        self.broken = False
        self._guard("start the sweep's run", self._open)

    def _guard(self, what: str, action: Any) -> Any:
        if self.broken:
            return None
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - tracking never ends a sweep
            self.broken = True
            self.say(
                f"mlflow: could not {what} ({type(exc).__name__}: {str(exc)[:200]}); "
                "tracking stops here, the run goes on (its folder has everything)"
            )
            return None

    def _open(self) -> None:
        self.client = _client(self.uri)
        if storage.exists(self.ids_file):  # a resume: the same runs
            self.ids = json.loads(storage.read_text(self.ids_file))
            self.client.update_run(self.ids["parent"], status="RUNNING")
            return
        name = self.spec.tracking.mlflow_experiment or self.spec.run.name
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        run_name = self.run_dir.rstrip("/").rsplit("/", 1)[-1]
        parent = self.client.create_run(
            experiment,
            run_name=run_name,
            tags={"tunefleet.run_dir": storage.split_query(self.run_dir)[0]},
        )
        self.ids = {"experiment": experiment, "parent": parent.info.run_id, "trials": {}}
        self.client.log_batch(self.ids["parent"], params=_params(sweep_params(self.spec)))
        self._save_ids()

    def _save_ids(self) -> None:
        storage.write_text(self.ids_file, json.dumps(self.ids, indent=2))

    # -- trials ------------------------------------------------------------------------

    def trial_started(self, trial: str, hparams: dict[str, Any], config: dict[str, Any]) -> None:
        def start() -> None:
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            if trial in self.ids["trials"]:
                self.client.update_run(self.ids["trials"][trial], status="RUNNING")
                return
            run = self.client.create_run(
                self.ids["experiment"],
                run_name=trial,
                tags={MLFLOW_PARENT_RUN_ID: self.ids["parent"], "tunefleet.trial": trial},
            )
            self.ids["trials"][trial] = run.info.run_id
            searched = {f"searched.{k}": v for k, v in config.items()}
            self.client.log_batch(run.info.run_id, params=_params({**_flat(hparams), **searched}))
            self._save_ids()

        self._guard(f"start {trial}'s run", start)

    def trial_result(self, trial: str, result: dict[str, Any]) -> None:
        def log() -> None:
            from mlflow.entities import Metric

            run_id = self.ids["trials"].get(trial)
            if run_id is None:
                return
            step = int(result.get(M.STEP) or result.get("training_iteration") or 0)
            now = int(time.time() * 1000)
            values = {k: v for k, v in result.items() if k in M.TRACKED}
            # the searched values by step too: a PBT mutation shows where it took effect
            values.update({f"config.{k}": v for k, v in (result.get("config") or {}).items()})
            metrics = [
                Metric(k, float(v), now, step)
                for k, v in sorted(values.items())
                if isinstance(v, int | float) and not isinstance(v, bool) and v == v
            ]
            self.client.log_batch(run_id, metrics=metrics)

        self._guard(f"log {trial}'s metrics", log)

    def trial_ended(self, trial: str, failed: bool) -> None:
        def end() -> None:
            run_id = self.ids["trials"].get(trial)
            if run_id is not None:
                self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

        self._guard(f"end {trial}'s run", end)

    def abandon(self) -> None:
        """The sweep ended without a result (stopped, or the driver failed): every run
        still open is marked KILLED."""

        def kill() -> None:
            for run_id in [self.ids["parent"], *self.ids["trials"].values()]:
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, "KILLED")

        self._guard("mark the sweep's runs stopped", kill)

    # -- the end of the sweep -----------------------------------------------------------

    def finish(self, summary: dict[str, Any], report: str | None) -> dict[str, Any] | None:
        """The parent run's scores and artifacts, the model's registration; what was logged
        (run id, model version) or None when tracking is off or broken."""
        return self._guard("log the sweep's result", lambda: self._finish(summary, report))

    def _finish(self, summary: dict[str, Any], report: str | None) -> dict[str, Any]:
        from mlflow.entities import Metric

        parent = self.ids["parent"]
        metric = summary["metric"]
        best = summary.get("best") or {}
        now = int(time.time() * 1000)
        values = {
            f"best_{metric}": (best.get("metrics") or {}).get(metric),
            "majority_baseline": summary["majority_baseline"]["validation_accuracy"],
            "wall_time_s": summary.get("wall_time_s"),
            "trials": len(summary["trials"]),
            "failed_trials": len(summary.get("failed_trials") or {}),
            **{f"test_{k}": v for k, v in (best.get("test") or {}).items()},
        }
        metrics = [
            Metric(k, float(v), now, 0)
            for k, v in values.items()
            if isinstance(v, int | float) and v == v
        ]
        params = {
            "best_trial": best.get("trial"),
            **{f"best.{k}": v for k, v in (best.get("config") or {}).items()},
        }
        self.client.log_batch(parent, metrics=metrics, params=_params(params))
        out: dict[str, Any] = {"run_id": parent, "uri": self.uri}
        with tempfile.TemporaryDirectory(prefix="tunefleet-mlflow-") as tmp:
            for name in (layout.SUMMARY_FILE, layout.SPEC_FILE):
                src = storage.join(self.run_dir, name)
                if storage.exists(src):
                    local = os.path.join(tmp, name)
                    storage.download_file(src, local)
                    self.client.log_artifact(parent, local)
            if report:
                local = os.path.join(tmp, os.path.basename(report))
                storage.download_file(report, local)
                self.client.log_artifact(parent, local)
            if best.get("export_dir"):
                local = os.path.join(tmp, layout.EXPORT_DIR)
                storage.download_dir(best["export_dir"], local)
                self.client.log_artifacts(parent, local, layout.EXPORT_DIR)
                out["model_uri"] = f"runs:/{parent}/{layout.EXPORT_DIR}"
        name = self.spec.tracking.registered_model
        if name and "model_uri" in out:
            out["registered_model"] = name
            out["version"] = self._register(name, parent)
            self.say(f"mlflow: registered {name} version {out['version']}")
        failed = bool(summary.get("failed_trials")) and not best
        self.client.set_terminated(parent, "FAILED" if failed else "FINISHED")
        self.ids["result"] = out
        self._save_ids()
        self.say(
            f"mlflow: run {parent} in experiment {self.ids['experiment']} at {self.uri}"
            + (f" ({metric} {fmt(values[f'best_{metric}'])})" if best else "")
        )
        return out

    def _register(self, name: str, run_id: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{layout.EXPORT_DIR}"
        version = self.client.create_model_version(name, source, run_id=run_id)
        return str(version.version)


def set_champion(spec: JobSpec, result: dict[str, Any] | None, say: Any) -> bool:
    """Point ``champion`` at the version a retrain just promoted; did it?"""
    name = spec.tracking.registered_model
    if not name or not result or "version" not in result:
        return False
    try:
        _client(result["uri"]).set_registered_model_alias(name, CHAMPION_ALIAS, result["version"])
    except Exception as exc:  # noqa: BLE001 - the registry's own record is the one that counts
        say(f"mlflow: could not set {name}@{CHAMPION_ALIAS} ({type(exc).__name__}: {exc})")
        return False
    say(f"mlflow: {name}@{CHAMPION_ALIAS} is now version {result['version']}")
    return True


class MlflowCallback(DriverCallback):
    """The Tune side: trial runs as Tune starts, reports and ends trials. ``prefix``: a
    second experiment's (the reevaluation's ``reevaluate/``), so its trial runs are named
    apart from the sweep's, as its report folders are (``layout.trial_of``)."""

    def __init__(self, runs: MlflowRuns, hparams: Any, prefix: str = "") -> None:
        self.runs = runs
        self.hparams = hparams  # config -> the trial's full hyperparameters
        self.prefix = prefix

    def _name(self, trial: Any) -> str:
        return self.prefix + layout.trial_name(trial)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.runs.trial_started(self._name(trial), self.hparams(trial.config), dict(trial.config))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        self.runs.trial_result(self._name(trial), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.runs.trial_ended(self._name(trial), failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.runs.trial_ended(self._name(trial), failed=True)
