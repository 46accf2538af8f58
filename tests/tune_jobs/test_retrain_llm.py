"""A causal LM's retrain promotes on answer correctness: per promotion row, in the split's
order, whether the exported model's most likely answer is the reference (McNemar pairs
these rows between champion and challenger)."""

from __future__ import annotations

from trainers.data import Split


def test_answer_correctness_comes_back_in_the_splits_order(tiny_llama, rt_instructions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.tasks import causal_lm
    from tune_jobs.retrain import score

    split = rt_instructions.validation
    whole = score(tiny_llama, split, rt_instructions.label_names, 256, splits=rt_instructions)
    assert len(whole.correct) == len(split)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    pad = tok.pad_token_id
    alone = []
    for i in range(len(split)):  # each row scored on its own: no order to get wrong
        one = Split([split.texts[i]], [split.labels[i]])
        rows = causal_lm.encode_eval(tok, one, [0], 256, rt_instructions)
        alone.append(bool(causal_lm.row_scores(model, rows, 1, pad)[0][0]))
    assert whole.correct == alone
    assert 0 < sum(alone) < len(alone)  # both kinds of row: the order is really tested
    assert whole.accuracy == sum(alone) / len(alone)
