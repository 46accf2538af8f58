"""Every report of every trial, as Tune received it, in ``<run>/reports/<trial>.jsonl``.

Tune's own ``result.json`` cannot be trusted after a trial restore: the driver
writes it in a staging folder, syncs it to storage now and then, and on every
restore copies the storage copy back over the staging one, so rows written
since the last sync are lost. Measured: under synch PBT (every trial paused and
restored at each interval) a trial's first rows went missing. This log is
written by a Tune callback in the driver, straight to the run folder, once per
result Tune processes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ray import tune

from cluster import storage
from tune_jobs import layout


def read_reports(run_dir: str, trial: str) -> list[dict[str, Any]]:
    """A trial's reports, in order; Tune's ``result.json`` for runs made before this log."""
    path = layout.report_log(run_dir, trial)
    if not storage.exists(path):
        path = storage.join(run_dir, trial, "result.json")
        if not storage.exists(path):
            return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def read_all_reports(run_dir: str) -> dict[str, list[dict[str, Any]]]:
    """Every trial's reports, by trial folder name (``trial_<n>``)."""
    logged = storage.list_names(storage.join(run_dir, layout.REPORTS_DIR))
    names = {n.removesuffix(".jsonl") for n in logged if n.endswith(".jsonl")}
    names |= {n for n in storage.list_names(run_dir) if n.startswith("trial_")}  # Tune's own
    return {name: read_reports(run_dir, name) for name in sorted(names)}


class ReportLog(tune.Callback):
    """Appends each result to the trial's log (a local file: appends; a URI: rewrites it)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._lines: dict[str, list[str]] = {}

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        name = os.path.basename(str(trial.path).rstrip("/"))
        line = json.dumps(result, default=str)
        path = layout.report_log(self.run_dir, name)
        if storage.is_uri(path):
            if name not in self._lines:  # a resumed run continues the existing log
                old = storage.read_text(path).splitlines() if storage.exists(path) else []
                self._lines[name] = [x for x in old if x.strip()]
            self._lines[name].append(line)
            storage.write_text(path, "\n".join(self._lines[name]) + "\n")
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as fh:
            fh.write(line + "\n")
