"""TensorBoard event files per trial (``<run>/<trial>/events.out.tfevents.*``).

Tune's own TensorBoard logger, fed only what a person reads: the task's metrics, the
losses and their gap, the learning rate, epochs, throughput and the unfreeze depth
(not Tune's or tunefleet's bookkeeping: pids, restore steps, fingerprints), against the
optimizer step. At a trial's end the HParams view gets its hyperparameters with its
final metrics. Tune writes the files in the trial's folder and syncs them to the run
folder, local or in a bucket; ``tensorboard --logdir <run folder>`` shows every trial.
On by default; ``tracking.tensorboard: false`` leaves it out.
"""

from __future__ import annotations

from typing import Any

from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION

from trainers import metrics as M


class TensorBoard(TBXLoggerCallback):
    """Tune's TensorBoard logger on the reports' readable metrics, by optimizer step."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        kept = {k: v for k, v in result.items() if k in M.TRACKED}
        kept[TRAINING_ITERATION] = result[TRAINING_ITERATION]
        kept[TIMESTEPS_TOTAL] = result.get(M.STEP) or result[TRAINING_ITERATION]  # the x axis
        super().log_trial_result(iteration, trial, kept)
