"""Population Based Training on a local Ray: real data, single-process trials, on a tiny
random BERT with MiniLM's tokenizer and six blocks (``tests/tiny_models.py``: what an exploit
does to steps, weights and schedules is the same on 0.4M parameters as on 22M; MiniLM's own
PBT runs are ``test_deepspeed_pbt.py`` and the LoRA one in ``test_llm.py``).

Checks what an exploit must do: the recipient continues from the donor's
checkpointed weights and step, with its own mutated hyperparameters, and Tune
attributes every metric to the right trial.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.browser import check_report
from tests.e2e.conftest import tunefleet
from tests.e2e.pbt_checks import (
    after_exploit,
    check_exploit,
    donor_report,
    exploits_of,
    run_population,
    trains_at_depth,
)
from tune_jobs.report_log import read_reports

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVERY = 4  # steps between evaluations (and checkpoints)
SPEC = {
    "model": {"max_length": 48},
    "data": {"max_train_samples": 128, "max_eval_samples": 64, "max_test_samples": 64},
    "training": {
        "max_steps": 24,
        "per_device_train_batch_size": 16,
        "eval_steps": EVERY,
        "warmup_ratio": 0.25,
    },
    "search": {
        "num_samples": 4,
        "start_with_defaults": False,
        "space": {"learning_rate": {"loguniform": [1.0e-5, 5.0e-4]}},
    },
    "scheduler": {
        "type": "pbt",
        "time_attr": "step",
        "perturbation_interval": 8,
        "quantile_fraction": 0.25,
        "resample_probability": 0.5,
        "synch": True,  # every interval, the worst trial clones the best: exploits are certain
        "mutations": {
            "learning_rate": {"loguniform": [1.0e-5, 5.0e-4]},
            "lr_scheduler_type": {"choice": ["linear", "cosine", "constant_with_warmup"]},
            "unfreeze_depth": {"choice": [1, 6]},
        },
    },
    "resources": {"trial_mode": "single_process", "cpus_per_worker": 1},
    "run": {"name": "pbt", "seed": 0, "fingerprint_weights": True},
}


@pytest.fixture(scope="module")
def pbt_run(tmp_path_factory, tiny_bert):
    spec = {**SPEC, "model": {**SPEC["model"], "name_or_path": tiny_bert}}
    return run_population(tmp_path_factory.mktemp("pbt"), spec, terminal=True)


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def test_the_live_console_draws_in_80_columns(pbt_run):
    """In a terminal: a live view (rich) with the sweep's status and a progress bar per
    running trial, redrawn in place; every line it draws, and every event line, fits in
    80 columns; each exploit has its event line."""
    _, summary, _, output = pbt_run
    assert "\x1b[" in output  # drawn, not printed
    lines = [line.split("\r")[-1] for line in ANSI.sub("", output).splitlines()]
    drawn = [
        line
        for line in lines
        if re.match(r" *\d+:\d\d  trial_", line)
        or "━" in line
        or "trials ended" in line
        or line.startswith("best: ")
    ]
    assert any("━" in line for line in drawn), "no progress bar"
    assert any(re.match(r"\d+/4 trials ended, \d+ running", line) for line in drawn)
    assert all(len(line) <= 80 for line in drawn), [x for x in drawn if len(x) > 80]
    exploited = [line for line in drawn if "exploited at step" in line]
    assert len(exploited) >= len(summary["exploits"]) > 0


def test_population_exploits(pbt_run):
    _, summary, rows, stdout = pbt_run
    assert summary["exploits"], "no exploit in a population of 4"
    assert "PBT exploits" in stdout
    for reports in rows.values():  # no report lost across synch PBT's pauses and restores
        assert [r["training_iteration"] for r in reports] == list(range(1, len(reports) + 1))


def test_recipient_continues_from_the_donors_weights_and_step(pbt_run):
    _, summary, rows, _ = pbt_run
    for exploit in exploits_of(summary):
        check_exploit(rows, exploit, last_step=24)


def test_mutated_schedule_and_depth_take_effect(pbt_run):
    from trainers.optim import lr_multiplier

    _, summary, rows, _ = pbt_run
    for exploit in exploits_of(summary):
        first = after_exploit(rows, exploit)
        config = exploit["new_config"]
        # the LR actually used follows the recipient's own schedule at the current step: no jump back to warmup
        expected = config["learning_rate"] * lr_multiplier(
            config["lr_scheduler_type"], first["step"], 24, 6
        )
        assert first["lr"] == pytest.approx(expected, rel=1e-6)
        assert first["unfreeze_depth"] == config["unfreeze_depth"]
        assert trains_at_depth(rows, first, config["unfreeze_depth"])


def test_exploits_are_logged_with_the_step_cloned(pbt_run):
    """lineage.json against evidence it was not computed from: the weights. The recipient's
    first report after the exploit carries the SHA-256 of the weights it restored; the
    logged donor must have reported exactly those weights at the logged step."""
    run_dir, summary, rows, _ = pbt_run
    logged = json.loads((run_dir / "lineage.json").read_text())
    assert logged
    for exploit in logged:
        first = after_exploit(rows, exploit)
        donor = donor_report(rows, exploit, first)  # matched by the weights' fingerprint
        assert donor["step"] == exploit["step"]
        assert donor["config"]["learning_rate"] == exploit["donor_config"]["learning_rate"]
        assert exploit["mutated"] and set(exploit["mutated"]) <= set(exploit["new_config"])


def test_lineage_picture_draws_every_exploit(pbt_run):
    import xml.etree.ElementTree as ET

    run_dir, summary, _, _ = pbt_run
    svg = ET.parse(run_dir / "lineage.svg").getroot()
    ids = [e.get("id", "") for e in svg.iter()]
    arrows = sorted(tuple(i.split(":")[1:]) for i in ids if i.startswith("exploit:"))
    assert arrows == sorted(
        (e["donor"], e["recipient"], str(e["step"])) for e in summary["exploits"]
    )
    lanes = {i.split(":", 1)[1] for i in ids if i.startswith("lane:")}
    assert lanes == {t["trial"] for t in summary["trials"]}


def test_the_report_draws_the_lineage_and_the_mutations(pbt_run, tmp_path_factory):
    run_dir, summary, _, _ = pbt_run
    shown = check_report(run_dir, tmp_path_factory, "pbt")
    assert {"curves", "lr", "lineage", "mutations"} <= shown["ids"]
    assert f"PBT: {len(summary['exploits'])} exploit(s)" in shown["text"]


def test_pbt_checkpoints_hold_the_trained_delta_and_report_their_size(pbt_run):
    run_dir, summary, rows, _ = pbt_run
    assert summary["checkpoints"]["weights"] == "trained"
    assert summary["checkpoints"]["mb"] > 0
    sizes = {r["unfreeze_depth"]: r["checkpoint_mb"] for trial in rows.values() for r in trial}
    assert all(v > 0 for v in sizes.values())
    # the exported model is a full folder all the same (rebuilt from the base model + delta)
    assert (run_dir / "best_model" / "model.safetensors").exists()


def test_replay_reproduces_the_trials_schedule_and_weights(pbt_run):
    """Replay of the most recently exploited trial (the longest lineage): from scratch, with
    the lineage's hyperparameters switching at the steps cloned, it lands on the same weights."""
    run_dir, summary, rows, _ = pbt_run
    trial = summary["exploits"][-1]["recipient"]
    proc = tunefleet("replay", str(run_dir), trial)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    replay_dir = run_dir.parent / f"pbt-replay-{trial}"
    segments = json.loads((replay_dir / "replay_schedule.json").read_text())["segments"]
    assert len(segments) >= 2
    # every switch of the schedule is an exploit of the run, at the step its recipient restored
    logged = [(e["recipient"], e["step"], e["new_config"]) for e in summary["exploits"]]
    for seg in segments[1:]:
        assert (seg["trained_by"], seg["from_step"], seg["config"]) in logged
    assert segments[-1]["config"] == rows[trial][-1]["config"]

    replay_rows = read_reports(str(replay_dir), "trial_00000")
    assert [r["hp_segment"] for r in replay_rows] == sorted(r["hp_segment"] for r in replay_rows)
    assert replay_rows[-1]["hp_segment"] == len(segments) - 1
    # at every report the replay is where the lineage was: same LR, depth and weights
    for r in replay_rows:
        seg = segments[r["hp_segment"]]
        original = [
            o
            for o in rows[seg["trained_by"]]
            if o["step"] == r["step"] and o["config"] == seg["config"]
        ]
        assert original, (
            f"no report of {seg['trained_by']} at step {r['step']} with {seg['config']}"
        )
        assert r["lr"] == pytest.approx(original[-1]["lr"], rel=1e-9)
        assert r["unfreeze_depth"] == original[-1]["unfreeze_depth"]
        assert r["weights_sha256"] == original[-1]["weights_sha256"], f"step {r['step']}"
    assert replay_rows[-1]["step"] == 24
    assert replay_rows[-1]["weights_sha256"] == rows[trial][-1]["weights_sha256"]
