"""The run folder: every name in it, and every walk over it. Other modules ask here.

::

    <run.storage_path>/<run>/
        job_spec.yaml              the spec as run; a resume and a replay read it back
        summary.json               the run's summary (``tune_jobs.results``)
        best_model/                the exported model, re-scored (``metrics.json`` last)
        reports/<trial>.jsonl      every report of every trial (``tune_jobs.report_log``)
        failures/<trial>.json      a trial whose own code failed: not retried (``faults``)
        logs/driver.log            Ray's and Tune's own output, the workers' prints
                                   (``tune_jobs.console``; not with ``--verbose``)
        tracking/mlflow.json       the sweep's MLflow run ids (``tune_jobs.mlflow_tracking``)
        train_runs/leader.json     the best checkpoint warm-group trials wrote: the export's
        train_runs/group<k>/       a warm worker group's Ray Train run
        train_runs/<trial>/start<k>/checkpoint_<step>/
                                   what a trial's workers wrote; a restore begins start<k+1>
        tuner.pkl, experiment_state-*.json, <trial>/ ...   Ray Tune's own

Names are deterministic (``next_numbered``): a restarted driver finds its own folders.

Nothing tunefleet writes while a sweep runs may sit at the top level as ``*.json`` or
``*.pkl``: a restored Tune copies every such file into its staging folder and uploads
them again at each snapshot, over what was written since (measured: a resumed sweep's
``leader.json``, rewritten when a resumed trial's best was written, was put back to the
one from before the kill, and the export took a worse trial). ``summary.json`` is written
after the sweep; ``leader.json`` lives under ``train_runs/``.
"""

from __future__ import annotations

import json

from cluster import storage
from trainers.checkpoint import MANIFEST

SPEC_FILE = "job_spec.yaml"
SUMMARY_FILE = "summary.json"
LEADER_FILE = "leader.json"
#: a reevaluation's own Tune experiment (``tune_jobs.reevaluate``), inside the run folder
REEVALUATE_DIR = "reevaluate"
EXPORT_DIR = "best_model"
REPORTS_DIR = "reports"
FAILURES_DIR = "failures"
TRAIN_RUNS = "train_runs"
DRIVER_LOG = "logs/driver.log"
MLFLOW_IDS = "tracking/mlflow.json"
TUNER_FILE = "tuner.pkl"  # Tune's; its presence says the sweep started
START = "start"  # <trial>/start<k>: one start of a trial (first, restore, exploit)
CHECKPOINT = "checkpoint_"  # <start>/checkpoint_<step>: written by the workers


def train_runs(run_dir: str) -> str:
    """Where the trials' workers write (``TrialPlan.train_storage``)."""
    return storage.join(run_dir, TRAIN_RUNS)


def leader_file(run_dir: str, key: str | None = None) -> str:
    """The export's leader (``tune_jobs.leader``); a reevaluated config's, by ``key``."""
    name = LEADER_FILE if key is None else LEADER_FILE.replace(".json", f"-{key}.json")
    return storage.join(train_runs(run_dir), name)


def trial_name(trial: object) -> str:
    """A Tune trial's folder and report name, ``trial_<n>``: Tune's per-run counter, not its
    random experiment id (deterministic, so a restarted driver finds its own)."""
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"  # type: ignore[attr-defined]


def trial_of(uri: str) -> str | None:
    """The trial a checkpoint belongs to (the ``trial_<n>`` folder on its path; a
    reevaluation's as ``reevaluate/trial_<n>``), or None."""
    parts = uri.split("?")[0].split("/")
    at = [i for i, p in enumerate(parts) if p.startswith("trial_")]
    if not at:
        return None
    i = at[-1]
    seeded = parts[i - 2 : i] == [REEVALUATE_DIR, TRAIN_RUNS]  # <run>/reevaluate/train_runs/
    return f"{REEVALUATE_DIR}/{parts[i]}" if seeded else parts[i]


def failures_dir(run_dir: str) -> str:
    return storage.join(run_dir, FAILURES_DIR)


def driver_log(run_dir: str) -> str:
    return storage.join(run_dir, DRIVER_LOG)


def mlflow_ids(run_dir: str) -> str:
    return storage.join(run_dir, MLFLOW_IDS)


def report_log(run_dir: str, trial: str) -> str:
    return storage.join(run_dir, REPORTS_DIR, f"{trial}.jsonl")


def next_numbered(folder: str, prefix: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """``<prefix><k>``, k the count of names under ``folder`` or in ``taken`` that start
    with ``prefix``: deterministic names for groups (``group<k>``) and a trial's starts
    (``start<k>``)."""
    names = {n for n in [*storage.list_names(folder), *taken] if n.startswith(prefix)}
    return f"{prefix}{len(names)}"


def checkpoints(trial_dir: str) -> list[tuple[int, int, str]]:
    """Every checkpoint under a trial's folder (``train_runs/<trial>``), over all its
    starts: ``(start k, step, uri)``, oldest start and step first; half-written ones
    (no manifest) included: callers that need whole ones check ``MANIFEST``."""
    found = []
    for start in storage.list_names(trial_dir) if storage.exists(trial_dir) else []:
        if not (start.startswith(START) and start[len(START) :].isdigit()):
            continue
        for name in storage.list_names(storage.join(trial_dir, start)):
            if name.startswith(CHECKPOINT) and name[len(CHECKPOINT) :].isdigit():
                k, step = int(start[len(START) :]), int(name[len(CHECKPOINT) :])
                found.append((k, step, storage.join(trial_dir, start, name)))
    return sorted(found)


def manifest_of(uri: str) -> dict | None:
    """A checkpoint's manifest (``trainers.checkpoint.MANIFEST``), or None while it is
    half written (the manifest is written last)."""
    path = storage.join(uri, MANIFEST)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def latest_checkpoint(trial_dir: str) -> str | None:
    """The trial's last checkpoint: the latest start's highest step; None if none."""
    found = checkpoints(trial_dir)
    return found[-1][2] if found else None


def latest_resumable(trial_dir: str) -> str | None:
    """The newest checkpoint of a trial (over all its starts) that it can continue from:
    ``resumable`` in its manifest (not a weights-only export candidate); None if none."""
    for _, _, uri in sorted(checkpoints(trial_dir), key=lambda c: (c[1], c[0]), reverse=True):
        manifest = manifest_of(uri)
        if manifest and manifest.get("resumable"):
            return uri
    return None


def written_checkpoints(run_dir: str) -> list[tuple[str, dict]]:
    """Every whole checkpoint the trials' workers left under ``train_runs``, with the
    metrics its manifest records: ``(uri, metrics)``."""
    root = train_runs(run_dir)
    found = []
    for trial in storage.list_names(root) if storage.exists(root) else []:
        if not trial.startswith("trial_"):
            continue  # group<k>/, leader.json
        for _, _, uri in checkpoints(storage.join(root, trial)):
            manifest = manifest_of(uri)
            if manifest is not None:
                found.append((uri, manifest["metrics"]))
    return found
