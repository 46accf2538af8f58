"""The live console (``tune_jobs.console``): event lines, the live view at 80 columns, plain
lines without control codes, the time left, the three lines at the end, and Ray's output
moved into the run folder's log at the file-descriptor level (in a real subprocess)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap

import pytest
from ray.tune.experiment import Trial

from tests.conftest import REPO
from tune_jobs import console
from tune_jobs.console import Output, SweepConsole, TrialView, ending, standard_error, time_left

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
SEARCHED = ["learning_rate", "per_device_train_batch_size", "lr_scheduler_type"]


def trial(n: int, **config) -> Trial:
    """A real Tune ``Trial`` (a stub: no trainable is registered)."""
    base = {"learning_rate": 3e-5, "per_device_train_batch_size": 16, "lr_scheduler_type": "linear"}
    return Trial("WarmTrial", config={**base, **config}, trial_id=f"abc_{n:05d}", stub=True)


def result(step: int, acc: float, total: int = 60, **extra) -> dict:
    return {"step": step, "total_steps": total, "eval_accuracy": acc, "eval_loss": 1 - acc, **extra}


def drive(out: Output, tmp_path) -> SweepConsole:
    """A sweep's events, as Tune would call them: 3 trials, one stopped early by ASHA, one
    exploited, one failing once and then for good (its own code, recorded)."""
    failures = tmp_path / "failures"
    failures.mkdir()
    (failures / "trial_00002.json").write_text(
        json.dumps({"trial": "trial_00002", "error": "Traceback...\nValueError: bad weights"})
    )
    con = SweepConsole(
        out,
        "eval_accuracy",
        "max",
        SEARCHED,
        planned=4,
        scheduler="asha",
        failures_dir=str(failures),
    )
    a, b, c = trial(0), trial(1, learning_rate=1e-4), trial(2)
    for t in (a, b, c):
        con.on_trial_start(0, [], t)
    con.on_trial_result(0, [], a, result(20, 0.70))
    con.on_trial_result(0, [], b, result(20, 0.74))
    con.on_trial_complete(0, [], b)  # 20 of 60 steps: stopped by the scheduler
    a.config = {**a.config, "learning_rate": 4.5e-5}  # PBT: exploited and mutated
    con.on_trial_result(0, [], a, result(40, 0.78))
    con.on_trial_result(0, [], a, result(60, 0.77))
    con.on_trial_complete(0, [], a)
    con.on_trial_error(0, [], c)
    con.close()
    return con


def test_a_screened_score_leads_nothing_and_is_said_to_be_a_samples(tmp_path):
    """Rung evaluations on a sample of the validation rows (``training.screen_rows``): the
    sample's 0.90 leads nothing (the full 0.75 leads the sweep) and is no trial's best
    once a full score is in; a trial stopped on a sample says so."""
    stream = io.StringIO()
    con = SweepConsole(
        Output(stream, live=False), "eval_accuracy", "max", SEARCHED, planned=2, scheduler="asha"
    )
    a, b = trial(0), trial(1)
    for t in (a, b):
        con.on_trial_start(0, [], t)
    sample = {"screened": 1, "eval_rows": 256}
    con.on_trial_result(0, [], a, result(10, 0.60, **sample))
    con.on_trial_result(0, [], b, result(10, 0.90, **sample))
    con.on_trial_complete(0, [], b)  # stopped at the rung
    con.on_trial_result(0, [], a, result(30, 0.70, **sample))
    con.on_trial_result(0, [], a, result(60, 0.75))
    con.on_trial_complete(0, [], a)
    lines = [re.sub(r"^ *\d+:\d\d(:\d\d)?  ", "", x) for x in stream.getvalue().splitlines()]
    assert not any("leads" in x for x in lines)  # the first full score is no one's lead over
    assert (
        "trial_00001 stopped early at step 10/60 by ASHA: best eval_accuracy 0.9 at step 10 "
        "(on 256 validation rows)" in lines
    )
    assert any(
        x.startswith("trial_00000 finished (60 steps")
        and x.endswith("best eval_accuracy 0.75 at step 60")
        for x in lines
    ), lines
    assert con.best_line().startswith("best: trial_00000 eval_accuracy 0.75")


def test_plain_lines_name_each_event_once_without_control_codes(tmp_path):
    stream = io.StringIO()
    con = drive(Output(stream, live=False), tmp_path)
    text = stream.getvalue()
    assert "\x1b" not in text
    stamp = re.compile(r"^ *\d+:\d\d(:\d\d)?  ")  # the time since the sweep began
    assert all(stamp.match(line) for line in text.splitlines())
    lines = [stamp.sub("", line) for line in text.splitlines()]
    assert lines[:3] == [
        "trial_00000 started: lr 3e-05, batch 16, schedule linear",
        "trial_00001 started: lr 0.0001, batch 16, schedule linear",
        "trial_00002 started: lr 3e-05, batch 16, schedule linear",
    ]
    joined = "\n".join(lines)
    assert "trial_00001 leads at step 20: eval_accuracy 0.74" in joined
    assert (
        "trial_00001 stopped early at step 20/60 by ASHA: best eval_accuracy 0.74 at step 20"
        in joined
    )
    assert "trial_00000 exploited at step 40 (PBT): learning_rate 3e-05 -> 4.5e-05" in joined
    assert "trial_00000 leads at step 40: eval_accuracy 0.78" in joined
    assert (
        "trial_00000 finished (60 steps" in joined
        and "best eval_accuracy 0.78 at step 40" in joined
    )
    assert (
        "trial_00002 failed, not retried: its own code failed before: ValueError: bad weights"
        in joined
    )
    assert len(lines) == 9  # one line per event; an evaluation that leads nothing says nothing
    assert con.counts() == {"done": 1, "stopped early": 1, "failed": 1}
    assert con.best_line().startswith("best: trial_00000 eval_accuracy 0.78 (lr 4.5e-05")


def test_the_live_view_fits_80_columns_and_shows_progress(tmp_path):
    stream = io.StringIO()
    out = Output(stream, live=True)
    con = SweepConsole(out, "eval_accuracy", "max", SEARCHED, planned=8, scheduler="asha")
    long = trial(0, lr_scheduler_type="cosine_with_restarts", learning_rate=1.23456e-5)
    con.on_trial_start(0, [], long)
    con.on_trial_result(0, [], long, result(30, 0.7123456))
    con.trials["trial_00000"].step = 45  # as the board would say between evaluations
    rendered = io.StringIO()
    from rich.console import Console

    Console(file=rendered, width=80, force_terminal=True).print(con._view())
    con.close()
    view = ANSI.sub("", rendered.getvalue()).splitlines()
    assert view[0].startswith("0/8 trials ended, 1 running, elapsed ")
    assert "left" in view[0]
    assert view[1].startswith("best: trial_00000 eval_accuracy 0.7123")
    assert "trial_00000" in view[2] and "45/60 steps" in view[2] and "━" in view[2]
    assert all(len(line) <= 80 for line in view), view
    printed = ANSI.sub("", stream.getvalue())
    assert all(len(line) <= 80 for line in printed.splitlines()), printed
    assert "trial_00000 started: lr 1.23e-05" in printed


def test_the_time_left_is_the_remaining_steps_at_the_pace_so_far():
    running = TrialView("trial_00000", {}, step=30, total=60, first_step=0)
    done = TrialView("trial_00001", {}, state="done", step=60, total=60, first_step=0)
    # 90 steps in 90 s; 30 left in the running trial, 2 unstarted trials of 60 each
    assert time_left([running, done], planned=4, elapsed=90.0) == pytest.approx(150.0)
    # a resumed trial's steps before this process do not count toward the pace
    resumed = TrialView("trial_00002", {}, step=50, total=60, first_step=40)
    assert time_left([resumed], planned=1, elapsed=10.0) == pytest.approx(10.0)
    assert time_left([TrialView("t", {})], planned=2, elapsed=5.0) is None


SUMMARY = {
    "metric": "eval_accuracy",
    "run_dir": "/runs/r",
    "data": {"validation": 600},
    "majority_baseline": {"validation_accuracy": 0.5},
    "best_vs_defaults": {"best": 0.78, "defaults": 0.75, "improvement": 0.03},
    "best": {
        "trial": "trial_00003",
        "config": {"learning_rate": 4e-5, "per_device_train_batch_size": 16},
        "metrics": {"eval_accuracy": 0.78},
        "test": {"eval_accuracy": 0.771},
        "export_dir": "/runs/r/best_model",
    },
}


def test_the_end_says_what_was_found_how_sure_and_where_to_look():
    found, sure, look = ending(SUMMARY, "/runs/r/report.html")
    assert found == (
        "found: trial_00003, eval_accuracy 0.78 (test eval_accuracy 0.771) with lr 4e-05, batch 16"
    )
    se = standard_error(0.78, 600) * 100  # 1.69 points
    assert sure == (
        "how sure: +3.0 points over the family defaults (eval_accuracy 0.75); eval_accuracy "
        f"0.78 vs 0.5 for the majority class (+28.0 points); one standard error on 600 "
        f"validation rows: {se:.1f} points"
    )
    # searched by the loss: the baseline is compared with the exported model's accuracy
    by_loss = {
        **SUMMARY,
        "metric": "eval_loss",
        "best_vs_defaults": None,
        "best": {
            **SUMMARY["best"],
            "metrics": {"eval_loss": 0.61},
            "reloaded_validation": {"eval_accuracy": 0.685},
        },
    }
    assert ending(by_loss, None)[1] == (
        "how sure: eval_accuracy 0.685 vs 0.5 for the majority class (+18.5 points); one "
        f"standard error on 600 validation rows: {standard_error(0.685, 600) * 100:.1f} points"
    )
    assert look == "look: report /runs/r/report.html; model /runs/r/best_model"
    nothing = ending({**SUMMARY, "best": None, "failed_trials": {"trial_00000": "x"}}, None)
    assert nothing[0] == "found: no trial finished (1 failed)" and len(nothing) == 3


def test_a_console_pickles_to_nothing_for_tunes_saved_state():
    import pickle

    con = SweepConsole(Output(io.StringIO()), "eval_accuracy", "max", SEARCHED, 2, "asha")
    assert isinstance(pickle.loads(pickle.dumps(con)), console.NotCarried)


DRIVER = textwrap.dedent(
    """
    import os, subprocess, sys
    from tune_jobs import console
    with console.session() as out:
        print("noise before the run folder")
        out.echo("said: data")
        out.attach(sys.argv[1])
        os.write(2, b"core_worker.cc: noise from C++\\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"])
        out.echo("said: done")
    print("after the session")
    """
)


def test_rays_output_goes_to_the_run_folders_log_and_tunefleets_to_the_terminal(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    log = run_dir / "logs" / "driver.log"
    assert proc.stdout.splitlines() == [
        "said: data",
        f"Ray's own output: {log}",
        "said: done",
        "after the session",
    ]
    assert proc.stderr == ""
    assert log.read_text().splitlines() == [
        "noise before the run folder",
        "core_worker.cc: noise from C++",
        "a child process",
    ]


def test_the_leaderboard_marks_a_samples_score_and_ranks_it_after_every_rows():
    """A trial stopped at a screened rung: its 0.90 (on 256 rows) is starred, explained,
    and ranked after the 0.75 scored on all 1,000 rows; the defaults' comparison says it."""
    from tune_jobs.tables import leaderboard

    def trial(name: str, acc: float, step: int, **best) -> dict:
        scores = {"eval_accuracy": acc, "eval_f1": acc, "step": step, "total_steps": 60, **best}
        return {
            "trial": name,
            "status": "TERMINATED",
            "best": scores,
            "last": scores,
            "stopped_early": step < 60,
        }

    sample = {"screened": 1, "eval_rows": 256}
    summary = {
        "metric": "eval_accuracy",
        "mode": "max",
        "trials": [trial("trial_00000", 0.90, 7, **sample), trial("trial_00001", 0.75, 60)],
        "majority_baseline": {"validation_accuracy": 0.59},
        "data": {"validation": 1000},
        "defaults_trial": {"trial": "trial_00000"},
        "best_vs_defaults": {
            "best": 0.75,
            "defaults": 0.90,
            "improvement": -0.15,
            "defaults_stopped_early": True,
            "defaults_rows": 256,
        },
    }
    lines = leaderboard(summary)
    lines = lines.splitlines() if isinstance(lines, str) else lines
    ranked = [x.split()[0] for x in lines if x.startswith("trial_")]
    assert ranked == ["trial_00001", "trial_00000"]
    assert any(x.startswith("trial_00000 (defaults)") and "0.9*" in x for x in lines)
    assert (
        "* on a sample of 256 of the 1000 validation rows: the rung the trial stopped at "
        "(scheduler.rung_rows)" in lines
    )
    assert any("stopped early, on 256 validation rows" in x for x in lines)
