"""Start small as a fidelity: ASHA's rungs from the data size, decided on a metric that
already ranks configs early, and evaluations only where a decision needs one.

- ``first_rung``: ``scheduler.grace_period: auto`` is about ``RUNG_EXAMPLES`` training
  examples, as a power-of-two share of an epoch (1/64 .. 1), and at most max_t / eta^2
  so that three rungs fit. On 800 rows: a quarter epoch (MiniLM on Rotten Tomatoes: the
  loss at a quarter epoch already kept the three configs the full budget keeps; see
  ``benchmarks/tuning_efficiency.py``'s fidelity study).
- ``rung_metric``: ``auto`` is ``eval_loss`` for accuracy and F1 objectives (early in
  training most configs tie at the majority baseline, so ASHA's cut among them is a coin
  toss; the loss is continuous and already orders them), else the search metric. The
  search, the leaderboard and the export still use ``search.metric``.
- ``rungs``: the rung points (``grace x eta^k`` below max_t); with
  ``training.eval_strategy: rungs`` the trials evaluate there and at the end only: an
  evaluation between two rungs changes no decision and costs a pass over the validation
  rows (on the benchmark, 1,000 rows cost 2 s against 13 s for an epoch of training).

- ``rung_rows``: with evaluations at the rungs, every rung but the last scores a fixed
  sample of the validation rows (``training.screen_rows``; auto: ``SCREEN_ROWS`` where the
  validation split has at least ``SCREEN_MIN_VALIDATION`` rows). On the benchmark the first
  rung's evaluation of 1,000 rows cost as much as its quarter epoch of training; the
  rungs' decisions on the sample kept what the full rows kept (the fidelity study). The
  last rung and the end score every row: the trials that get that far are compared, and
  exported, on all of them.

``resolve`` turns the spec's ``auto`` values into numbers once the data is loaded: the
spec written to the run folder is the one the sweep ran.
"""

from __future__ import annotations

import math

from trainers import metrics as M
from tune_jobs.spec import JobSpec, budget_in, parse_spec

#: training examples the first rung is sized to
RUNG_EXAMPLES = 256
#: the smallest first rung, in epochs
MIN_RUNG_EPOCHS = 1 / 64
#: rung_rows auto: the screening sample's rows, and the validation rows it needs (below
#: them the saving is small and the sample a large share anyway)
SCREEN_ROWS = 256
SCREEN_MIN_VALIDATION = 2 * SCREEN_ROWS


def first_rung(spec: JobSpec, n_train: int, max_t: float | None) -> float:
    """``grace_period: auto`` in the scheduler's units (``time_attr``)."""
    sched = spec.scheduler
    eta = sched.reduction_factor
    if sched.time_attr == M.EPOCH:
        share = RUNG_EXAMPLES / max(1, n_train)
        rung = 2.0 ** round(math.log2(min(1.0, max(MIN_RUNG_EPOCHS, share))))
        if max_t:
            while rung > MIN_RUNG_EPOCHS and rung * eta * eta > max_t:
                rung /= 2
        return rung
    if sched.time_attr == M.STEP:
        rung = max(1, math.ceil(RUNG_EXAMPLES / examples_per_step(spec)))
        if max_t:
            rung = max(1, min(rung, math.floor(max_t / (eta * eta))))
        return float(rung)
    return 1.0  # training_iteration: the first report


def examples_per_step(spec: JobSpec, batch: int | None = None) -> int:
    """Training examples one optimizer step takes (``M.EFFECTIVE_BATCH_SIZE``, as the loop
    reports it): the micro-batch (``batch``, default the spec's) x accumulation x workers."""
    batch = batch or spec.training.per_device_train_batch_size
    return batch * spec.training.gradient_accumulation_steps * spec.resources.num_workers


def rungs(grace: float, eta: float, max_t: float) -> list[float]:
    """ASHA's rung points below ``max_t``: grace, grace x eta, ..."""
    points, t = [], grace
    while t < max_t - 1e-9:
        points.append(round(t, 6))
        t *= eta
    return points


def rung_metric(spec: JobSpec) -> tuple[str, str]:
    """The metric and mode ASHA/HyperBand decide on."""
    chosen = spec.scheduler.rung_metric
    if chosen == "auto":
        chosen = (
            M.EVAL_LOSS
            if spec.search.metric in (M.EVAL_ACCURACY, M.EVAL_F1)
            else spec.search.metric
        )
    return chosen, M.OBJECTIVES.get(chosen, spec.search.resolved_mode)


def screen_rows(spec: JobSpec, n_validation: int) -> int:
    """The validation rows the rungs but the last score (``scheduler.rung_rows``); 0: all."""
    rows = spec.scheduler.rung_rows
    if rows == "auto":
        rows = SCREEN_ROWS if n_validation >= SCREEN_MIN_VALIDATION else 0
    return 0 if rows >= n_validation else int(rows)


def budget_searched_note(spec: JobSpec) -> str | None:
    """A note where the space searches the training length under ASHA/HyperBand, which
    already decide how long each trial trains (DECISIONS 87), else None."""
    sched = spec.scheduler
    searched = [k for k in ("num_train_epochs", "max_steps") if k in spec.search.space]
    if sched.type not in ("asha", "hyperband") or sched.time_attr not in (M.EPOCH, M.STEP):
        return None
    if not searched:
        return None
    return (
        f"note: search.space.{searched[0]} under {sched.type.upper()}: the scheduler already "
        "decides how long each trial trains, and a trial searched to fewer epochs anneals its "
        "learning rate sooner, so it looks better at the early rungs than one that will train "
        f"longer; fixing training.{searched[0]} at the most you would train lets the rungs "
        "decide"
    )


def resolve(spec: JobSpec, n_train: int, n_validation: int = 0) -> JobSpec:
    """The spec with ``grace_period: auto``, ``eval_strategy: rungs`` and the rungs'
    screening sample (``rung_rows``) made concrete."""
    sched = spec.scheduler
    if sched.type not in ("asha", "hyperband"):
        return spec
    max_t = sched.max_t or budget_in(sched.time_attr, spec.training, spec.search.space)
    raw = spec.to_dict()
    grace = sched.grace_period
    if grace == "auto":
        grace = first_rung(spec, n_train, max_t)
        raw["scheduler"]["grace_period"] = grace
    if spec.training.eval_strategy == "rungs" and max_t and not spec.training.eval_at:
        points = rungs(float(grace), sched.reduction_factor, max_t)
        raw["training"]["eval_at"] = points
        raw["training"]["eval_at_unit"] = sched.time_attr
        rows = screen_rows(spec, n_validation)
        if rows and len(points) > 1:  # the last rung scores every row
            raw["training"]["screen_rows"] = rows
            raw["training"]["screen_until"] = points[-2]
    if raw == spec.to_dict():
        return spec
    return parse_spec(raw, source="the scheduler's rungs")
