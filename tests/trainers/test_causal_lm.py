"""Causal-LM fine-tuning mechanics on a tiny random Llama with SmolLM2's tokenizer: the
prompt is masked, packing loses nothing but the tail, packed documents stay apart, LoRA
trains only its adapter, the merged export equals base + adapter, gradient checkpointing
gives LoRA the same gradients."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tests.conftest import worker_config
from trainers.checkpoint import weights_fingerprint
from trainers.loop import run_local
from trainers.tasks import causal_lm


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _cfg(model, splits, adapter=None, **hp):
    cfg = worker_config(splits, **{"eval_steps": 3, "max_steps": 6, "learning_rate": 1e-3, **hp})
    cfg.update(model=model, task="causal_lm", max_length=160, metric="eval_loss", mode="min")
    cfg["hp"]["per_device_train_batch_size"] = 8
    cfg["hp"]["adapter"] = adapter
    return cfg


LORA = {"type": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


def test_the_labels_mask_the_prompt_and_keep_the_response(tiny_llama, rt_instructions):
    tok = _tokenizer(tiny_llama)
    rows, n = causal_lm.encode_train(tok, rt_instructions, 256, rank=0, world_size=1)
    assert n == len(rt_instructions.train)
    for ids, labels, answer in zip(
        rows.ids[:20], rows.targets[:20], rt_instructions.train.labels[:20], strict=False
    ):
        scored = [t for t in labels if t != causal_lm.IGNORE]
        start = labels.index(scored[0])
        assert all(t == causal_lm.IGNORE for t in labels[:start])  # the whole prompt masked
        assert labels[start:] == ids[start:]  # the response scored, token for token
        text = tok.decode(scored)
        assert text.startswith(answer) and text.rstrip().endswith("<|im_end|>")
        assert "Review:" in tok.decode(ids[:start])  # the prompt is in the input


@pytest.mark.parametrize("adapter", [None, LORA])
def test_the_loss_on_scored_positions_equals_the_full_logits_loss(
    tiny_llama, rt_instructions, adapter
):
    """The training forward runs the output layer only where a response token is next:
    the same loss and the same gradients as over every position's logits (fp32)."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(tiny_llama)
    rows, _ = causal_lm.encode_train(tok, rt_instructions, 256, rank=0, world_size=1)
    (batch,) = causal_lm.batches(rows, list(range(8)), 8, tok.pad_token_id)
    assert len(batch["logits_to_keep"]) < batch["input_ids"].shape[1] / 4  # mostly prompt
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if adapter:
        from trainers.adapters import attach

        model = attach(model, adapter)
    full = {k: v for k, v in batch.items() if k not in ("logits_to_keep", "shift_labels")}
    losses, grads = [], []
    for inputs in (full, batch):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_packing_fills_every_block_and_drops_only_the_tail():
    docs = [[1] * 5, [2] * 7, [3] * 3, [4] * 9]  # 24 tokens + 4 end-of-text = 28
    blocks, positions = causal_lm.pack(docs, eos_id=0, block=8)
    assert len(blocks) == 3 and all(len(b) == 8 for b in blocks)  # 28 // 8; 4 tokens dropped
    stream = [t for d in docs for t in [*d, 0]]
    assert [t for b in blocks for t in b] == stream[:24]
    assert positions[0] == [0, 1, 2, 3, 4, 5, 0, 1]  # restart where document 2 starts
    assert positions[1] == [0, 1, 2, 3, 4, 5, 0, 1]  # a block opening mid-document counts from 0


def test_packed_documents_do_not_attend_to_each_other(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    a, b = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([a + b]),
            position_ids=torch.tensor([list(range(5)) + list(range(4))]),
            use_cache=False,
        ).logits[0, 5:]
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        leaky = model(input_ids=torch.tensor([a + b]), use_cache=False).logits[0, 5:]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # the test can tell the difference


def _sha(model):
    params = dict(model.named_parameters())
    return weights_fingerprint(params, list(params))


def test_lora_trains_only_the_adapter_and_reports_llm_metrics(
    tiny_llama, rt_instructions, tmp_path
):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = _sha(base)
    ctx = run_local(_cfg(tiny_llama, rt_instructions, LORA), checkpoint_root=str(tmp_path))
    last = ctx.reports[-1]
    assert last["step"] == 6
    assert math.isclose(last["eval_perplexity"], math.exp(last["eval_loss"]), rel_tol=1e-9)
    assert 0.0 <= last["eval_answer_accuracy"] <= 1.0
    # 2 blocks x 7 linear layers, A and B each: nothing else trains
    n_adapter = sum(p.numel() for n, p in _attached(base).named_parameters() if ".lora_" in n)
    assert last["trainable_params"] == n_adapter
    from trainers.checkpoint import read_manifest

    manifest = read_manifest(ctx.checkpoints[-1])
    assert manifest["weights"] == "trained"
    assert manifest["trained_params"] and all(".lora_" in n for n in manifest["trained_params"])
    assert _sha(AutoModelForCausalLM.from_pretrained(tiny_llama)) == before  # base untouched


def _attached(model):
    from trainers.adapters import attach

    return attach(model, LORA)


def test_the_merged_export_equals_base_plus_adapter(tiny_llama, rt_instructions, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers.checkpoint import ADAPTER_DIR, materialize

    ctx = run_local(_cfg(tiny_llama, rt_instructions, LORA), checkpoint_root=str(tmp_path / "c"))
    dest = tmp_path / "export"
    materialize(ctx.checkpoints[-1], str(dest))
    merged = AutoModelForCausalLM.from_pretrained(dest).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with_adapter = PeftModel.from_pretrained(base, dest / ADAPTER_DIR).eval()
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = merged(input_ids=x).logits, with_adapter(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapter did train


def test_full_fine_tuning_trains_the_tied_head_under_partial_freezing(tiny_llama, rt_instructions):
    ctx = run_local(_cfg(tiny_llama, rt_instructions, None, unfreeze_depth=1))
    from transformers import AutoModelForCausalLM

    from trainers.model import layer_map

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lmap = layer_map(model)
    assert lmap.head == ["model.embed_tokens.weight"]  # tied: one tensor, counted as the head
    top_block = sum(p.numel() for n, p in model.named_parameters() if n in lmap.blocks[-1])
    head = model.get_output_embeddings().weight.numel()
    norm = sum(p.numel() for n, p in model.named_parameters() if n in lmap.top)
    assert ctx.reports[-1]["trainable_params"] == top_block + head + norm


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_gives_lora_its_gradients(tiny_llama, checkpointing):
    from transformers import AutoModelForCausalLM

    from trainers.adapters import apply_freezing, attach

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.requires_grad_(False)
    model = attach(model, LORA)
    apply_freezing(model, None, None)
    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    for n, p in model.named_parameters():  # B starts at zero: give it a value
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    test_gradient_checkpointing_gives_lora_its_gradients.seen[checkpointing] = grads
    if len(test_gradient_checkpointing_gives_lora_its_gradients.seen) == 2:
        off, on = (
            test_gradient_checkpointing_gives_lora_its_gradients.seen[k] for k in (False, True)
        )
        assert all(torch.allclose(off[n], on[n], atol=1e-6) for n in off)


test_gradient_checkpointing_gives_lora_its_gradients.seen = {}


def test_a_tied_output_layer_is_one_tensor_in_the_optimizer(tiny_llama):
    """lm_head and embed_tokens share one tensor: AdamW must hold (and step) it once, under
    the name named_parameters gives it (DeepSpeed refuses duplicates; torch would step it
    twice)."""
    from transformers import AutoModelForCausalLM

    from trainers.config import HParams
    from trainers.optim import param_groups
    from tune_jobs.spec import TrainingSpec

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    groups = param_groups(model, HParams.from_dict(TrainingSpec().model_dump()))
    params = [p for g in groups for p in g["params"]]
    names = [n for g in groups for n in g["names"]]
    assert len({id(p) for p in params}) == len(params)
    assert names.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in names
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chat_rows_learn_the_last_assistant_turn(tiny_llama, tmp_path):
    """format chat: the conversation before the last turn is the prompt (in the chat
    template, turn by turn), the assistant's last turn is all that is scored."""
    from tests.conftest import data_cfg
    from trainers.data import load_splits

    convo = [
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": f"Is {i} even?"},
                {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"},
            ]
        }
        for i in range(40)
    ]
    splits = load_splits(
        data_cfg(source="jsonl", path=_jsonl(tmp_path / "chat.jsonl", convo), format="chat"),
        seed=0,
    )
    assert splits.format == "chat" and splits.label_names == ["no", "yes"]
    tok = _tokenizer(tiny_llama)
    rows, _ = causal_lm.encode_train(tok, splits, 256, 0, 1)
    for ids, labels, answer in zip(rows.ids, rows.targets, splits.train.labels, strict=True):
        start = next(i for i, t in enumerate(labels) if t != causal_lm.IGNORE)
        prompt = tok.decode(ids[:start])
        assert "Answer in one word." in prompt and "<|im_start|>assistant" in prompt
        assert tok.decode(labels[start:]).startswith(answer + "<|im_end|>")
    ctx = run_local(_cfg(tiny_llama, splits, LORA, max_steps=2, eval_steps=2))
    assert 0 <= ctx.reports[-1]["eval_answer_accuracy"] <= 1


def test_plain_text_is_packed_and_trained_on_every_token(tiny_llama, tmp_path):
    from tests.conftest import data_cfg
    from trainers.data import load_splits

    docs = [{"text": f"Document number {i} says something about the weather."} for i in range(60)]
    splits = load_splits(
        data_cfg(source="jsonl", path=_jsonl(tmp_path / "docs.jsonl", docs), format="text"),
        seed=0,
    )
    assert splits.format == "text" and splits.label_names == []
    tok = _tokenizer(tiny_llama)
    rows, n_blocks = causal_lm.encode_train(tok, splits, 32, 0, 1)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in splits.train.texts)
    assert n_blocks == tokens // 32 and all(len(b) == 32 for b in rows.ids)
    assert rows.targets == rows.ids  # every token is a target
    cfg = _cfg(tiny_llama, splits, None, max_steps=2, eval_steps=2)
    cfg["max_length"] = 32
    last = run_local(cfg).reports[-1]
    assert math.isnan(last["eval_answer_accuracy"]) and last["eval_loss"] > 0


def test_a_users_own_validation_file_is_used_as_given(tiny_llama, tmp_path):
    from tests.conftest import data_cfg
    from trainers.data import load_splits

    pairs = [{"prompt": f"Say {w}", "response": w} for w in ["red", "blue"] * 30]
    pairs = [{**p, "prompt": f"{p['prompt']} ({i})"} for i, p in enumerate(pairs)]
    own = [
        {"prompt": f"Please say {w} ({i})", "response": w}
        for i, w in enumerate(["blue", "red", "blue"])
    ]
    splits = load_splits(
        data_cfg(
            source="jsonl",
            path=_jsonl(tmp_path / "train.jsonl", pairs),
            validation_path=_jsonl(tmp_path / "val.jsonl", own),
            format="instruction",
        ),
        seed=0,
    )
    assert splits.validation.texts == [r["prompt"] for r in own]
    assert splits.validation.labels == ["blue", "red", "blue"]
    assert splits.label_names == ["blue", "red"]
    assert splits.majority_baseline("validation") in (1 / 3, 2 / 3)


@pytest.mark.parametrize("adapter", [None, LORA], ids=["full", "lora"])
def test_layerwise_lr_decay_counts_decoder_blocks_from_the_top(tiny_llama, adapter):
    """Block k of n trains at decay**(n-1-k) of the LR, under LoRA its adapter too; the tied
    output layer is the head (the full LR), never an embedding's decayed one."""
    from transformers import AutoModelForCausalLM

    from tests.trainers.test_optim import _hp
    from trainers.adapters import attach
    from trainers.loop import freeze
    from trainers.model import layer_map
    from trainers.optim import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if adapter:
        model = attach(model, adapter)
    hp = _hp(learning_rate=1e-3, layerwise_lr_decay=0.5, adapter=adapter)
    lmap = layer_map(model)
    scale, _ = freeze(model, lmap, hp, None)
    optimizer = build_optimizer(model, hp, scale)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    n = lmap.num_blocks
    assert n >= 2
    for k, block in enumerate(lmap.blocks):
        params = dict(model.named_parameters())
        trained = [name for name in block if params[name].requires_grad]
        assert trained, f"block {k}: nothing trains"
        if adapter:
            assert all("lora_" in name for name in trained)
        for name in trained:
            assert lr_of[id(params[name])] == pytest.approx(1e-3 * 0.5 ** (n - 1 - k)), name
    head = model.get_output_embeddings().weight
    if adapter:
        assert id(head) not in lr_of  # LoRA: the base's head stays frozen
    else:
        assert lr_of[id(head)] == pytest.approx(1e-3)  # tied to the embeddings, yet the head


def test_answers_over_the_prompts_cache_score_as_whole_sequences(tiny_llama, rt_instructions):
    """Evaluation runs each prompt once and every answer over its KV cache: the same
    log-likelihoods as scoring each (prompt, answer) pair whole, to float precision."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(tiny_llama)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    fmt, template = rt_instructions.format, rt_instructions.template
    # the answer set, and a longer one of 3 answers of different lengths
    for answers in (list(rt_instructions.label_names), ["fresh", "rotten", "mixed feelings"]):
        choices = causal_lm.choice_ids(tok, answers, fmt, template)
        assert max(map(len, choices)) > 1  # the cache is extended, then cropped back
        prompts = [
            causal_lm.encode_pair(tok, p, "x", fmt, template)[0]
            for p in rt_instructions.validation.texts[:6]
        ]
        with torch.no_grad():
            cached = causal_lm.choice_logprobs(
                model, prompts, choices, tok.pad_token_id, "cpu", contextlib.nullcontext
            )
            for k, answer in enumerate(choices):
                whole, _ = causal_lm.sequence_logprobs(
                    model,
                    prompts,
                    [answer] * len(prompts),
                    tok.pad_token_id,
                    "cpu",
                    contextlib.nullcontext,
                )
                assert torch.allclose(cached[:, k], whole, atol=1e-4), (answers[k], cached, whole)
