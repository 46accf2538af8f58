"""Worker memory at LLM scale: what one worker process holds to run trials of a ~0.5B causal
LM, before and after tasks-as-modules (peak RSS, measured, one fresh process per case).

The model is a random Llama with Qwen2.5-0.5B's shape (24 blocks, width 896, MLP 4,864,
14/2 heads, a 151,936-token tied vocabulary: 494M parameters, 1.98 GB in fp32), written
once as a safetensors folder. Cases, each two trials in a row on one worker, the second
holding a copy of its best weights as a warm group does (``Hold``):

- ``before``: the old worker: a pristine fp32 base kept, a deep copy per trial, the held
  copy a whole state dict;
- ``full``: full fine-tuning now: no pristine copy (each trial reads the folder again,
  memory-mapped), the held copy the trained tensors (all of them: full fine-tuning);
- ``lora``: LoRA now (r 16, all linear layers): one base in bf16 kept, each trial attaches
  an adapter and drops it, the held copy the adapter.

No optimizer steps are taken: AdamW's state (2x the trained weights, fp32) comes on top,
the same before and after.

    python benchmarks/llm_memory.py [--out benchmarks/results/llm_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_model(dest: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(dest, "config.json")):
        return dest
    config = LlamaConfig(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4_864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


def anon_gib() -> float:
    """Anonymous resident memory now (GiB): what the process holds itself, without the
    file-backed pages of a memory-mapped safetensors file (shared, and evictable)."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("RssAnon:"))
    return int(line.split()[1]) / 2**20


def rss_gib() -> float:
    """Peak resident set size of this process so far (GiB): ``VmHWM``, which an exec
    resets (``ru_maxrss`` here carried the parent's peak into the child)."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def case(name: str, path: str) -> dict[str, float]:
    import copy

    import torch

    from trainers.config import HParams
    from trainers.loop import BaseModels, trained_state
    from trainers.model import build_model
    from tune_jobs.spec import AdapterSpec, TrainingSpec

    torch.set_num_threads(2)
    lora = {**AdapterSpec().model_dump(), "type": "lora"}
    hp = HParams.from_dict(
        {**TrainingSpec().model_dump(), "adapter": lora if name == "lora" else None}
    )
    out = {"start": rss_gib()}
    if name == "before":
        pristine = build_model(path, [], None, task="causal_lm")
        out["base loaded"] = rss_gib()
        for trial in (1, 2):
            model = copy.deepcopy(pristine)
            out[f"trial {trial}"] = rss_gib()
            held = {k: v.detach().clone() for k, v in model.state_dict().items()}
            out[f"trial {trial} held"] = rss_gib()
            out[f"trial {trial} held, anonymous"] = anon_gib()
            del model, held
    else:
        models = BaseModels(path, [], 0, task="causal_lm", lora_dtype=torch.bfloat16)
        for trial in (1, 2):
            model = models.fresh(hp)
            out[f"trial {trial}"] = rss_gib()
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            held = trained_state(model, trained)
            out[f"trial {trial} held"] = rss_gib()
            out[f"trial {trial} held, anonymous"] = anon_gib()
            del model, held
    out["peak"] = rss_gib()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks", "results", "llm_memory.json")
    )
    parser.add_argument("--case")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.case:  # the child: one case, its figures on stdout
        print(json.dumps(case(args.case, args.model)))
        return
    folder = make_model(os.path.join(tempfile.gettempdir(), "tunefleet-llm-memory-0.5b"))
    results = {}
    for name in ("before", "full", "lora"):
        proc = subprocess.run(
            [sys.executable, __file__, "--case", name, "--model", folder],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
    record = {
        "model": "random Llama, Qwen2.5-0.5B shape, 494M parameters, tied embeddings",
        "peak_rss_gib": {k: v["peak"] for k, v in results.items()},
        "anonymous_gib_trial_2_held": {k: v["trial 2 held, anonymous"] for k, v in results.items()},
        "cases": results,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
    }
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=2)
    print(json.dumps({k: record[k] for k in ("peak_rss_gib", "anonymous_gib_trial_2_held")}))


if __name__ == "__main__":
    main()
