"""PBT lineage: who cloned whom, at which step, with which mutated values.

Sources, both written during the run:

- Tune's ``pbt_global.txt`` (one line per exploit: recipient tag, donor tag,
  their training iterations, the donor's config, the new config) and
  ``pbt_policy_<trial id>.txt`` (the exploits a trial's weights went through:
  the donor's file plus the new line, so it reads back to a trial that trained
  from scratch);
- each trial's reports (``tune_jobs.report_log``): the recipient's first report after an exploit
  carries ``restored_from_step``, the step of the checkpoint it continued from.
  Tune's logged iterations can lag that checkpoint by an interval under
  ``synch=True``; the restored step cannot, so steps come from the reports.

From them: the run's lineage log (``lineage.json``, also in ``summary.json``), a
picture (``lineage.svg``), and one trial's schedule of hyperparameters for
``tunefleet replay``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster import storage
from trainers import metrics as M

#: Each trial's reports by trial name (``tune_jobs.report_log.read_all_reports``).
Reports = Mapping[str, list[dict[str, Any]]]

PBT_GLOBAL_LOG = "pbt_global.txt"
LINEAGE_FILE = "lineage.json"
LINEAGE_SVG = "lineage.svg"


class LineageError(ValueError):
    """The run's files do not give a consistent lineage (named in the message)."""


def trial_of_tag(tag: str) -> str:
    """Tune's experiment tag starts with the trial's counter, as tunefleet's trial names do."""
    return f"trial_{int(str(tag).split('_', 1)[0]):05d}"


def restored_step(
    rows: list[dict[str, Any]], config: dict[str, Any], after_iteration: int = 0
) -> int | None:
    """The checkpoint step from which a trial continued with ``config`` after an exploit
    logged at its iteration ``after_iteration`` (a trial can take the same config twice)."""
    for row in rows:
        if (
            row.get("training_iteration", 0) > after_iteration
            and row.get("config") == config
            and row.get(M.RESTORED_FROM_STEP, -1) >= 0
        ):
            return int(row[M.RESTORED_FROM_STEP])
    return None


def read_lineage(run_dir: str, reports: Reports) -> list[dict[str, Any]]:
    """Every PBT exploit of a run, in order: who cloned whom, at which step, with which new values."""
    path = storage.join(run_dir, PBT_GLOBAL_LOG)
    if not storage.exists(path):
        return []
    out = []
    for line in storage.read_text(path).splitlines():
        if not line.strip():
            continue
        recipient, donor, recipient_iter, donor_iter, donor_config, new_config = json.loads(line)
        recipient = trial_of_tag(recipient)
        out.append(
            {
                "recipient": recipient,
                "donor": trial_of_tag(donor),
                "recipient_iteration": recipient_iter,
                "donor_iteration": donor_iter,
                # the step of the donor's checkpoint the recipient continued from
                "step": restored_step(reports.get(recipient, []), new_config, recipient_iter),
                "donor_config": donor_config,
                "new_config": new_config,
                "mutated": {k: v for k, v in new_config.items() if donor_config.get(k) != v},
            }
        )
    return out


@dataclass(frozen=True)
class Schedule:
    """A trial's hyperparameters over steps: ``root_config`` from step 0 (trained by
    ``root_trial``), then each switch ``(from_step, config, trial that trained it)``."""

    trial: str
    root_trial: str
    root_config: dict[str, Any]
    switches: list[tuple[int, dict[str, Any], str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "segments": [
                {"from_step": 0, "config": self.root_config, "trained_by": self.root_trial}
            ]
            + [{"from_step": s, "config": c, "trained_by": t} for s, c, t in self.switches],
        }


def policy_chain(
    lines: list[list[Any]],
) -> tuple[str, dict[str, Any], list[tuple[str, int, dict[str, Any]]]]:
    """(root tag, root config, [(recipient tag, its iteration, new config), ...]) of a trial's
    policy file.

    Read from the end: a line belongs to the chain while its recipient is the donor
    of the line after it (Tune's own rule in ``PopulationBasedTrainingReplay``).
    """
    chain: list[tuple[str, int, dict[str, Any]]] = []
    donor_tag, root_config, expected = None, None, None
    for recipient, donor, recipient_iter, _, donor_config, new_config in reversed(lines):
        if expected is not None and recipient != expected:
            break
        chain.append((recipient, recipient_iter, new_config))
        donor_tag, root_config, expected = donor, donor_config, donor
    return donor_tag, root_config, list(reversed(chain))


def trial_schedule(run_dir: str, trial: str, reports: Reports) -> Schedule:
    """The schedule of hyperparameters ``trial``'s final weights were trained with."""
    rows = reports.get(trial, [])
    if not rows:
        raise LineageError(f"{trial} has no reports in {run_dir}")
    policy = storage.join(run_dir, f"pbt_policy_{rows[0]['trial_id']}.txt")
    if not storage.exists(policy):  # never exploited: its own config throughout
        return Schedule(trial, trial, dict(rows[0]["config"]))
    lines = [json.loads(x) for x in storage.read_text(policy).splitlines() if x.strip()]
    root_tag, root_config, chain = policy_chain(lines)
    switches = []
    for tag, iteration, config in chain:
        owner = trial_of_tag(tag)
        step = restored_step(reports.get(owner, []), config, iteration)
        if step is None:
            raise LineageError(
                f"{owner} never reported after taking config {config} (its result.json is "
                "incomplete): the schedule's step there is unknown"
            )
        if switches and step < switches[-1][0]:
            raise LineageError(f"{trial}'s lineage goes back in steps at {owner}: {step}")
        switches.append((step, config, owner))
    return Schedule(trial, trial_of_tag(root_tag), root_config, switches)


# --- the picture --------------------------------------------------------------------------

_SHORT = {
    "learning_rate": "lr",
    "lr_scheduler_type": "",
    "unfreeze_depth": "depth",
    "weight_decay": "wd",
    "warmup_ratio": "warmup",
    "warmup_steps": "warmup",
    "per_device_train_batch_size": "batch",
}


def _value(v: Any) -> str:
    return f"{v:.2g}" if isinstance(v, float) else str(v)


def mutation_label(mutated: dict[str, Any]) -> str:
    """``lr 3.2e-05, cosine, depth 1``: the mutated values, short."""
    return ", ".join(f"{_SHORT.get(k, k)} {_value(v)}".strip() for k, v in sorted(mutated.items()))


def _segments(rows: list[dict[str, Any]]) -> list[list[tuple[int, float | None]]]:
    """A trial's (step, metric) points, split where a restore made it continue from another step."""
    out: list[list[tuple[int, float | None]]] = []
    for row in rows:
        restored = row.get(M.RESTORED_FROM_STEP, -1)
        if not out or (row.get("iterations_since_restore") == 1 and restored >= 0):
            out.append([(max(int(restored), 0), None)])  # from the step it started at
        out[-1].append((int(row[M.STEP]), row.get("_metric")))
    return out


def lineage_figure(
    trials: Reports,
    exploits: list[dict[str, Any]],
    metric: str,
    mode: str,
    highlight: Schedule | None = None,
) -> Any:
    """A matplotlib figure of the population over steps: one lane per trial, its reports as
    dots coloured by ``metric``, an arrow per exploit from the donor's checkpoint to the
    recipient labelled with the mutated values, and ``highlight``'s lineage drawn bold.

    Artists carry ids (an SVG keeps them): ``lane:<trial>`` and
    ``exploit:<donor>:<recipient>:<step>``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(trials)
    lane = {name: len(names) - 1 - i for i, name in enumerate(names)}  # first trial on top
    values = [r[metric] for rows in trials.values() for r in rows if r.get(metric) is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    cmap = plt.get_cmap("viridis" if mode == "max" else "viridis_r")
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)

    bold: list[tuple[str, int, int | None]] = []  # (trial, from step, to step) of the highlight
    if highlight:
        bounds = [(0, highlight.root_trial)] + [(s, t) for s, _, t in highlight.switches]
        for (start, owner), (end, _) in zip(bounds, bounds[1:] + [(None, None)], strict=True):
            bold.append((owner, start, end))

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(names)), layout="constrained")
    for name in names:
        rows = [{**r, "_metric": r.get(metric)} for r in trials[name]]
        y = lane[name]
        for seg in _segments(rows):
            xs = [s for s, _ in seg]
            ax.plot(xs, [y] * len(xs), color="#bbbbbb", lw=2, zorder=1, gid=f"lane:{name}")
            for owner, start, end in bold:
                if owner == name:
                    inside = [x for x in xs if x >= start and (end is None or x <= end)]
                    if len(inside) > 1:
                        ax.plot(inside, [y] * len(inside), color="black", lw=4, zorder=2)
            points = [(s, v) for s, v in seg if v is not None]
            if points:
                ax.scatter(
                    [s for s, _ in points],
                    [y] * len(points),
                    c=[v for _, v in points],
                    cmap=cmap,
                    norm=norm,
                    s=40,
                    zorder=3,
                )
    for e in exploits:
        if e.get("step") is None:
            continue
        ax.annotate(
            "",
            xy=(e["step"], lane[e["recipient"]]),
            xytext=(e["step"], lane[e["donor"]]),
            arrowprops={"arrowstyle": "->", "color": "#c0392b", "lw": 1.5},
            zorder=4,
        ).arrow_patch.set_gid(f"exploit:{e['donor']}:{e['recipient']}:{e['step']}")
        ax.text(
            e["step"],
            lane[e["recipient"]] + 0.18,
            " " + mutation_label(e["mutated"]),
            color="#c0392b",
            fontsize=8,
            zorder=5,
        )
    ax.set_yticks([lane[n] for n in names], names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel("step")
    ax.set_title(
        "PBT lineage: arrows are exploits (donor checkpoint -> recipient); bold: best trial's lineage",
        fontsize=9,
    )
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    return fig


def lineage_svg(
    trials: Reports,
    exploits: list[dict[str, Any]],
    metric: str,
    mode: str,
    highlight: Schedule | None = None,
) -> str:
    """``lineage_figure`` as SVG text (text as text, ids kept, no date: the same run draws
    the same file)."""
    import io

    import matplotlib
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "tunefleet"}):
        fig = lineage_figure(trials, exploits, metric, mode, highlight)
        out = io.StringIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
        plt.close(fig)
    return out.getvalue()


def write_lineage(
    run_dir: str,
    exploits: list[dict[str, Any]],
    metric: str,
    mode: str,
    best_trial: str | None,
    reports: Reports,
) -> str | None:
    """Write ``lineage.json`` and ``lineage.svg`` (the best trial's lineage bold); the svg's path."""
    if not exploits:
        return None
    storage.write_text(storage.join(run_dir, LINEAGE_FILE), json.dumps(exploits, indent=2))
    highlight = None
    if best_trial:
        try:
            highlight = trial_schedule(run_dir, best_trial, reports)
        except LineageError:
            highlight = None
    path = storage.join(run_dir, LINEAGE_SVG)
    storage.write_text(path, lineage_svg(dict(reports), exploits, metric, mode, highlight))
    return path
