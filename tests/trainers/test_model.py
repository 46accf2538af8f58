"""Layer discovery, freezing and dropout on tiny random models of every listed architecture."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from trainers.model import (
    DROPOUT_ATTRS,
    ModelError,
    apply_freezing,
    dropout_overrides,
    layer_map,
    trainable_names,
)

N_LAYERS = 3
SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
)

TINY = {
    "bert": lambda: tf.BertConfig(num_hidden_layers=N_LAYERS, **SMALL),
    "roberta": lambda: tf.RobertaConfig(num_hidden_layers=N_LAYERS, **SMALL),
    "distilbert": lambda: tf.DistilBertConfig(
        n_layers=N_LAYERS,
        dim=32,
        n_heads=2,
        hidden_dim=37,
        vocab_size=99,
        max_position_embeddings=64,
    ),
    "albert": lambda: tf.AlbertConfig(
        num_hidden_layers=N_LAYERS, num_hidden_groups=N_LAYERS, embedding_size=16, **SMALL
    ),
    "electra": lambda: tf.ElectraConfig(num_hidden_layers=N_LAYERS, embedding_size=16, **SMALL),
    "deberta-v2": lambda: tf.DebertaV2Config(num_hidden_layers=N_LAYERS, **SMALL),
    "gpt2": lambda: tf.GPT2Config(
        n_layer=N_LAYERS, n_embd=32, n_head=2, vocab_size=99, n_positions=64, pad_token_id=0
    ),
    "llama": lambda: tf.LlamaConfig(
        num_hidden_layers=N_LAYERS, num_key_value_heads=1, pad_token_id=0, **SMALL
    ),
    "mistral": lambda: tf.MistralConfig(
        num_hidden_layers=N_LAYERS, num_key_value_heads=1, pad_token_id=0, **SMALL
    ),
    "qwen2": lambda: tf.Qwen2Config(
        num_hidden_layers=N_LAYERS, num_key_value_heads=1, pad_token_id=0, **SMALL
    ),
    "gemma": lambda: tf.GemmaConfig(
        num_hidden_layers=N_LAYERS, num_key_value_heads=1, head_dim=16, pad_token_id=0, **SMALL
    ),
    "phi": lambda: tf.PhiConfig(num_hidden_layers=N_LAYERS, pad_token_id=0, **SMALL),
    "opt": lambda: tf.OPTConfig(
        num_hidden_layers=N_LAYERS,
        hidden_size=32,
        num_attention_heads=2,
        ffn_dim=37,
        vocab_size=99,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        pad_token_id=1,
    ),
}


def _model(arch, **config_overrides):
    config = TINY[arch]()
    config.num_labels = 2
    for k, v in config_overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    return tf.AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_layer_discovery(arch):
    model = _model(arch)
    lmap = layer_map(model)
    assert lmap.num_blocks == N_LAYERS
    all_names = [n for n, _ in model.named_parameters()]
    grouped = [n for b in lmap.blocks for n in b] + lmap.embeddings + lmap.top + lmap.head
    assert sorted(grouped) == sorted(all_names)  # every parameter in exactly one group
    assert lmap.head and all(lmap.blocks) and lmap.embeddings
    assert not any("embed" in n.lower() or "wte" in n for n in lmap.head)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_unfreeze_depth_selects_the_top_blocks(arch):
    model = _model(arch)
    lmap = layer_map(model)
    apply_freezing(model, lmap, depth=1, train_embeddings=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lmap.blocks[-1]) <= trainable
    assert not set(lmap.blocks[0]) & trainable
    assert set(lmap.head) <= trainable
    assert not set(lmap.embeddings) & trainable
    # everything unfrozen: embeddings train too
    assert trainable_names(lmap, None, None) == {n for n, _ in model.named_parameters()}
    # depth 0: only the head
    assert trainable_names(lmap, 0, None) == set(lmap.head)
    # the user can ask for embeddings with a partial depth
    assert set(lmap.embeddings) <= trainable_names(lmap, 1, True)


def test_undiscoverable_model_names_its_class():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

    with pytest.raises(ModelError, match="Flat"):
        layer_map(Flat())


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "opt", "llama"])
def test_dropout_reaches_the_built_modules(arch):
    hp = {"hidden_dropout": 0.23, "attention_dropout": 0.17}
    if "classifier" in DROPOUT_ATTRS[arch]:
        hp["classifier_dropout"] = 0.31
    if "hidden" not in DROPOUT_ATTRS[arch]:
        del hp["hidden_dropout"]
    overrides = dropout_overrides(arch, arch, hp)
    model = _model(arch, **overrides)
    probs = {round(m.p, 4) for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    # attention dropout as a module (BERT family) or a float on the attention layers (decoders)
    probs |= {
        round(float(getattr(m, a)), 4)
        for m in model.modules()
        for a in ("attention_dropout", "dropout")
        if isinstance(getattr(m, a, None), float)
    }
    for value in hp.values():
        assert value in probs, (arch, value, probs)


def test_a_missing_dropout_knob_is_an_error():
    with pytest.raises(ModelError, match="LlamaForCausalLM.*no hidden dropout"):
        dropout_overrides("llama", "LlamaForCausalLM", {"hidden_dropout": 0.1})
    with pytest.raises(ModelError, match="no dropout mapping"):
        dropout_overrides("mamba", "MambaForCausalLM", {"attention_dropout": 0.1})
    assert dropout_overrides("llama", "LlamaForCausalLM", {"hidden_dropout": None}) == {}


def test_saving_a_model_does_not_import_deepspeed(tiny_bert, tmp_path):
    """transformers' save_pretrained unwraps through accelerate, which imported deepspeed
    (2.5 s of CPU per process) to ask whether the model is a DeepSpeedEngine: every DDP
    worker paid it at its first checkpoint. In a fresh process: the model saved, reloads,
    and deepspeed was never imported."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        "from trainers.model import save_pretrained\n"
        f"model = A.from_pretrained({tiny_bert!r}, num_labels=2)\n"
        f"save_pretrained(model, {str(tmp_path / 'saved')!r})\n"
        "A.from_pretrained(" + repr(str(tmp_path / "saved")) + ")\n"
        "print('deepspeed' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
