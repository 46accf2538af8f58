"""What a person sees while a sweep runs, and where Ray's own output goes instead.

``session`` (the CLI's ``run``, ``resume``, ``retrain`` and ``smoke``) moves the
process's stdout and stderr, at the file-descriptor level, into a log file: Tune's
tables, Ray's core-worker errors, every worker's and actor's forwarded prints, and
whatever a library writes. The file is ``<run folder>/logs/driver.log`` once the run
folder is known (``attach``; uploaded at the end when the folder is in a bucket).
What tunefleet says goes to the terminal saved before the move:

- on a terminal, a live view (rich) under the event lines: trials running, done,
  stopped early and failed, the best so far with its config, the sweep's progress with
  an estimate of the time left, and a progress bar per running trial (single-process
  trials report their step between evaluations through the sweep's ``ExportLeader``);
- elsewhere (CI, ``ray job logs``, a Kubernetes pod's log), the same event lines, plain,
  with a status line every few minutes: no control codes.

``--verbose`` leaves the output alone and gives Tune its own reporter back.
The end of a run (``ending``) says in three lines what was found, how sure it is,
and where to look.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray import tune

from cluster import storage
from trainers import metrics as M
from tune_jobs import layout
from tune_jobs.tables import fmt

#: Console width the lines are written for (a wider terminal shows them as they are).
WIDTH = 80
#: How often the live view redraws, and how often a plain status line is written (s).
REFRESH_PER_S = 2
PLAIN_STATUS_EVERY_S = 180.0
#: How often the driver asks the trials for their step between evaluations (s).
POLL_EVERY_S = 1.0


class DriverLog:
    """This process's stdout and stderr, moved into a file (their descriptors, so Ray's
    C++ logs and subprocesses started from here land there too). ``terminal`` is the
    stream the user still sees. Until a run folder is known the file is a temporary one;
    ``attach`` moves the log into each run folder in turn (a smoke pass's, then the
    sweep's)."""

    def __init__(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.terminal: TextIO = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        self.path = self._temp()  # the file fds 1 and 2 write to now
        self.target: str | None = None  # where this part of the log belongs (a run folder's)
        self._point_at(self.path)

    @staticmethod
    def _temp() -> str:
        fd, path = tempfile.mkstemp(prefix="tunefleet-driver-", suffix=".log")
        os.close(fd)
        return path

    def _point_at(self, path: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def _finish(self) -> str:
        """Put the part written since the last ``attach`` where it belongs; its place."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.target is None or not storage.is_uri(self.target):
            return self.path  # a local run folder's file, or (no run yet) the temporary one
        with contextlib.suppress(Exception):  # the log is a courtesy, never the run's end
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if storage.exists(self.target):  # a resumed run's log goes on after the first's
                text = storage.read_text(self.target) + text
            storage.write_text(self.target, text)
            os.unlink(self.path)
            return self.target
        return self.path

    def attach(self, run_dir: str) -> str:
        """From now on the log belongs to ``run_dir`` (``logs/driver.log``): a local folder
        gets the file itself; a bucket gets it at the next ``attach`` or at ``close``. What
        was written before any run folder was known goes to the first one."""

        before = self.path if self.target is None else None
        self._finish()
        self.target = layout.driver_log(run_dir)
        if storage.is_uri(self.target):
            self.path = self._temp()
        else:
            os.makedirs(os.path.dirname(self.target), exist_ok=True)
            self.path = self.target
        if before is not None:
            with open(before, "rb") as src, open(self.path, "ab") as dst:
                dst.write(src.read())
            os.unlink(before)
        self._point_at(self.path)
        if self.path == self.target:
            return self.target
        return f"{self.path} (copied to {self.target} at the end)"

    def close(self) -> str | None:
        """Give the terminal its descriptors back; where the log is (None: nothing was
        written before any run folder was known, and the empty file is gone)."""
        where: str | None = self._finish()
        if self.target is None and os.path.getsize(self.path) == 0:
            os.unlink(self.path)
            where = None
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self.terminal.flush()
        self.terminal.close()
        return where


@dataclass
class Output:
    """Where tunefleet's own lines go during a command."""

    stream: TextIO
    live: bool = False  # a terminal: the live view; otherwise plain lines
    verbose: bool = False  # Tune's own reporter, Ray's output left in place
    log: DriverLog | None = None

    def echo(self, line: str = "") -> None:
        print(line, file=self.stream, flush=True)

    def attach(self, run_dir: str) -> None:
        """A run folder is known: the driver log moves there, and says so."""
        if self.log is not None:
            self.echo(f"Ray's own output: {self.log.attach(run_dir)}")


_ACTIVE: Output | None = None


def active() -> Output:
    """The command's output (``session``), or plain lines on stdout outside one."""
    return _ACTIVE or Output(sys.stdout)


def is_terminal(stream: TextIO) -> bool:
    return stream.isatty() and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def session(verbose: bool = False) -> Iterator[Output]:
    """The output of one ``run``/``resume``/``retrain``/``smoke``: see the module's text."""
    global _ACTIVE
    if verbose:
        out = Output(sys.stdout, live=False, verbose=True)
    else:
        log = DriverLog()
        out = Output(log.terminal, live=is_terminal(log.terminal), log=log)
    _ACTIVE = out
    try:
        yield out
    finally:
        _ACTIVE = None
        if out.log is not None:
            where = out.log.close()
            if where and sys.exc_info()[0] is not None:  # failing: say where the details are
                print(f"Ray's own output: {where}", file=sys.stderr)


# --- the sweep as it runs --------------------------------------------------------------


@dataclass
class TrialView:
    """What the console knows of one trial."""

    name: str
    config: dict[str, Any]
    state: str = "running"  # running | done | stopped early | failed | retrying
    step: int = 0
    total: int | None = None
    best: float | None = None
    best_step: int | None = None
    best_rows: int | None = None  # a screened best's sample size (None: every row)
    started: float = field(default_factory=time.monotonic)
    first_step: int | None = None  # where this process first saw it (a resume starts later)
    early_stopped: bool = False  # its own patience stopped it (the last report says)


def time_left(trials: list[TrialView], planned: int, elapsed: float) -> float | None:
    """Seconds until every planned trial has spent its steps, at the sweep's pace so far
    (steps trained since this process started, per second). An upper bound where a
    scheduler stops trials early. None until a step has been seen."""
    done = sum(t.step - (t.first_step or 0) for t in trials)
    if done <= 0 or elapsed <= 0:
        return None
    totals = [t.total for t in trials if t.total]
    mean_total = sum(totals) / len(totals) if totals else 0
    remaining = sum(
        max((t.total or mean_total) - t.step, 0) for t in trials if t.state == "running"
    )
    remaining += max(planned - len(trials), 0) * mean_total
    return remaining / (done / elapsed)


def clock(seconds: float) -> str:
    """``1:05:09`` / ``4:09``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def short_config(config: dict[str, Any], keys: list[str]) -> str:
    """The searched keys of a config, compact (``lr 3e-05, batch 16``)."""
    names = {
        "learning_rate": "lr",
        "per_device_train_batch_size": "batch",
        "num_train_epochs": "epochs",
        "weight_decay": "wd",
        "warmup_ratio": "warmup",
        "lr_scheduler_type": "schedule",
        "unfreeze_depth": "unfreeze",
        "hidden_dropout": "dropout",
    }
    return ", ".join(
        f"{names.get(k.split('.')[-1], k.split('.')[-1])} {fmt(config[k])}"
        for k in keys
        if k in config
    )


class NotCarried(tune.Callback):
    """What a ``DriverCallback`` pickles to in Tune's saved state: nothing."""


class DriverCallback(tune.Callback):
    """A Tune callback that holds this driver's own things (a terminal, an MLflow client).
    Tune pickles the run's callbacks into ``tuner.pkl``; this kind pickles to
    ``NotCarried``, and a resumed run hands in its own (``tune_jobs.run.build_tuner``)."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (NotCarried, ())


class SweepConsole(DriverCallback):
    """The live console: one line per trial event, and a live view on a terminal."""

    def __init__(
        self,
        out: Output,
        metric: str,
        mode: str,
        searched: list[str],
        planned: int,
        scheduler: str,
        board: Any = None,
        failures_dir: str | None = None,
    ) -> None:
        self.out = out
        self.metric, self.mode = metric, mode
        self.searched = searched
        self.planned = planned
        self.scheduler = scheduler
        self.board = board  # ExportLeader: single-process trials' steps between evaluations
        self.failures_dir = failures_dir  # tune_jobs.faults: trials whose own code failed
        self.budget: Any = None  # tune_jobs.budget.Budget: which trials it stopped
        self.trials: dict[str, TrialView] = {}
        self.best: tuple[float, str, dict[str, Any]] | None = None
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self._poll: Any = None
        self._polled = 0.0
        self._plain_status = time.monotonic()
        self._live: Any = None
        self._console: Any = None
        if out.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(
                file=out.stream, width=min(WIDTH, _columns(out.stream)), force_terminal=True
            )
            self._live = Live(
                get_renderable=self._view,
                console=self._console,
                refresh_per_second=REFRESH_PER_S,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    # -- lines ----------------------------------------------------------------------

    def say(self, line: str) -> None:
        stamped = f"{clock(time.monotonic() - self.started):>7}  {line}"
        if self._console is not None:
            self._console.print(stamped, markup=False, highlight=False, overflow="fold")
        else:
            self.out.echo(stamped)

    def _view_of(self, trial: Any) -> TrialView:
        name = layout.trial_name(trial)
        if name not in self.trials:
            self.trials[name] = TrialView(name, dict(trial.config))
        return self.trials[name]

    # -- Tune's callbacks (the driver's thread) ---------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self.lock:
            view = self._view_of(trial)
            view.state = "running"
        self.say(f"{view.name} started: {short_config(view.config, self.searched)}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        with self.lock:
            view = self._view_of(trial)
            lines = []
            step = int(result.get(M.STEP) or 0)
            if view.first_step is None:
                restored = int(result.get(M.RESTORED_FROM_STEP, -1) or -1)
                view.first_step = max(restored, 0)
            config = dict(trial.config)
            changed = {
                k: (view.config.get(k), config[k])
                for k in self.searched
                if k in config and view.config.get(k) != config[k]
            }
            if changed:  # PBT: the trial took a better trial's weights and mutated
                lines.append(
                    f"{view.name} exploited at step {step} (PBT): "
                    + ", ".join(
                        f"{k.split('.')[-1]} {fmt(a)} -> {fmt(b)}" for k, (a, b) in changed.items()
                    )
                )
                view.config = config
            view.step, view.total = step, result.get(M.TOTAL_STEPS) or view.total
            view.early_stopped = bool(result.get(M.EARLY_STOPPED))
            value = result.get(self.metric)
            screened = M.screened(result)
            mine = (
                None if view.best is None else {self.metric: view.best, M.SCREENED: view.best_rows}
            )
            if M.beats(result, mine, self.metric, self.mode):
                view.best, view.best_step = value, step
                view.best_rows = result.get(M.EVAL_ROWS) if screened else None
            if not screened and M.better(  # a sample's score leads nothing
                value, self.best[0] if self.best else None, self.mode
            ):
                first = self.best is None
                self.best = (value, view.name, config)
                if not first:
                    lines.append(f"{view.name} leads at step {step}: {self.metric} {fmt(value)}")
        for line in lines:
            self.say(line)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self.lock:
            view = self._view_of(trial)
            took = clock(time.monotonic() - view.started)
            best = f"best {self.metric} {fmt(view.best)} at step {view.best_step}" + (
                f" (on {view.best_rows} validation rows)" if view.best_rows else ""
            )
            if self.budget is not None and view.name in self.budget.stopped:
                line = self._stopped_by_budget(view)
            elif view.early_stopped:
                view.state = "stopped early"
                line = f"{view.name} stopped early at step {view.step} (no better for patience): {best}"
            elif view.total and view.step < view.total:
                view.state = "stopped early"
                line = f"{view.name} stopped early at step {view.step}/{view.total} by {self.scheduler.upper()}: {best}"
            else:
                view.state = "done"
                line = f"{view.name} finished ({view.step} steps, {took}): {best}"
        self.say(line)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self.lock:
            view = self._view_of(trial)
            view.state = "retrying"
        self.say(
            f"{view.name} failed (failure {trial.num_failures}), restarting from its last "
            f"checkpoint: {_cause(trial)}"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from tune_jobs import faults

        with self.lock:
            view = self._view_of(trial)
            view.state = "failed"
        recorded = faults.recorded(self.failures_dir, view.name)
        if recorded:
            cause = recorded["error"].strip().splitlines()[-1][:300]
            self.say(f"{view.name} failed, not retried: its own code failed before: {cause}")
        else:
            self.say(f"{view.name} failed: {_cause(trial)}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        self._read_board(now)
        if self._live is None and now - self._plain_status >= PLAIN_STATUS_EVERY_S:
            self._plain_status = now
            with self.lock:
                self.say(self.status_line())

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # a sweep ended by its budget: Tune says nothing more of the trials it stopped
        for name in self.budget.stopped if self.budget is not None else []:
            view = self.trials.get(name)
            if view is not None and view.state == "running":
                self.say(self._stopped_by_budget(view))
        self.close()

    def _stopped_by_budget(self, view: TrialView) -> str:
        view.state = "stopped early"
        best = f"best {self.metric} {fmt(view.best)} at step {view.best_step}"
        return f"{view.name} stopped at the budget's limit at step {view.step}: {best}"

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # -- the trials' steps between evaluations -----------------------------------------

    def _read_board(self, now: float) -> None:
        if self.board is None or self._live is None:
            return
        import ray

        if self._poll is not None:
            ready, _ = ray.wait([self._poll], timeout=0)
            if not ready:
                return
            with contextlib.suppress(Exception):
                steps = ray.get(self._poll)
                with self.lock:
                    for name, (step, total) in steps.items():
                        view = self.trials.get(name)
                        if view is not None and view.state == "running" and step > view.step:
                            view.step, view.total = step, total
            self._poll = None
        if now - self._polled >= POLL_EVERY_S:
            self._polled = now
            self._poll = self.board.steps.remote()

    # -- the live view --------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.trials.values():
            counts[t.state] = counts.get(t.state, 0) + 1
        return counts

    def status_line(self) -> str:
        c = self.counts()
        elapsed = time.monotonic() - self.started
        left = time_left(list(self.trials.values()), self.planned, elapsed)
        ended = c.get("done", 0) + c.get("stopped early", 0) + c.get("failed", 0)
        parts = [
            f"{ended}/{self.planned} trials ended",
            f"{c.get('running', 0) + c.get('retrying', 0)} running",
        ]
        for state in ("stopped early", "failed"):
            if c.get(state):
                parts.append(f"{c[state]} {state}")
        parts.append(f"elapsed {clock(elapsed)}")
        if left is not None:
            parts.append(f"{'at most ' if self.scheduler != 'fifo' else ''}~{clock(left)} left")
        return ", ".join(parts)

    def best_line(self) -> str:
        if self.best is None:
            return "best: none yet"
        value, name, config = self.best
        return f"best: {name} {self.metric} {fmt(value)} ({short_config(config, self.searched)})"

    def _view(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self.lock:
            rows = Table.grid(padding=(0, 1))
            rows.add_column(no_wrap=True)
            rows.add_column(width=30)
            rows.add_column(no_wrap=True)
            for t in self.trials.values():
                if t.state not in ("running", "retrying"):
                    continue
                total = t.total or 0
                rows.add_row(
                    t.name,
                    ProgressBar(total=max(total, 1), completed=min(t.step, total), width=30),
                    f"{t.step}/{total or '?'} steps"
                    + (f"  {fmt(t.best)}" if t.best is not None else "")
                    + ("  (retrying)" if t.state == "retrying" else ""),
                )
            return Group(
                Text(self.status_line(), no_wrap=True, overflow="ellipsis"),
                Text(self.best_line(), no_wrap=True, overflow="ellipsis"),
                rows,
            )


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return WIDTH


def _cause(trial: Any) -> str:
    """The last line of a failed trial's traceback (the exception), short."""
    with contextlib.suppress(Exception):
        error = trial.get_error()
        if error is not None:
            text = str(error).strip().splitlines()
            lines = [line for line in text if line.strip() and not line.startswith(" ")]
            return (lines[-1] if lines else text[-1])[:300]
    return "see the driver log"


# --- the end of a run ------------------------------------------------------------------


def standard_error(accuracy: float, rows: int) -> float:
    """One standard error of an accuracy measured on ``rows`` rows."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / rows) if rows else float("nan")


def _accuracy_of(metric: str, best: dict[str, Any]) -> tuple[str, float | None]:
    """The validation accuracy the baseline compares with: the searched metric when it is
    one, else the exported model's (re-scored) or the best report's."""
    if "accuracy" in metric:
        return metric, best["metrics"].get(metric)
    for scores in (best.get("reloaded_validation") or {}, best["metrics"]):
        for key, value in scores.items():
            if "accuracy" in key and isinstance(value, int | float):
                return key, value
    return metric, None


def ending(summary: dict[str, Any], report: str | None) -> list[str]:
    """Three lines: what was found, how sure it is, where to look."""
    metric = summary["metric"]
    best = summary.get("best")
    if not best:
        failed = len(summary.get("failed_trials") or {})
        return [
            f"found: no trial finished ({failed} failed)",
            "how sure: -",
            f"look: {summary['run_dir']}/summary.json" + (f"; report {report}" if report else ""),
        ]
    value = best["metrics"].get(metric)
    trial = best.get("exported_trial") or best["trial"]
    test = best.get("test") or {}
    test_said = ", ".join(f"test {k} {fmt(v)}" for k, v in test.items() if "accuracy" in k)
    found = (
        f"found: {best['trial']}, {metric} {fmt(value)}"
        + (f" ({test_said})" if test_said else "")
        + f" with {short_config(best['config'], sorted(best['config']))}"
    )
    rows = summary["data"]["validation"]
    sure = []
    versus = summary.get("best_vs_defaults")
    if versus:
        gain = versus["improvement"]
        said = f"{gain * 100:+.1f} points" if "accuracy" in metric else f"{gain:+.4g}"
        on = f" on {versus['defaults_rows']} rows" if versus.get("defaults_rows") else ""
        sure.append(f"{said} over the family defaults ({metric} {fmt(versus['defaults'])}{on})")
    name, accuracy = _accuracy_of(metric, best)
    base = summary["majority_baseline"]["validation_accuracy"]
    if accuracy is not None and base is not None and base == base:
        sure.append(
            f"{name} {fmt(accuracy)} vs {fmt(base)} for the majority "
            f"{'answer' if 'answer' in name else 'class'} ({(accuracy - base) * 100:+.1f} points)"
        )
    noise = (
        f"one standard error on {rows} validation rows: "
        f"{standard_error(accuracy, rows) * 100:.1f} points"
        if accuracy is not None
        else f"{rows} validation rows"
    )
    sure.append(noise)
    look = [f"report {report}"] if report else []
    if best.get("export_dir"):
        look.append(
            f"model {best['export_dir']}" + ("" if trial == best["trial"] else f" ({trial}'s)")
        )
    if not report:
        look.append(f"summary {summary['run_dir']}/summary.json")
    return [
        found,
        "how sure: " + "; ".join(sure),
        "look: " + "; ".join(look),
    ]
