"""The best checkpoint the sweep's trials wrote: the export's.

One ``ExportLeader`` actor per run, shared by the warm trials, records it in
``train_runs/leader.json`` (``tune_jobs.layout``); ``read_leader`` reads it back. Only
checkpoints whose manifest is still there count.
"""

from __future__ import annotations

import json
from typing import Any

import ray

from cluster import storage
from trainers import metrics as M
from tune_jobs import layout


@ray.remote(num_cpus=0)
class ExportLeader:
    """What the sweep's export needs, in one place (one per run, shared by the trials).

    ``offer``: the best value of the searched metric reported so far (DeepSpeed trials
    write an evaluation that leads at once). ``improves`` / ``written``: the best
    checkpoint written so far; ``written`` also records it in ``train_runs/leader.json``,
    which the export reads.

    Beside it, for the live console only (``tune_jobs.console``): ``step`` is where a
    single-process trial is between its evaluations, ``steps`` all of them (a few bytes,
    sent at most every ``trainers.serve.PROGRESS_EVERY_S``; one actor fewer per run).
    """

    def __init__(self, mode: str, run_dir: str | None = None) -> None:
        self.mode = mode
        self.path = layout.leader_file(run_dir) if run_dir else None
        self.best = None  # best value reported
        # best checkpoint written; a resumed run's earlier one still counts
        self.leader: dict[str, Any] | None = read_leader(run_dir) if run_dir else None
        self.progress: dict[str, tuple[int, int]] = {}  # trial -> (step, total steps)

    def offer(self, value: float) -> bool:
        """Record ``value`` if it beats every value reported so far; did it?"""
        if M.better(value, self.best, self.mode):
            self.best = value
            return True
        return False

    def improves(self, value: float) -> bool:
        """Would a checkpoint with ``value`` beat every checkpoint written so far?"""
        return M.better(value, self.leader["value"] if self.leader else None, self.mode)

    def written(self, trial: str, uri: str, value: float, metrics: dict[str, Any]) -> None:
        """A checkpoint was written; the best one is the export's."""
        if not self.improves(value):
            return
        self.leader = {"trial": trial, "uri": uri, "value": value, "metrics": metrics}
        if self.path:
            storage.write_text(self.path, json.dumps(self.leader, indent=2, default=str))

    def step(self, trial: str, step: int, total: int) -> None:
        """``trial`` has trained ``step`` of its ``total`` optimizer steps."""
        self.progress[trial] = (step, total)

    def steps(self) -> dict[str, tuple[int, int]]:
        return self.progress


def read_leader(run_dir: str) -> dict[str, Any] | None:
    """The best checkpoint warm-group trials wrote (``ExportLeader``), if any."""
    path = layout.leader_file(run_dir)
    if not storage.exists(path):
        return None
    leader = json.loads(storage.read_text(path))
    return leader if layout.manifest_of(leader["uri"]) is not None else None
