"""The report's pictures (matplotlib, Agg), each a function of a ``RunView`` that returns PNG
bytes, or ``None`` when the run has nothing to draw there.

One look throughout: the best trial (the summary's, else the best so far) is drawn bold in
one colour, every other trial thin; a trial's line breaks where a restore made it go on
from another step (a PBT exploit), so no line ever joins two different models.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainers import metrics as M  # noqa: E402
from tune_jobs.report.collect import RunView  # noqa: E402

BEST_COLOUR = "#c0392b"
WIDTH = 8.0  # inches, at 100 dpi: 800 px, what an 80-column page shows whole
#: More trials than this are drawn grey, without a legend.
LEGEND_MAX = 10


def png(fig: Any) -> bytes:
    """The figure as PNG bytes (no timestamp: the same run draws the same bytes)."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out.getvalue()


def best_trial(view: RunView) -> str | None:
    """The summary's best trial; while the sweep runs, the best report so far."""
    if view.summary and view.summary.get("best"):
        return view.summary["best"]["trial"]
    scored = [
        (M.rank(r.get(view.metric), view.mode), t)
        for t, rows in view.reports.items()
        for r in rows
        if r.get(view.metric) is not None
    ]
    return min(scored)[1] if scored else None


def _style(view: RunView, trial: str, index: int) -> dict[str, Any]:
    if trial == best_trial(view):
        return {"color": BEST_COLOUR, "lw": 2.6, "zorder": 3, "label": f"{trial} (best)"}
    many = len(view.reports) > LEGEND_MAX
    colour = "#9e9e9e" if many else plt.get_cmap("tab10")(index % 10)
    return {"color": colour, "lw": 1.0, "alpha": 0.8, "zorder": 2, "label": None if many else trial}


def runs_of(rows: list[dict[str, Any]], key: str) -> Iterator[tuple[list[int], list[float]]]:
    """A trial's (steps, values) of ``key``, split where the step goes back or a restore
    continued from a checkpoint other than the last report (an exploit)."""
    steps: list[int] = []
    values: list[float] = []
    for r in sorted(rows, key=lambda r: r.get("training_iteration", 0)):
        if r.get(key) is None or r.get(M.STEP) is None:
            continue
        restored = r.get(M.RESTORED_FROM_STEP, -1)
        jumped = steps and (r[M.STEP] <= steps[-1] or (restored >= 0 and restored != steps[-1]))
        if jumped:
            yield steps, values
            steps, values = [], []
        steps.append(int(r[M.STEP]))
        values.append(float(r[key]))
    if steps:
        yield steps, values


def _trace(ax: Any, view: RunView, key: str) -> bool:
    drawn = False
    for i, (trial, rows) in enumerate(sorted(view.reports.items())):
        style = _style(view, trial, i)
        for n, (steps, values) in enumerate(runs_of(rows, key)):
            ax.plot(
                steps,
                values,
                marker="o",
                ms=3,
                **{**style, "label": style["label"] if n == 0 else None},
            )
            drawn = True
    return drawn


def _legend(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)


def curves(view: RunView) -> bytes | None:
    """The searched metric and the validation loss (or, when the loss is the searched
    metric, the task's headline score) against the step, every trial."""
    from trainers.tasks import get_task

    second = (M.EVAL_LOSS, *get_task(view.task).scores)
    keys = [view.metric, next(k for k in second if k != view.metric)]
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 3.2), layout="constrained")
    drawn = False
    for ax, key in zip(axes, keys, strict=True):
        drawn |= _trace(ax, view, key)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    return png(fig) if drawn else (plt.close(fig) or None)


def lr_used(view: RunView) -> bytes | None:
    """The learning rate each trial trained with at every step: its schedule (a pure function
    of the step, ``trainers.optim.lr_at``) under the config each report was made with, so a
    PBT mutation shows where it took effect; the LR each report logged as dots on it."""
    from trainers.config import HParams
    from trainers.optim import lr_at
    from tune_jobs.space import trial_hparams

    fig, ax = plt.subplots(figsize=(WIDTH, 3.0), layout="constrained")
    drawn = False
    for i, (trial, rows) in enumerate(sorted(view.reports.items())):
        style = _style(view, trial, i)
        ordered = sorted(rows, key=lambda r: r.get("training_iteration", 0))
        previous = None
        for r in ordered:
            if r.get(M.STEP) is None or r.get(M.LR) is None:
                continue
            start = r.get(M.RESTORED_FROM_STEP, -1)
            if start is None or start < 0 or r.get("iterations_since_restore", 2) != 1:
                start = previous if previous is not None and previous < r[M.STEP] else 0
            if view.spec is not None and r.get(M.TOTAL_STEPS):
                hp = HParams.from_dict(trial_hparams(view.spec, r["config"]))
                steps = list(range(int(start), int(r[M.STEP]) + 1))
                ax.plot(
                    steps,
                    [lr_at(hp, s, int(r[M.TOTAL_STEPS])) for s in steps],
                    **{**style, "label": style["label"] if not drawn or previous is None else None},
                )
            ax.plot([r[M.STEP]], [r[M.LR]], "o", ms=3, color=style["color"], zorder=4)
            previous = int(r[M.STEP])
            drawn = True
    ax.set_title(
        "learning rate used (line: the schedule; dots: what each report logged)", fontsize=10
    )
    ax.set_xlabel("step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return png(fig) if drawn else (plt.close(fig) or None)


def loss_gap(view: RunView) -> bytes | None:
    """Validation loss minus training loss against the step: rising is overfitting."""
    fig, ax = plt.subplots(figsize=(WIDTH, 3.0), layout="constrained")
    drawn = _trace(ax, view, M.LOSS_GAP)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_title("loss gap (validation - training loss): a rising gap is overfitting", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return png(fig) if drawn else (plt.close(fig) or None)


# --- the searched keys ----------------------------------------------------------------


def trial_points(view: RunView) -> list[tuple[str, dict[str, Any], float]]:
    """(trial, its first config, its best value of the metric) of every trial that has one.
    The first config: what the search proposed (under PBT, later configs are mutations)."""
    out = []
    for trial, rows in sorted(view.reports.items()):
        values = [r[view.metric] for r in rows if r.get(view.metric) is not None]
        if not values:
            continue
        best = min(values, key=lambda v: M.rank(v, view.mode))
        out.append((trial, rows[0]["config"], float(best)))
    return out


def _kind(view: RunView, key: str) -> str:
    """'log', 'linear' or 'category': how an axis of ``key`` is drawn."""
    entry = (view.spec.search.space.get(key) if view.spec is not None else None) or {}
    if isinstance(entry, dict) and "loguniform" in entry:
        return "log"
    values = [c.get(key) for _, c, _ in trial_points(view)]
    numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if numeric and len(numeric) == len(values):
        positive = min(numeric) > 0
        return "log" if positive and max(numeric) / min(numeric) >= 100 else "linear"
    return "category"


def hparams_vs_metric(view: RunView) -> bytes | None:
    """One panel per searched key: each trial's value against its best metric."""
    points = trial_points(view)
    keys = [k for k in view.searched if any(k in c for _, c, _ in points)]
    if not points or not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(WIDTH, 2.6 * rows), layout="constrained", squeeze=False
    )
    best = best_trial(view)
    for ax, key in zip(axes.flat, keys, strict=False):
        kind = _kind(view, key)
        xs = [c.get(key) for _, c, _ in points]
        if kind == "category":
            labels = sorted({str(x) for x in xs})
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=15)
        elif kind == "log":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        colours = [BEST_COLOUR if t == best else "#34495e" for t, _, _ in points]
        ax.scatter(xs, [v for _, _, v in points], c=colours, s=30, zorder=3)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel(view.metric, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    return png(fig)


def _axis_values(
    view: RunView, key: str, values: list[Any], kind: str | None = None
) -> tuple[list[float], list[str]]:
    """``values`` placed on a 0..1 axis, and the axis's tick labels (bottom, top)."""
    kind = kind or _kind(view, key)
    if kind == "category":
        labels = sorted({str(v) for v in values})
        span = max(1, len(labels) - 1)
        return [labels.index(str(v)) / span for v in values], [labels[0], labels[-1]]
    nums = [float(v) for v in values]
    f = math.log10 if kind == "log" else float
    lo, hi = min(nums), max(nums)
    span = (f(hi) - f(lo)) or 1.0
    return [(f(v) - f(lo)) / span for v in nums], [f"{lo:.3g}", f"{hi:.3g}"]


def parallel_coordinates(view: RunView) -> bytes | None:
    """Every finished trial as a line across the searched keys and the metric, coloured by
    the metric (log axes for log-uniform keys, categories spread evenly)."""
    points = [p for p in trial_points(view) if all(k in p[1] for k in view.searched)]
    keys = view.searched
    if len(points) < 2 or not keys:
        return None
    axes_keys = [*keys, view.metric]
    columns = [_axis_values(view, k, [c[k] for _, c, _ in points]) for k in keys]
    columns.append(_axis_values(view, view.metric, [v for *_, v in points], kind="linear"))
    fig, ax = plt.subplots(figsize=(WIDTH, 3.4), layout="constrained")
    values = [v for *_, v in points]
    cmap = plt.get_cmap("viridis" if view.mode == "max" else "viridis_r")
    norm = matplotlib.colors.Normalize(
        min(values), max(values) if max(values) > min(values) else min(values) + 1e-9
    )
    order = sorted(range(len(points)), key=lambda i: -M.rank(points[i][2], view.mode))
    for i in order:  # the best drawn last, on top
        ys = [col[0][i] for col in columns]
        best = points[i][0] == best_trial(view)
        ax.plot(range(len(axes_keys)), ys, color=cmap(norm(points[i][2])), lw=2.6 if best else 1.2)
    for x, (_, (low, high)) in enumerate(columns):
        ax.axvline(x, color="black", lw=0.8)
        ax.text(x, -0.08, low, ha="center", va="top", fontsize=7)
        ax.text(x, 1.04, high, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(axes_keys)), axes_keys, fontsize=8)
    ax.tick_params(axis="x", pad=14)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.12)
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=view.metric)
    return png(fig)


def importance(scores: dict[str, float], trials: int) -> bytes | None:
    """A bar per searched key: its fANOVA importance (share of the metric's variance)."""
    if not scores:
        return None
    keys = sorted(scores, key=scores.get)
    fig, ax = plt.subplots(figsize=(WIDTH, 0.6 + 0.45 * len(keys)), layout="constrained")
    ax.barh(keys, [scores[k] for k in keys], color="#34495e")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the metric's variance (fANOVA)")
    ax.set_title(f"hyperparameter importance over {trials} finished trials", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return png(fig)


# --- PBT ------------------------------------------------------------------------------


def lineage(view: RunView) -> bytes | None:
    """The PBT lineage picture (``tune_jobs.lineage.lineage_figure``) as a PNG."""
    from tune_jobs.lineage import LineageError, lineage_figure, trial_schedule

    if not view.exploits:
        return None
    highlight = None
    best = best_trial(view)
    if best:
        try:
            highlight = trial_schedule(view.run_dir, best, view.reports)
        except LineageError:
            highlight = None
    return png(lineage_figure(view.reports, view.exploits, view.metric, view.mode, highlight))


def mutations(view: RunView) -> bytes | None:
    """Per mutated key, each trial's value over its steps (the configs its reports carry)."""
    keys = sorted({k for e in view.exploits for k in e.get("mutated", {})})
    if not keys:
        return None
    fig, axes = plt.subplots(
        len(keys), 1, figsize=(WIDTH, 1.9 * len(keys) + 0.4), layout="constrained", squeeze=False
    )
    for ax, key in zip(axes[:, 0], keys, strict=True):
        kind = _kind(view, key)
        labels = sorted({str(r["config"].get(key)) for rows in view.reports.values() for r in rows})
        for i, (trial, rows) in enumerate(sorted(view.reports.items())):
            style = _style(view, trial, i)
            for steps, _ in runs_of(rows, M.STEP):
                by_step = {
                    int(r[M.STEP]): r["config"].get(key) for r in rows if r.get(M.STEP) in steps
                }
                ys = [by_step[s] for s in steps]
                if kind == "category":
                    ys = [labels.index(str(y)) for y in ys]
                ax.step(steps, ys, where="pre", marker="o", ms=3, **{**style, "label": None})
        if kind == "category":
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
        elif kind == "log":
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel(key, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("mutated hyperparameters over steps, per trial", fontsize=10)
    return png(fig)


# --- retrain --------------------------------------------------------------------------


def promotions(view: RunView) -> bytes | None:
    """Champion against challenger on each retrain's promotion rows, from the registry."""
    entries = [
        e
        for e in view.registry
        if (e.get("challenger") or {}).get("promotion_accuracy") is not None
    ]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, 3.0), layout="constrained")
    xs = [int(e.get("retrain", i + 1)) for i, e in enumerate(entries)]
    challenger = [e["challenger"]["promotion_accuracy"] for e in entries]
    champion = [(e.get("champion") or {}).get("promotion_accuracy") for e in entries]
    ax.plot(xs, challenger, "o-", color=BEST_COLOUR, label="challenger (this retrain's best)")
    held = [(x, y) for x, y in zip(xs, champion, strict=True) if y is not None]
    if held:
        ax.plot(*zip(*held, strict=True), "s--", color="#34495e", label="champion")
    for x, e, y in zip(xs, entries, challenger, strict=True):
        ax.annotate(
            e.get("decision", ""),
            (x, y),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(xs)
    ax.set_xlabel("retrain")
    ax.set_ylabel("promotion-set accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return png(fig)
