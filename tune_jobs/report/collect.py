"""A run folder read back for the report, from its files alone.

Nothing here asks Ray or the driver: a finished run, a run whose sweep is still going
(or whose driver died), and a run folder in a bucket read the same way. What the folder
does not hold yet is ``None`` or empty, and ``RunView.state`` says why.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from cluster import storage
from trainers import metrics as M
from tune_jobs import layout
from tune_jobs.lineage import LINEAGE_FILE, read_lineage
from tune_jobs.report_log import read_all_reports
from tune_jobs.spec import JobSpec, Problem, SpecError

#: ``RunView.state``
FINISHED = "finished"  # summary.json is written: the sweep and its export are done
IN_PROGRESS = "in progress"  # the sweep started and has not summarised: running, or stopped
NOT_STARTED = "not started"  # the spec is written; no trial has reported


@dataclass
class RunView:
    """Everything the report shows, as the run folder holds it now."""

    run_dir: str
    spec: JobSpec | None  # job_spec.yaml (None when this version cannot parse it)
    summary: dict[str, Any] | None  # summary.json; None until the sweep is summarised
    reports: dict[str, list[dict[str, Any]]]  # every report of every trial, by trial
    exploits: list[dict[str, Any]]  # PBT exploits, in order
    failures: dict[str, str]  # trial -> why it failed (failures/<trial>.json, summary)
    retrain: dict[str, Any] | None  # retrain.json: the promotion decision of a retrain run
    registry: list[dict[str, Any]] = field(default_factory=list)  # the registry's history
    state: str = FINISHED
    metric: str = M.EVAL_ACCURACY
    mode: str = "max"

    @property
    def name(self) -> str:
        return posixpath.basename(storage.split_query(self.run_dir)[0].rstrip("/"))

    @property
    def task(self) -> str:
        if self.summary and self.summary.get("task"):
            return self.summary["task"]
        return self.spec.model.task if self.spec else "sequence_classification"

    @property
    def searched(self) -> list[str]:
        """The searched keys, in the spec's order (the configs' keys for an older spec)."""
        if self.spec is not None and self.spec.search.space:
            return list(self.spec.search.space)
        return sorted({k for rows in self.reports.values() for r in rows for k in r["config"]})

    def finished_trials(self) -> list[str]:
        """Trials with at least one report of the searched metric."""
        return [t for t, rows in self.reports.items() if any(self.metric in r for r in rows)]


def _read_json(path: str) -> Any:
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except ValueError:
        return None  # half-written by a driver that died: shown as missing, never a crash


def read_run(run_dir: str) -> RunView:
    """The run in ``run_dir`` (a local folder or a URI); ``SpecError`` naming RUN_DIR when the
    folder holds no tunefleet run."""
    from tune_jobs.retrain import RETRAIN_FILE
    from tune_jobs.run import run_spec

    run_dir = storage.normalize(run_dir.rstrip("/"))
    spec_path = storage.join(run_dir, layout.SPEC_FILE)
    if not storage.exists(spec_path):
        raise SpecError(
            [
                Problem(
                    "RUN_DIR",
                    run_dir,
                    f"no {layout.SPEC_FILE}: not a tunefleet run folder (give the folder "
                    "`tunefleet run` printed as its run folder)",
                )
            ]
        )
    try:
        spec: JobSpec | None = run_spec(run_dir)
    except SpecError:
        spec = None  # written by another version: the report goes on from the other files
    summary = _read_json(storage.join(run_dir, layout.SUMMARY_FILE))
    reports = {t: rows for t, rows in read_all_reports(run_dir).items() if rows}
    for rows in reports.values():
        for r in rows:
            r.setdefault("config", {})
    metric = (summary or {}).get("metric") or (spec.search.metric if spec else M.EVAL_ACCURACY)
    mode = (summary or {}).get("mode") or (spec.search.resolved_mode if spec else "max")
    if summary is not None:
        exploits = summary.get("exploits") or []
    else:
        exploits = _read_json(storage.join(run_dir, LINEAGE_FILE)) or read_lineage(run_dir, reports)
    failures: dict[str, str] = {}
    folder = layout.failures_dir(run_dir)
    for name in storage.list_names(folder):
        record = _read_json(storage.join(folder, name)) or {}
        failures[name.removesuffix(".json")] = str(record.get("error", "?")).splitlines()[-1]
    failures.update((summary or {}).get("failed_trials") or {})
    retrain = _read_json(storage.join(run_dir, RETRAIN_FILE))
    registry: list[dict[str, Any]] = []
    if retrain is not None:
        from tune_jobs.registry import Registry

        base, query = storage.split_query(run_dir)
        registry = Registry(posixpath.dirname(base) + query).history()  # the run's storage root
    if summary is not None:
        state = FINISHED
    elif reports:
        state = IN_PROGRESS
    else:
        state = NOT_STARTED
    return RunView(
        run_dir=run_dir,
        spec=spec,
        summary=summary,
        reports=reports,
        exploits=exploits,
        failures=failures,
        retrain=retrain,
        registry=registry,
        state=state,
        metric=metric,
        mode=mode,
    )
