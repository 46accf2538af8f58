"""The report's content, once, as blocks; then written as HTML (pictures inline) and as
Markdown (pictures as files beside it).

A block is a heading, a paragraph, a table or a picture. ``build_page`` decides what the
report says; ``to_html`` and ``to_markdown`` only lay it out.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

from trainers import metrics as M
from trainers.tasks import get_task
from tune_jobs.report import plots
from tune_jobs.report.collect import FINISHED, IN_PROGRESS, RunView
from tune_jobs.report.importance import fanova
from tune_jobs.tables import fmt


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Para:
    text: str
    kind: str = ""  # "note": a banner the reader must see (a partial report)


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Picture:
    name: str  # file name stem (Markdown) and the image's id (HTML)
    png: bytes
    alt: str


@dataclass
class Page:
    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(b for b in blocks if b is not None)

    def picture(self, name: str, data: bytes | None, alt: str) -> None:
        if data:
            self.blocks.append(Picture(name, data, alt))


# --- what the report says -------------------------------------------------------------


def _steps(rows: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    last = max((r for r in rows if r.get(M.STEP) is not None), key=lambda r: r[M.STEP], default={})
    return last.get(M.STEP), last.get(M.TOTAL_STEPS)


def trial_seconds(rows: list[dict[str, Any]]) -> float:
    """Seconds the trial trained (Tune's time_total_s, summed over its starts)."""
    return float(max((r.get("time_total_s") or 0.0 for r in rows), default=0.0))


def stop_reason(view: RunView, trial: str) -> str:
    """Why the trial ended where it did: its budget, a scheduler, patience, a failure, or
    still running."""
    rows = view.reports.get(trial, [])
    if trial in view.failures:
        return "failed"
    if any(r.get(M.EARLY_STOPPED) for r in rows):
        return "patience"
    step, total = _steps(rows)
    summary_trial = next(
        (t for t in (view.summary or {}).get("trials", []) if t["trial"] == trial), None
    )
    if summary_trial is None:
        return "running" if view.state == IN_PROGRESS else "-"
    if summary_trial["stopped_early"]:
        scheduler = view.spec.scheduler.type if view.spec else "scheduler"
        return f"stopped early ({scheduler})"
    return "budget spent" if step is not None and total and step >= total else "-"


def leaderboard(view: RunView) -> Table:
    """Every trial, best first: its searched values, scores, steps, cost and end."""
    task = get_task(view.task)
    columns = [c for c in task.objectives if c not in (view.metric, M.TRAIN_LOSS)]
    keys = view.searched
    defaults = ((view.summary or {}).get("defaults_trial") or {}).get("trial")
    trials = sorted(
        set(view.reports) | set(view.failures),
        key=lambda t: min(
            (M.rank(r.get(view.metric), view.mode) for r in view.reports.get(t, [])),
            default=float("inf"),
        ),
    )
    rows = []
    for trial in trials:
        reports = view.reports.get(trial, [])
        scored = [r for r in reports if r.get(view.metric) is not None]
        best = min(scored, key=lambda r: M.rank(r[view.metric], view.mode)) if scored else {}
        # the config its best report was made with (under PBT, a mutation of the first)
        config = (best or (reports[0] if reports else {})).get("config", {})
        step, total = _steps(reports)
        end = stop_reason(view, trial)
        if trial in view.failures:
            end = f"failed: {view.failures[trial]}"
        rows.append(
            [
                trial + (" (defaults)" if trial == defaults else ""),
                *(fmt(config.get(k, "-")) for k in keys),
                fmt(best.get(view.metric, "-")),
                *(fmt(best.get(c, "-")) for c in columns),
                f"{step if step is not None else '-'}/{total or '-'}",
                f"{trial_seconds(reports):.0f}",
                end,
            ]
        )
    header = ["trial", *keys, f"best {view.metric}", *columns, "steps", "trial-s", "ended"]
    return Table(header, rows)


def verdict(view: RunView) -> list[str]:
    """What was found and how sure it is: best vs the family defaults vs the baseline, on
    how many validation rows; the test score; where the model is."""
    summary = view.summary or {}
    best = summary.get("best")
    data = summary.get("data") or {}
    out = []
    if best:
        value = best["metrics"].get(view.metric)
        out.append(
            f"Best trial: {best['trial']} with {view.metric} {fmt(value)} on "
            f"{data.get('validation', '?')} validation rows, config "
            + ", ".join(f"{k}={fmt(v)}" for k, v in best["config"].items())
            + "."
        )
        versus = summary.get("best_vs_defaults")
        if versus:
            out.append(
                f"The family's default hyperparameters reached {fmt(versus['defaults'])} "
                f"({versus['improvement']:+.4f} for the best)"
                + (" but were stopped early." if versus["defaults_stopped_early"] else ".")
            )
        base = (summary.get("majority_baseline") or {}).get("validation_accuracy")
        if base is not None and base == base:
            kind = "answer" if view.task == "causal_lm" else "class"
            out.append(f"Always answering the most common {kind} scores {fmt(base)} (validation).")
        task = get_task(view.task)
        exported = best.get("exported_trial") or best["trial"]
        test = best.get("test") or {}
        said = ", ".join(f"{k} {fmt(test[k])}" for k in task.scores if k in test)
        if said:
            out.append(
                f"Test ({data.get('test', '?')} rows, scored once, the exported model of "
                f"{exported}): {said}."
            )
        if best.get("export_dir"):
            out.append(f"Model: {best['export_dir']} (its README.md is the model card).")
    elif view.state == FINISHED:
        out.append("No trial reported the searched metric: there is no best model.")
    return out


def facts(view: RunView) -> Table:
    summary = view.summary or {}
    data = summary.get("data") or {}
    spec = view.spec
    seconds = sum(trial_seconds(rows) for rows in view.reports.values())
    steps = sum((_steps(rows)[0] or 0) for rows in view.reports.values())
    rows = [
        ["run folder", view.run_dir],
        ["state", view.state],
        ["task", view.task],
    ]
    if spec is not None:
        rows += [
            ["model", spec.model.name_or_path],
            ["search", f"{spec.search.algorithm} (num_samples {spec.search.num_samples})"],
            ["scheduler", spec.scheduler.type],
            ["metric", f"{view.metric} ({view.mode})"],
        ]
    if data:
        rows.append(
            [
                "data",
                f"{data.get('rows')} rows: train {data.get('train')} / validation "
                f"{data.get('validation')} / test {data.get('test')}",
            ]
        )
    rows += [
        ["trials", f"{len(view.reports)} reported, {len(view.failures)} failed"],
        ["cost", f"{seconds:.0f} trial-seconds, {steps} optimizer steps"],
    ]
    if summary.get("wall_time_s") is not None:
        rows.append(["wall time", f"{summary['wall_time_s']:.0f} s"])
    return Table(["", ""], rows)


def state_note(view: RunView) -> Para | None:
    if view.state == FINISHED:
        return None
    if view.state == IN_PROGRESS:
        return Para(
            f"Partial report: the sweep has not finished (it is running, or its driver "
            f"stopped before the end; `tunefleet resume {view.run_dir}` finishes it). "
            f"{len(view.reports)} trial(s) have reported so far; no model is exported yet.",
            "note",
        )
    return Para(
        "No trial has reported yet: the run folder holds its spec only (the sweep is "
        "starting, or it stopped before its first evaluation).",
        "note",
    )


def seeds_section(again: dict[str, Any], metric: str) -> list[Any]:
    """search.reevaluate: the top configs trained again on new seeds (``tune_jobs.reevaluate``)."""
    from tune_jobs.reevaluate import describe

    blocks: list[Any] = [Heading("A choice that survives seeds")]
    if again.get("skipped"):
        return [*blocks, Para(f"Not run: {again['skipped']}.")]
    seeds = again.get("seeds") or []
    blocks.append(
        Table(
            [
                "config (sweep trial)",
                "searched values",
                "sweep",
                *(f"seed {s}" for s in seeds),
                "mean ± sd",
                "chosen",
            ],
            [
                [
                    c["trial"],
                    ", ".join(f"{k}={fmt(v)}" for k, v in c["config"].items()),
                    fmt(c["sweep"]),
                    *(fmt(c["seeds"].get(str(s), "-")) for s in seeds),
                    "-"
                    if c["mean"] is None
                    else fmt(c["mean"]) + ("" if c["sd"] is None else f" ± {fmt(c['sd'])}"),
                    "yes" if c["trial"] == again.get("chosen") else "",
                ]
                for c in again.get("configs") or []
            ],
        )
    )
    verdict = describe(again, metric)[1 + len(again.get("configs") or []) :]  # past the rows
    blocks += [Para(line.strip()) for line in verdict]
    return blocks


def build_page(view: RunView) -> Page:
    """Everything the report says about ``view``, in order."""
    page = Page(f"tunefleet report: {view.name}")
    page.add(state_note(view))
    for line in verdict(view):
        page.add(Para(line))
    page.add(facts(view))
    if view.reports or view.failures:
        page.add(Heading("Leaderboard"), leaderboard(view))
    if view.failures:
        page.add(Heading("Failed trials"))
        page.add(Table(["trial", "why"], [[t, r] for t, r in sorted(view.failures.items())]))
    if view.reports:
        page.add(Heading("Learning curves"))
        page.picture("curves", plots.curves(view), "validation metric and loss per step")
        page.picture("lr", plots.lr_used(view), "learning rate used per step")
        page.picture("loss_gap", plots.loss_gap(view), "validation minus training loss")
        page.add(Heading("Searched hyperparameters"))
        page.picture("hparams", plots.hparams_vs_metric(view), "each searched value vs the metric")
        page.picture("parallel", plots.parallel_coordinates(view), "parallel coordinates")
        found = fanova(view)
        page.picture("importance", plots.importance(found.scores, found.trials), found.note)
        page.add(Para(found.note + "."))
    again = (view.summary or {}).get("reevaluation")
    if again:
        page.add(*seeds_section(again, view.metric))
    if view.exploits:
        page.add(Heading(f"PBT: {len(view.exploits)} exploit(s)"))
        page.picture("lineage", plots.lineage(view), "PBT lineage")
        page.picture("mutations", plots.mutations(view), "mutated hyperparameters over steps")
        page.add(
            Table(
                ["step", "recipient", "donor", "mutated"],
                [
                    [
                        fmt(e.get("step", "-")),
                        e["recipient"],
                        e["donor"],
                        ", ".join(f"{k}={fmt(v)}" for k, v in e.get("mutated", {}).items()),
                    ]
                    for e in view.exploits
                ],
            )
        )
    if view.retrain:
        page.add(Heading("Retrain: champion vs challenger"))
        r = view.retrain
        challenger = (r.get("challenger") or {}).get("promotion_accuracy")
        champion = (r.get("champion") or {}).get("promotion_accuracy")
        page.add(
            Para(
                f"On {(r.get('promotion') or {}).get('rows', '?')} promotion rows: challenger "
                f"{fmt(challenger)}, champion {fmt(champion) if champion is not None else 'none yet'}"
                f"; decision: {r.get('decision', '?')} ({r.get('reason', '')})."
            )
        )
        page.picture("promotions", plots.promotions(view), "promotion accuracy per retrain")
        page.add(
            Table(
                ["retrain", "run", "challenger", "champion", "p", "decision"],
                [
                    [
                        str(e.get("retrain", "-")),
                        str(e.get("run", "-")),
                        fmt((e.get("challenger") or {}).get("promotion_accuracy", "-")),
                        fmt((e.get("champion") or {}).get("promotion_accuracy", "-")),
                        "-" if e.get("p_value") is None else f"{e['p_value']:.3g}",
                        str(e.get("decision", "-")),
                    ]
                    for e in view.registry
                ],
            )
        )
    return page


# --- layouts --------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;max-width:880px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left}
th{background:#f4f4f4}img{max-width:100%;display:block;margin:.6em 0}
.note{background:#fff4d6;border:1px solid #e0b040;padding:.6em}
"""


def to_html(page: Page) -> str:
    """One self-contained HTML file: no script, no external request; pictures as data URIs."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(page.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(page.title)}</h1>",
    ]
    for b in page.blocks:
        if isinstance(b, Heading):
            out.append(f"<h2>{esc(b.text)}</h2>")
        elif isinstance(b, Para):
            cls = f' class="{b.kind}"' if b.kind else ""
            out.append(f"<p{cls}>{esc(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.header) if any(b.header) else ""
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in b.rows
            )
            out.append(f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>")
        elif isinstance(b, Picture):
            data = base64.b64encode(b.png).decode()
            out.append(
                f'<img id="{esc(b.name)}" alt="{esc(b.alt)}" src="data:image/png;base64,{data}">'
            )
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(page: Page, assets: str) -> tuple[str, dict[str, bytes]]:
    """The Markdown page and its pictures ({file name under ``assets``: PNG bytes})."""
    out = [f"# {page.title}", ""]
    files: dict[str, bytes] = {}
    for b in page.blocks:
        if isinstance(b, Heading):
            out += [f"## {b.text}", ""]
        elif isinstance(b, Para):
            out += [f"> **{b.text}**" if b.kind else b.text, ""]
        elif isinstance(b, Table):
            header = b.header if any(b.header) else [" "] * len(b.header)
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Picture):
            files[f"{b.name}.png"] = b.png
            out += [f"![{b.alt}]({assets}/{b.name}.png)", ""]
    return "\n".join(out), files
