"""Causal language modelling: instruction/response pairs, chat conversations, plain text.

Rows, by ``Splits.format``:

- ``instruction``: a prompt and a response. The prompt goes through the tokenizer's
  chat template as a user turn (or a plain template where the tokenizer has none, or
  where ``data.chat_template: plain`` says so); the response is the assistant's turn.
  **The loss is on the response tokens only**: the prompt's labels are -100.
- ``chat``: the conversation before the last turn is the prompt (``Split.texts`` holds
  it as JSON), the last assistant turn is the response.
- ``text``: documents packed into blocks of ``model.max_length`` tokens, each document
  followed by the end-of-text token; only the tail remainder is dropped. Position ids
  restart at every document, and a packed batch goes without an attention mask, so
  transformers (5.x, eager and SDPA attention) masks attention *between* documents of one
  block (``masking_utils.find_packed_sequence_indices``). Attention implementations
  that ignore position ids (none of the Llama family's) would let documents see each
  other; the test ``test_packed_documents_do_not_attend_to_each_other`` holds the line.

A row whose prompt and response together exceed ``model.max_length`` is never cut:
the driver drops it before any worker sees it (``fit_to_length``), counted and
reported, or refuses the data (``data.truncation: error``).

Evaluation scores every answer of the answer set (``Splits.label_names``, e.g.
``fresh``/``rotten``) by its log-likelihood after the prompt, the multiple-choice
method of lm-evaluation-harness: never an unparseable answer, and smooth enough for
early stopping. Each prompt runs once and every answer over its KV cache
(``choice_logprobs``: 0.6x the time of scoring each (prompt, answer) pair whole, two
answers, ``benchmarks/llm_eval_cost.py``). The reference answer's tokens give
``eval_loss`` (mean per response token) and perplexity. Only the last positions' logits
are computed (``logits_to_keep``): the full ``[batch, length, vocabulary]`` tensor never
exists.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from trainers import metrics as M
from trainers.data import DataError, Split, Splits, shard
from trainers.tasks import CAUSAL_LM, Rows
from trainers.tasks.classification import all_reduce_sum

NAME = CAUSAL_LM
AUTO_CLASS = "AutoModelForCausalLM"
objectives = M.TASK_OBJECTIVES[NAME]
default_metric = M.EVAL_LOSS
#: the leaderboard's metric columns beside the searched one
columns = (M.EVAL_LOSS, M.EVAL_PERPLEXITY, M.EVAL_ANSWER_ACCURACY)
#: what the summary says of an exported model's scores
scores = (M.EVAL_ANSWER_ACCURACY, M.EVAL_LOSS)

IGNORE = -100  # the label of a token that is not scored (the prompt, padding)
#: The prompt around an instruction when the tokenizer has no chat template (Alpaca's).
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
#: Logit elements one evaluation forward may hold (fp32: 256 MiB); rows per forward follow.
LOGITS_BUDGET = 1 << 26


def config_kwargs(label_names: list[str]) -> dict[str, Any]:
    """Nothing to tell the config: the vocabulary head is the model's own. ``use_cache``
    off: training keeps no KV cache (and packed blocks need none to mask documents apart)."""
    del label_names
    return {"use_cache": False}


# --- prompts and responses -----------------------------------------------------


def uses_chat_template(tokenizer: Any, template: str) -> bool:
    """``data.chat_template`` made concrete: auto = the tokenizer's template where it has one."""
    if template == "plain":
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(prompt: str, fmt: str) -> list[dict[str, str]]:
    return json.loads(prompt) if fmt == "chat" else [{"role": "user", "content": prompt}]


def prompt_text(tokenizer: Any, prompt: str, fmt: str, template: str) -> str:
    """The text the model sees before its answer (generation prompt included)."""
    if uses_chat_template(tokenizer, template):
        return tokenizer.apply_chat_template(
            _messages(prompt, fmt), tokenize=False, add_generation_prompt=True
        )
    if fmt == "chat":
        turns = _messages(prompt, fmt)
        prompt = "\n\n".join(f"{t['role']}: {t['content']}" for t in turns)
    return PLAIN_TEMPLATE.format(prompt=prompt)


def response_text(tokenizer: Any, prompt: str, response: str, fmt: str, template: str) -> str:
    """The answer as the model should write it: the assistant turn as the chat template
    renders it (its end-of-turn token included), or the response and end-of-text."""
    if not uses_chat_template(tokenizer, template):
        return response + (tokenizer.eos_token or "")
    before = prompt_text(tokenizer, prompt, fmt, template)
    whole = tokenizer.apply_chat_template(
        [*_messages(prompt, fmt), {"role": "assistant", "content": response}], tokenize=False
    )
    if not whole.startswith(before):
        raise DataError(
            "data.chat_template",
            "the tokenizer's chat template renders the conversation differently with and "
            "without the answer, so the answer's tokens cannot be told apart; use "
            "data.chat_template: plain",
        )
    return whole[len(before) :]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(
    tokenizer: Any, prompt: str, response: str, fmt: str, template: str
) -> tuple[list[int], list[int]]:
    """(prompt tokens, response tokens) of one row, tokenized apart so the boundary is exact."""
    return (
        _ids(tokenizer, prompt_text(tokenizer, prompt, fmt, template)),
        _ids(tokenizer, response_text(tokenizer, prompt, response, fmt, template)),
    )


def fit_to_length(
    split: Split, tokenizer: Any, max_length: int, fmt: str, template: str
) -> tuple[Split, int]:
    """The rows whose prompt and response fit in ``max_length`` tokens, and how many were
    dropped (a response is never cut, and a prompt cut would change the question)."""
    if fmt == "text":
        return split, 0
    keep = [
        i
        for i, (p, r) in enumerate(zip(split.texts, split.labels, strict=True))
        if sum(map(len, encode_pair(tokenizer, p, r, fmt, template))) <= max_length
    ]
    kept = Split([split.texts[i] for i in keep], [split.labels[i] for i in keep])
    return kept, len(split) - len(keep)


# --- training rows ---------------------------------------------------------------


def pack(
    docs: Sequence[Sequence[int]], eos_id: int, block: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Documents (each followed by ``eos_id``) concatenated and cut into blocks of ``block``
    tokens; the tail remainder is dropped and nothing else. Returns the blocks and their
    position ids, which restart at 0 where each document starts."""
    stream: list[int] = []
    positions: list[int] = []
    for doc in docs:
        piece = [*doc, eos_id]
        stream += piece
        positions += range(len(piece))
    n = len(stream) // block
    blocks = [stream[i * block : (i + 1) * block] for i in range(n)]
    pos = [positions[i * block : (i + 1) * block] for i in range(n)]
    for p in pos:  # a block that starts inside a document counts positions from its start
        if p and p[0] != 0:
            first_new = next((j for j, x in enumerate(p) if x == 0), len(p))
            p[:first_new] = range(first_new)
    return blocks, pos


def _texts_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def encode_train(
    tokenizer: Any, splits: Splits, max_length: int, rank: int, world_size: int
) -> tuple[Rows, int]:
    """This rank's training rows and the count over all ranks (the budget's unit).

    Text is packed over the whole split first and the blocks are then sharded, so every
    rank gets the same number (DDP and ZeRO hang otherwise)."""
    split, fmt = splits.train, splits.format
    if fmt == "text":
        blocks, pos = pack(_texts_ids(tokenizer, split.texts), _eos(tokenizer), max_length)
        mine = shard(range(len(blocks)), rank, world_size, equal=True)
        return Rows(
            [blocks[i] for i in mine], [blocks[i] for i in mine], [pos[i] for i in mine]
        ), len(blocks)
    mine = shard(range(len(split)), rank, world_size, equal=True)
    ids, targets = [], []
    for i in mine:
        p, r = encode_pair(tokenizer, split.texts[i], split.labels[i], fmt, splits.template)
        ids.append(p + r)
        targets.append([IGNORE] * len(p) + r)
    return Rows(ids, targets), len(split)


def _eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    return int(eos if eos is not None else tokenizer.pad_token_id or 0)


def batches(
    rows: Rows, order: Sequence[int], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches for the training forward: right-padded with ``labels`` -100 on padding; a
    packed batch carries position ids and no attention mask (documents masked apart)."""
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        width = max(len(rows.ids[i]) for i in picked)
        input_ids = torch.full((len(picked), width), pad_id, dtype=torch.long)
        labels = torch.full((len(picked), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(picked), width), dtype=torch.long)
        for r, i in enumerate(picked):
            n = len(rows.ids[i])
            input_ids[r, :n] = torch.tensor(rows.ids[i])
            labels[r, :n] = torch.tensor(rows.targets[i])
            mask[r, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        if rows.positions is not None:
            batch["position_ids"] = torch.tensor([rows.positions[i] for i in picked])
        else:
            batch["attention_mask"] = mask
            batch.update(scored_positions(labels))
        yield batch


def scored_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output layer only where a next token is scored: ``logits_to_keep``, the positions
    whose next token is a response token in some row, and ``shift_labels``, those next
    tokens (transformers' causal-LM loss takes them as they are, unshifted again).

    On instruction rows the prompt is most of every row, and the output layer (49,152 x
    576 on SmolLM2, a fifth of its FLOPs per token) would otherwise run for every prompt
    token and hold ``[batch, length, vocabulary]`` logits: the loss is the same mean over
    the same tokens (``test_the_loss_on_scored_positions_equals_the_full_logits_loss``).
    """
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    keep = (shifted != IGNORE).any(dim=0).nonzero().flatten()
    if len(keep) == labels.shape[1]:
        return {}  # every position scored: nothing to leave out
    return {"logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}


# --- evaluation --------------------------------------------------------------------


def choice_ids(tokenizer: Any, label_names: list[str], fmt: str, template: str) -> list[list[int]]:
    """The response tokens of every answer of the answer set (an assistant turn renders
    the same whatever the prompt, in every common chat template: computed once)."""
    neutral = json.dumps([{"role": "user", "content": "?"}]) if fmt == "chat" else "?"
    return [
        _ids(tokenizer, response_text(tokenizer, neutral, a, fmt, template)) for a in label_names
    ]


def encode_eval(
    tokenizer: Any, split: Split, rows: Sequence[int], max_length: int, splits: Splits
) -> Rows:
    """Evaluation rows: each prompt with its candidate answers (the answer set, or the
    reference response alone), shortest prompt first; text as packed blocks."""
    label_names, fmt, template = list(splits.label_names), splits.format, splits.template
    if fmt == "text":
        blocks, pos = pack(
            _texts_ids(tokenizer, [split.texts[i] for i in rows]), _eos(tokenizer), max_length
        )
        return Rows(blocks, blocks, pos)
    choices = choice_ids(tokenizer, label_names, fmt, template) if label_names else []
    out: list[tuple[list[int], list[list[int]], int, bool, int]] = []
    for i in rows:
        prompt, response = split.texts[i], split.labels[i]
        p, r = encode_pair(tokenizer, prompt, response, fmt, template)
        if response in label_names:
            out.append((p, choices, label_names.index(response), True, i))
        else:
            out.append((p, [r], 0, False, i))
    out.sort(key=lambda row: len(row[0]))
    return Rows(
        ids=[o[0] for o in out],
        targets=[o[1][o[2]] for o in out],
        candidates=[o[1] for o in out],
        gold=[o[2] for o in out],
        scored=[o[3] for o in out],
        index=[o[4] for o in out],
    )


def left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences right-aligned in one batch: (input ids, attention mask), so every
    row's last token sits in the last position."""
    width = max(len(q) for q in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, q in enumerate(seqs):
        input_ids[r, width - len(q) :] = torch.tensor(list(q), dtype=torch.long)
        mask[r, width - len(q) :] = 1
    return input_ids, mask


def sequence_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    pad_id: int,
    device: Any,
    autocast: Callable[[], AbstractContextManager[Any]],
    positions: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each answer after its prompt, and its token count.

    Left-padded, position ids counted from each row's first token, and only the last
    ``longest answer + 1`` positions' logits computed. Packed blocks (``positions``)
    are scored whole, with documents masked apart."""
    input_ids, mask = left_padded([[*p, *a] for p, a in zip(prompts, answers, strict=True)], pad_id)
    width = input_ids.shape[1]
    keep = min(max(len(a) for a in answers) + 1, width)
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids.to(device)}
    if positions is not None:
        inputs["position_ids"] = torch.tensor(list(positions)).to(device)
    else:
        inputs["attention_mask"] = mask.to(device)
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    with autocast():
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits[:, :-1].float()  # position j predicts token j + 1
    targets = input_ids[:, width - keep + 1 :].to(device)
    answer_len = torch.tensor([len(a) for a in answers], device=device)
    j = torch.arange(keep - 1, device=device)
    scored = j.unsqueeze(0) >= (keep - 1 - answer_len).unsqueeze(1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * scored).sum(-1).double(), scored.sum(-1).double()


def choice_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[int]],
    pad_id: int,
    device: Any,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> torch.Tensor:
    """``[rows, choices]``: the summed log-probability of every answer of the answer set
    after each prompt. The prompts run once (left-padded, their KV cache kept); each answer
    then runs over that cache, batched over the rows, and the cache is cropped back. The
    same sums as scoring every (prompt, answer) pair whole (``sequence_logprobs``; a test
    holds them equal), for one pass over the prompts instead of one per answer."""
    n = len(prompts)
    input_ids, mask = left_padded(prompts, pad_id)
    mask = mask.to(device)
    lengths = mask.sum(-1, keepdim=True)
    with autocast():
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # each answer's first token
    cache = out.past_key_values
    scores = torch.zeros((n, len(choices)), dtype=torch.float64, device=device)
    for k, answer in enumerate(choices):
        tokens = torch.tensor(list(answer), device=device)
        total = first[:, tokens[0]].double()
        rest = len(answer) - 1
        if rest:
            with autocast():
                logits = model(
                    input_ids=tokens[:-1].expand(n, rest),
                    attention_mask=torch.cat([mask, mask.new_ones((n, rest))], dim=1),
                    position_ids=lengths + torch.arange(rest, device=device),
                    past_key_values=cache,
                    use_cache=True,
                ).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            total = total + logp.gather(-1, tokens[1:].expand(n, rest).unsqueeze(-1)).sum((1, 2))
            cache.crop(-rest)  # back to the prompts, for the next answer
        scores[:, k] = total
    return scores


def score(
    model: Any,
    rows: Rows,
    n_labels: int,
    batch_size: int,
    pad_id: int,
    device: Any = "cpu",
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Loss and perplexity on the reference answers' tokens, and answer accuracy over the
    rows whose reference is in the answer set; summed on this rank, all-reduced once."""
    del n_labels  # the answer set is in the rows
    per_row = row_scores(model, rows, batch_size, pad_id, device, autocast)
    loss_sum = sum(r[1] for r in per_row)
    tokens = sum(r[2] for r in per_row)
    asked = sum(r[0] is not None for r in per_row)
    correct = sum(bool(r[0]) for r in per_row)
    totals = all_reduce_sum(
        torch.tensor([loss_sum, tokens, correct, asked], dtype=torch.float64), device
    )
    loss_sum, tokens, correct, asked = totals.tolist()
    loss = loss_sum / tokens if tokens else math.nan
    return {
        M.EVAL_LOSS: loss,
        M.EVAL_PERPLEXITY: math.exp(min(loss, 700.0)) if tokens else math.nan,
        M.EVAL_ANSWER_ACCURACY: correct / asked if asked else math.nan,
    }


def row_scores(
    model: Any,
    rows: Rows,
    batch_size: int,
    pad_id: int,
    device: Any = "cpu",
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> list[tuple[bool | None, float, float]]:
    """Per row, in order: was the most likely answer the reference (None where the reference
    is not in the answer set), the reference's summed loss, and its token count."""
    model.eval()
    vocab = _vocab_size(model)
    by_row: list[list[float]] = [[] for _ in range(len(rows))]
    counted: list[list[float]] = [[] for _ in range(len(rows))]
    # rows asked the answer set: each prompt once, its answers over its KV cache
    asked = [r for r in range(len(rows)) if rows.scored and rows.scored[r]]
    per_forward = max(1, min(batch_size, LOGITS_BUDGET // vocab))
    with torch.no_grad():
        for start in range(0, len(asked), per_forward):
            chunk = asked[start : start + per_forward]
            choices = rows.candidates[chunk[0]]  # the answer set: the same for every such row
            s = choice_logprobs(
                model, [rows.ids[r] for r in chunk], choices, pad_id, device, autocast
            )
            for r, row in zip(chunk, s.tolist(), strict=True):
                by_row[r], counted[r] = row, [float(len(c)) for c in choices]
    # the others (a free-text reference, packed text): every (row, candidate) pair whole
    pairs = [
        (r, k)
        for r in range(len(rows))
        if not by_row[r]
        for k in range(len(rows.candidates[r]) if rows.candidates else 1)
    ]
    scores = torch.zeros(len(pairs), dtype=torch.float64)
    counts = torch.zeros(len(pairs), dtype=torch.float64)
    with torch.no_grad():
        start = 0
        while start < len(pairs):
            keep = 1 + max(len(_answer(rows, *pairs[start])), 1)
            per_forward = max(1, min(batch_size, LOGITS_BUDGET // (keep * vocab)))
            chunk = pairs[start : start + per_forward]
            packed = rows.candidates is None  # packed text: the whole block is the answer
            s, c = sequence_logprobs(
                model,
                [[] if packed else rows.ids[r] for r, _ in chunk],
                [_answer(rows, r, k) for r, k in chunk],
                pad_id,
                device,
                autocast,
                [rows.positions[r] for r, _ in chunk] if packed and rows.positions else None,
            )
            scores[start : start + len(chunk)] = s.cpu()
            counts[start : start + len(chunk)] = c.cpu()
            start += len(chunk)
    model.train()
    for (r, _), s, c in zip(pairs, scores.tolist(), counts.tolist(), strict=True):
        by_row[r].append(s)
        counted[r].append(c)
    out: list[list[Any]] = [[None, 0.0, 0.0] for _ in range(len(rows))]
    for r, candidates in enumerate(by_row):
        gold = rows.gold[r] if rows.gold is not None else 0
        out[r][1], out[r][2] = -candidates[gold], counted[r][gold]
        if rows.scored and rows.scored[r]:
            out[r][0] = max(range(len(candidates)), key=candidates.__getitem__) == gold
    return [tuple(o) for o in out]  # type: ignore[misc]


def _answer(rows: Rows, r: int, k: int) -> list[int]:
    return rows.ids[r] if rows.candidates is None else rows.candidates[r][k]


def _vocab_size(model: Any) -> int:
    bare = getattr(model, "module", model)
    config = getattr(bare, "config", None)
    return int(getattr(config, "vocab_size", 0) or 50_000)


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    fmt: str,
    template: str,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers to ``prompts`` (one process, CPU), end-of-turn text stripped."""
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([_ids(tokenizer, prompt_text(tokenizer, prompt, fmt, template))])
            new = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or _eos(tokenizer),
            )[0, ids.shape[1] :]
            out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return out


def headline(report: dict[str, Any]) -> str:
    """The metrics of one evaluation in the log line."""
    line = f"eval_loss {report[M.EVAL_LOSS]:.4f} perplexity {report[M.EVAL_PERPLEXITY]:.2f}"
    accuracy = report.get(M.EVAL_ANSWER_ACCURACY)
    if accuracy is not None and not math.isnan(accuracy):
        line += f" answer_accuracy {accuracy:.4f}"
    return line


def baseline(splits: Splits, split: str = "validation") -> dict[str, float | None]:
    """Answer accuracy of always giving the training split's most common answer (where
    the answers come from a set)."""
    part = getattr(splits, split)
    if not splits.label_names or not len(part):
        return {M.EVAL_ANSWER_ACCURACY: None}
    return {M.EVAL_ANSWER_ACCURACY: splits.majority_baseline(split)}


def load_export(model_dir: str, trust_remote_code: bool = False) -> Any:
    """An exported causal LM (the merged model where an adapter was trained), reloaded."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
