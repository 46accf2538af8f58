"""Human-readable output: the leaderboard printed at the end of a run."""

from __future__ import annotations

from typing import Any

from trainers import metrics as M


def fmt(value: Any) -> str:
    """A number short enough for a table cell: 4 decimals, or 3 significant digits when
    very small or large."""
    if isinstance(value, float):
        return (
            f"{value:.3g}"
            if abs(value) < 1e-2 or abs(value) >= 1e4
            else f"{value:.4f}".rstrip("0").rstrip(".")
        )
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Plain-text columns: the header, a rule, one line per row."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def registry_table(champion: dict[str, Any] | None, history: list[dict[str, Any]]) -> str:
    """The retrain registry: the champion, then every retrain (and rollback), oldest first.

    Both scores are accuracies on the promotion rows of that retrain's day, the
    champion re-scored with that day's code."""
    head = (
        f"champion: {champion['run']} {champion.get('trial', '')} ({champion.get('export_dir', '-')})"
        if champion
        else "champion: none yet"
    )
    header = [
        "#",
        "time (UTC)",
        "run",
        "data rows",
        "data sha256",
        "promotion rows",
        "challenger",
        "champion",
        "p",
        "decision",
        "reason",
    ]

    def score(side: str, e: dict[str, Any]) -> str:
        record = e.get(side) or {}
        value = record.get("promotion_accuracy")
        return "-" if value is None else f"{fmt(value)} ({record.get('run', '?')})"

    rows = [
        [
            e.get("retrain", "-"),
            e.get("time", "-"),
            e.get("run", "-"),
            (e.get("data") or {}).get("rows", "-"),
            str((e.get("data") or {}).get("sha256", "-"))[:12],
            (e.get("promotion") or {}).get("rows", "-"),
            score("challenger", e),
            score("champion", e),
            "-" if e.get("p_value") is None else f"{e['p_value']:.3g}",
            e.get("decision", "-"),
            e.get("reason", ""),
        ]
        for e in history
    ]
    return "\n".join([head, "", *table(header, rows)])


#: PBT exploits listed in the terminal; the report has them all.
EXPLOITS_SHOWN = 8


def leaderboard(summary: dict[str, Any]) -> str:
    """Every trial, best first, in 80 columns (the configs are in the report; the best
    one's in the run's last lines), then the baseline and the export's scores."""
    from trainers.tasks import get_task

    metric, mode = summary["metric"], summary["mode"]
    task = get_task(summary.get("task") or "sequence_classification")
    columns = [c for c in task.columns if c != metric]

    def rank_key(t: dict[str, Any]) -> tuple[bool, float]:  # a sample's score after all rows'
        return M.screened(t["best"]), M.rank(t["best"].get(metric), mode)

    def shown(best: dict[str, Any], key: str) -> str:
        return fmt(best.get(key, "-")) + ("*" if M.screened(best) else "")

    header = ["trial", metric, *columns, "steps", "status"]
    rows = []
    sampled = sorted(
        {t["best"].get(M.EVAL_ROWS) for t in summary["trials"] if M.screened(t["best"])}
    )
    for t in sorted(summary["trials"], key=rank_key):
        best, last = t["best"], t["last"]
        steps = f"{last.get(M.STEP, '-')}/{last.get(M.TOTAL_STEPS, '-')}"
        is_defaults = (summary.get("defaults_trial") or {}).get("trial") == t["trial"]
        status = {"TERMINATED": "done", "ERROR": "failed"}.get(t["status"], t["status"].lower())
        rows.append(
            [
                t["trial"] + (" (defaults)" if is_defaults else ""),
                shown(best, metric),
                *(shown(best, c) for c in columns),
                steps,
                "stopped early" if t["stopped_early"] else status,
            ]
        )
    out = table(header, rows)
    if sampled:
        rows_of = summary.get("data", {}).get("validation")
        out.append(
            f"* on a sample of {', '.join(map(str, sampled))}"
            + (f" of the {rows_of}" if rows_of else "")
            + " validation rows: the rung the trial stopped at (scheduler.rung_rows)"
        )
    base = summary["majority_baseline"]["validation_accuracy"]
    out.append("")
    kind = "answer" if task.NAME == "causal_lm" else "class"
    if base is not None and base == base:  # not NaN: free-text responses have none
        out.append(f"majority-{kind} baseline (validation accuracy): {base:.4f}")
    zero_shot = summary.get("zero_shot")
    if zero_shot:
        out.append(
            "untuned base model (zero-shot, validation): "
            + ", ".join(f"{k} {fmt(v)}" for k, v in zero_shot.items())
        )
    exploits = summary.get("exploits") or []
    if exploits:
        out.append(f"PBT exploits ({len(exploits)}):")
        for e in exploits[:EXPLOITS_SHOWN]:
            changes = ", ".join(f"{k}={fmt(v)}" for k, v in e["mutated"].items()) or "no change"
            at = (
                f"step {e['step']}"
                if e.get("step") is not None
                else f"iteration {e['donor_iteration']}"
            )
            out.append(f"  {e['recipient']} <- {e['donor']} ({at}): {changes}")
        if len(exploits) > EXPLOITS_SHOWN:
            out.append(f"  ... and {len(exploits) - EXPLOITS_SHOWN} more (the report has them all)")
        sizes = summary.get("checkpoints") or {}
        if sizes.get("mb") is not None:
            out.append(
                f"checkpoints ({sizes['weights']} weights): {sizes['mb']:.1f} MiB each (median)"
            )
    versus = summary.get("best_vs_defaults")
    if versus:
        note = " (the defaults trial was stopped early)" if versus["defaults_stopped_early"] else ""
        if versus.get("defaults_rows"):
            note = f" (the defaults trial was stopped early, on {versus['defaults_rows']} validation rows)"
        out.append(
            f"best vs the family defaults: {metric} {fmt(versus['best'])} vs {fmt(versus['defaults'])} "
            f"({versus['improvement']:+.4f}){note}"
        )
    best = summary.get("best")
    if best:

        def said(scored: dict[str, Any]) -> str:
            return ", ".join(f"{k} {fmt(scored[k])}" for k in task.scores if k in scored)

        # every score below is the exported model's: named by its own trial
        exported = best.get("exported_trial") or best["trial"]
        if exported != best["trial"]:
            reported = (best.get("exported_metrics") or {}).get(metric)
            out.append(
                f"exported instead: {exported}'s checkpoint ({metric}={fmt(reported)}); "
                f"{best['trial']}'s best was never written"
            )
        if best.get("reloaded_validation"):
            out.append(
                f"exported model ({exported}) reloaded: validation "
                f"{said(best['reloaded_validation'])}"
            )
        if best.get("adapter_validation"):
            out.append(
                f"adapter ({exported}) reloaded on its base: validation "
                f"{said(best['adapter_validation'])}"
            )
        if best.get("test"):
            out.append(f"test (exported model, {exported}, scored once): {said(best['test'])}")
        generated = best.get("generated_test")
        if generated:
            out.append(
                f"greedy answers on {generated['rows']} test rows: exact match "
                f"{generated['exact_match']:.4f} (answers seen: {', '.join(generated['answers'])})"
            )
    return "\n".join(out)
