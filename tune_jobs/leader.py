"""The best checkpoint the sweep's trials wrote: the export's.

One ``ExportLeader`` actor per run, shared by the warm trials, records it in
``train_runs/leader.json`` (``tune_jobs.layout``); ``read_leader`` reads it back. Only
checkpoints whose manifest is still there count. A reevaluation keeps one leader per
config (``key``: the sweep trial it retrains; ``train_runs/leader-<key>.json``), so the
chosen config's best seed has its checkpoint whichever config led overall.
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
        self.run_dir = run_dir
        self.best: dict[str | None, float] = {}  # key -> best value reported
        # key -> best checkpoint written; a resumed run's earlier ones still count
        self.leaders: dict[str | None, dict[str, Any] | None] = {}
        self.progress: dict[str, tuple[int, int]] = {}  # trial -> (step, total steps)

    def _leader(self, key: str | None) -> dict[str, Any] | None:
        if key not in self.leaders:
            self.leaders[key] = read_leader(self.run_dir, key) if self.run_dir else None
        return self.leaders[key]

    def offer(self, value: float, key: str | None = None) -> bool:
        """Record ``value`` if it beats every value reported so far (for ``key``); did it?"""
        if M.better(value, self.best.get(key), self.mode):
            self.best[key] = value
            return True
        return False

    def improves(self, value: float, key: str | None = None) -> bool:
        """Would a checkpoint with ``value`` beat every checkpoint written so far (for ``key``)?"""
        leader = self._leader(key)
        return M.better(value, leader["value"] if leader else None, self.mode)

    def written(
        self, trial: str, uri: str, value: float, metrics: dict[str, Any], key: str | None = None
    ) -> None:
        """A checkpoint was written; the best one (for ``key``) is the export's."""
        if not self.improves(value, key):
            return
        self.leaders[key] = {"trial": trial, "uri": uri, "value": value, "metrics": metrics}
        if self.run_dir:
            storage.write_text(
                layout.leader_file(self.run_dir, key),
                json.dumps(self.leaders[key], indent=2, default=str),
            )

    def step(self, trial: str, step: int, total: int) -> None:
        """``trial`` has trained ``step`` of its ``total`` optimizer steps."""
        self.progress[trial] = (step, total)

    def steps(self) -> dict[str, tuple[int, int]]:
        return self.progress


def read_leader(run_dir: str, key: str | None = None) -> dict[str, Any] | None:
    """The best checkpoint warm-group trials wrote (``ExportLeader``; for ``key``), if any."""
    path = layout.leader_file(run_dir, key)
    if not storage.exists(path):
        return None
    leader = json.loads(storage.read_text(path))
    return leader if layout.manifest_of(leader["uri"]) is not None else None
