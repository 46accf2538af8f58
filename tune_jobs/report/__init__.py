"""The run report: ``report.html`` (one self-contained file: pictures inline, no script, no
network) and ``report.md`` (pictures in ``report_files/``), from the run folder alone.

    collect      the run folder read back (``RunView``): spec, summary, every report,
                 PBT lineage, failures, a retrain's decision and the registry's history
    plots        matplotlib pictures: learning curves, the LR used, the loss gap, the
                 searched keys against the metric, parallel coordinates, importance, the
                 PBT lineage and mutations, promotions
    importance   Optuna's fANOVA over the finished trials, saying how many it rests on
    page         what the report says, as blocks, and its HTML and Markdown layouts
    card         the model card (``best_model/README.md``) written with the export

``tunefleet report RUN_DIR`` writes it, and so do ``run``, ``resume`` and ``retrain`` at
their end. It reads only files, so a sweep still running gives a partial report that
says so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from cluster import storage
from tune_jobs.report.collect import RunView, read_run
from tune_jobs.report.page import build_page, to_html, to_markdown

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
REPORT_ASSETS = "report_files"


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written, and the run as it was read."""

    html: str
    markdown: str
    view: RunView


def write_report(run_dir: str, out_dir: str | None = None) -> ReportFiles:
    """Read the run in ``run_dir`` and write its report into ``out_dir`` (default: the run
    folder itself, local or a URI). The pictures go first and the HTML last, each file
    whole: a reader sees the old report or the new one."""
    view = read_run(run_dir)
    dest = storage.normalize(out_dir) if out_dir else view.run_dir
    page = build_page(view)
    markdown, files = to_markdown(page, REPORT_ASSETS)
    work = tempfile.mkdtemp(prefix="tunefleet-report-")
    try:
        assets = os.path.join(work, REPORT_ASSETS)
        os.makedirs(assets)
        for name, data in files.items():
            with open(os.path.join(assets, name), "wb") as fh:
                fh.write(data)
        storage.replace_dir(assets, storage.join(dest, REPORT_ASSETS))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md_path = storage.join(dest, REPORT_MD)
    html_path = storage.join(dest, REPORT_HTML)
    storage.write_text(md_path, markdown)
    storage.write_text(html_path, to_html(page))
    return ReportFiles(html_path, md_path, view)


def report_or_say(
    run_dir: str, echo: Callable[[str], None], say_where: bool = True
) -> ReportFiles | None:
    """``write_report`` at the end of a run, saying where it went (unless the caller says
    it); a report that cannot be written is said and does not fail the run (its results
    are already in place)."""
    try:
        files = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's own results stand without it
        echo(f"report: not written ({type(exc).__name__}: {exc}); try tunefleet report {run_dir}")
        return None
    if say_where:
        echo(f"report: {files.html}")
    return files


__all__ = [
    "REPORT_HTML",
    "REPORT_MD",
    "ReportFiles",
    "RunView",
    "read_run",
    "report_or_say",
    "write_report",
]
