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

import html
import json
from dataclasses import dataclass, field
from typing import Any

from cluster import storage
from trainers import metrics as M
from tune_jobs.report_log import read_reports

PBT_GLOBAL_LOG = "pbt_global.txt"
LINEAGE_FILE = "lineage.json"
LINEAGE_SVG = "lineage.svg"


class LineageError(ValueError):
    """The run's files do not give a consistent lineage (named in the message)."""


def trial_of_tag(tag: str) -> str:
    """Tune's experiment tag starts with the trial's counter, as tunefleet's trial names do."""
    return f"trial_{int(str(tag).split('_', 1)[0]):05d}"


def trial_rows(run_dir: str, trial: str) -> list[dict[str, Any]]:
    """The trial's reports, in order; empty if it never reported."""
    return read_reports(run_dir, trial)


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


def read_lineage(run_dir: str) -> list[dict[str, Any]]:
    """Every PBT exploit of a run, in order: who cloned whom, at which step, with which new values."""
    path = storage.join(run_dir, PBT_GLOBAL_LOG)
    if not storage.exists(path):
        return []
    rows: dict[str, list[dict[str, Any]]] = {}
    out = []
    for line in storage.read_text(path).splitlines():
        if not line.strip():
            continue
        recipient, donor, recipient_iter, donor_iter, donor_config, new_config = json.loads(line)
        recipient = trial_of_tag(recipient)
        if recipient not in rows:
            rows[recipient] = trial_rows(run_dir, recipient)
        out.append(
            {
                "recipient": recipient,
                "donor": trial_of_tag(donor),
                "recipient_iteration": recipient_iter,
                "donor_iteration": donor_iter,
                # the step of the donor's checkpoint the recipient continued from
                "step": restored_step(rows[recipient], new_config, recipient_iter),
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


def trial_schedule(run_dir: str, trial: str) -> Schedule:
    """The schedule of hyperparameters ``trial``'s final weights were trained with."""
    rows = trial_rows(run_dir, trial)
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
        step = restored_step(trial_rows(run_dir, owner), config, iteration)
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


def lineage_svg(
    trials: dict[str, list[dict[str, Any]]],
    exploits: list[dict[str, Any]],
    metric: str,
    mode: str,
    highlight: Schedule | None = None,
) -> str:
    """An SVG of the population over steps: one lane per trial, its reports as dots shaded
    by ``metric`` (darker is better), an arrow per exploit from the donor's checkpoint to
    the recipient labelled with the mutated values; ``highlight``'s lineage drawn bold."""
    names = sorted(trials)
    lane, left, top, width = 46, 96, 40, 760
    steps = [int(r[M.STEP]) for rows in trials.values() for r in rows] or [1]
    max_step = max(max(steps), 1)
    values = [r[metric] for rows in trials.values() for r in rows if r.get(metric) is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)

    def x(step: float) -> float:
        return left + width * step / max_step

    def y(trial: str) -> float:
        return top + lane * names.index(trial) + lane / 2

    def shade(value: float | None) -> str:
        if value is None or hi == lo:
            return "#777"
        q = (value - lo) / (hi - lo)
        q = q if mode == "max" else 1 - q
        g = int(200 - 170 * q)
        return f"rgb({g},{g},{min(255, g + 40)})"

    bold: set[tuple[str, int, int]] = set()  # (trial, from_step, to_step) on the highlighted path
    if highlight:
        bounds = [(0, highlight.root_trial)] + [(s, t) for s, _, t in highlight.switches]
        for (start, owner), (end, _) in zip(bounds, bounds[1:] + [(max_step, None)], strict=True):
            bold.add((owner, start, end))

    height = top + lane * len(names) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 40}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="18" font-size="13">PBT lineage: {html.escape(metric)} '
        f"({'darker is better'}), arrows are exploits (donor checkpoint -> recipient)</text>",
        '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#c0392b"/></marker></defs>',
    ]
    for step in range(0, max_step + 1, max(1, max_step // 6)):
        out.append(
            f'<text x="{x(step):.1f}" y="{height - 14}" text-anchor="middle" fill="#555">{step}</text>'
        )
    out.append(f'<text x="{left - 8}" y="{height - 14}" text-anchor="end" fill="#555">step</text>')
    for name in names:
        rows = [{**r, "_metric": r.get(metric)} for r in trials[name]]
        out.append(
            f'<text x="{left - 8}" y="{y(name) + 4:.1f}" text-anchor="end" class="trial">{name}</text>'
        )
        for seg in _segments(rows):
            for (s0, _), (s1, _) in zip(seg, seg[1:], strict=False):
                on_path = any(t == name and a <= s0 and s1 <= b for t, a, b in bold)
                out.append(
                    f'<line x1="{x(s0):.1f}" y1="{y(name):.1f}" x2="{x(s1):.1f}" y2="{y(name):.1f}" '
                    f'stroke="{"#111" if on_path else "#bbb"}" stroke-width="{4 if on_path else 2}"/>'
                )
            for s, value in seg:
                if value is not None:
                    out.append(
                        f'<circle cx="{x(s):.1f}" cy="{y(name):.1f}" r="5" fill="{shade(value)}">'
                        f"<title>{name} step {s}: {metric} {value:.4f}</title></circle>"
                    )
    for e in exploits:
        if e.get("step") is None:
            continue
        sx, d, r = x(e["step"]), y(e["donor"]), y(e["recipient"])
        label = html.escape(mutation_label(e["mutated"]))
        out.append(
            f'<line class="exploit" data-donor="{e["donor"]}" data-recipient="{e["recipient"]}" '
            f'data-step="{e["step"]}" x1="{sx:.1f}" y1="{d:.1f}" x2="{sx + 6:.1f}" y2="{r:.1f}" '
            f'stroke="#c0392b" stroke-width="1.5" marker-end="url(#arrow)"/>'
        )
        anchor, tx = ("end", sx - 6) if sx > left + 0.7 * width else ("start", sx + 9)
        out.append(
            f'<text x="{tx:.1f}" y="{r - 8:.1f}" text-anchor="{anchor}" fill="#c0392b" '
            f'font-size="10">{label}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def write_lineage(
    run_dir: str, exploits: list[dict[str, Any]], metric: str, mode: str, best_trial: str | None
) -> str | None:
    """Write ``lineage.json`` and ``lineage.svg`` (the best trial's lineage bold); the svg's path."""
    if not exploits:
        return None
    storage.write_text(storage.join(run_dir, LINEAGE_FILE), json.dumps(exploits, indent=2))
    names = sorted(n for n in storage.list_names(run_dir) if n.startswith("trial_"))
    trials = {n: trial_rows(run_dir, n) for n in names}
    highlight = None
    if best_trial:
        try:
            highlight = trial_schedule(run_dir, best_trial)
        except LineageError:
            highlight = None
    path = storage.join(run_dir, LINEAGE_SVG)
    storage.write_text(path, lineage_svg(trials, exploits, metric, mode, highlight))
    return path
