"""GPU check of causal-LM fine-tuning: the worker loop (``trainers.loop.run_local``, no Ray)
on one CUDA device, bf16, on Rotten Tomatoes as instructions (answers fresh / rotten).

* SmolLM2-135M's shape (its config.json and tokenizer, carried in ``.gpucheck/smollm2``;
  random weights: the de-quantized checkpoint is over the carry limit, and throughput
  does not depend on the values), full fine-tuning and LoRA (r 16, every linear layer);
* a Llama-style 515M causal LM from a config (random weights), full fine-tuning at
  several micro-batch sizes.

Prints tokens/s (of the training rows, padding excluded), peak memory and model FLOPs
utilization. FLOPs per trained token: full fine-tuning 6 x N (N every parameter: forward
2N, backward 4N; attention's quadratic term left out); LoRA 4 x N_base + 6 x N_adapter
(the frozen weights take the forward and the activation gradients, 4N, but no weight
gradients). MFU = those FLOPs / the device's bf16 dense peak (``--peak-tflops``). Exits 1
if a run trains nothing.

    python scripts/gpu_llm_check.py --smollm2 DIR --csv FILE [--peak-tflops 989]

``--cpu-dry-run`` runs the same cases tiny on a CPU, to check the script where no GPU is
lent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_loop_check import HP as LOOP_HP  # noqa: E402  (scripts/ is on the path)
from gpu_loop_check import rt_csv  # noqa: E402

from trainers import metrics as M  # noqa: E402
from trainers.data import as_instructions, load_splits  # noqa: E402
from trainers.loop import run_local  # noqa: E402
from tune_jobs.spec import DistributedSpec  # noqa: E402

TEMPLATE = "Is this movie review fresh or rotten? Answer with one word.\n\nReview: {text}"
LORA = {"type": "lora", "r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear"}
HP = {
    **LOOP_HP,
    "save_checkpoints": False,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.03,
    "eval_strategy": "steps",
}


def random_causal_lm(config_dir: str, dest: str, **shape) -> int:
    """A causal LM with random weights from ``config_dir``'s config (``shape`` overrides),
    saved with the tokenizer to ``dest``; its parameter count (a tied head counted once)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    for key, value in shape.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(dest)
    return sum(p.numel() for p in model.parameters())


def run(name, model_dir, splits, hp, adapter, n_params, peak_tflops, device) -> dict:
    """One run of the worker loop; throughput is the last evaluation window's (the first
    holds the warm-up)."""
    from transformers import AutoTokenizer

    from trainers.tasks import causal_lm

    config = {
        "name": name,
        "model": model_dir,
        "task": "causal_lm",
        "max_length": 128,
        "data": splits,
        "hp": {**hp, "adapter": adapter},
        "metric": "eval_loss",
        "mode": "min",
        "seed": 0,
        "threads": 4,
        "checkpoint_weights": "full",
        "distributed": {**DistributedSpec().model_dump(), "precision": "auto"},
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, _ = causal_lm.encode_train(tokenizer, splits, 128, rank=0, world_size=1)
    tokens_per_sample = sum(len(x) for x in rows.ids) / len(rows.ids)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ctx = run_local(config, device=device)
    wall = time.perf_counter() - start
    last = ctx.reports[-1]
    trainable = last[M.TRAINABLE_PARAMS]
    tokens_s = tokens_per_sample * last[M.SAMPLES_PER_SECOND]
    per_token = 4 * n_params + 6 * trainable if adapter else 6 * n_params
    tflops = per_token * tokens_s / 1e12
    out = {
        "tokens_s": tokens_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
        "mfu": tflops / peak_tflops,
        "eval_loss": last[M.EVAL_LOSS],
        "answer_accuracy": last.get(M.EVAL_ANSWER_ACCURACY),
        "trainable": trainable,
    }
    print(
        f"{name}: {n_params / 1e6:.0f}M params ({trainable / 1e6:.2f}M trained), "
        f"{tokens_s:,.0f} tokens/s ({tokens_per_sample:.0f} a row), peak {out['peak_gib']:.2f} "
        f"GiB, {tflops:.1f} model TFLOP/s = MFU {100 * out['mfu']:.1f}% of {peak_tflops:g}, "
        f"eval_loss {out['eval_loss']:.3f}, wall {wall:.0f} s",
        flush=True,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", required=True, help="SmolLM2's config + tokenizer folder")
    parser.add_argument("--csv", required=True, help="Rotten Tomatoes csv (text,label)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--batches", default="16,64,128", help="515M micro-batch sizes")
    parser.add_argument("--cpu-dry-run", action="store_true", help="check the script on a CPU")
    args = parser.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    tiny = device == "cpu"
    train = min(args.train, 64) if tiny else args.train
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    splits = as_instructions(load_splits(rt_csv(args.csv, train, test=0), seed=0), TEMPLATE)
    steps = 4 if tiny else 60
    hp = {
        **HP,
        "per_device_train_batch_size": 4 if tiny else 32,
        "max_steps": steps,
        "eval_steps": steps // 2,
    }
    failures = []
    small = (
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        }
        if tiny
        else {}
    )
    with tempfile.TemporaryDirectory() as folder:
        smol = os.path.join(folder, "smollm2")
        n = random_causal_lm(args.smollm2, smol, **small)
        for label, adapter, lr in (("full", None, 2e-5), ("LoRA", LORA, 2e-4)):
            out = run(
                f"SmolLM2-135M shape, {label}",
                smol,
                splits,
                {**hp, "learning_rate": lr},
                adapter,
                n,
                args.peak_tflops,
                device,
            )
            if not out["tokens_s"] > 0:
                failures.append(f"SmolLM2 {label} trained nothing")
        big = os.path.join(folder, "llama-515m")
        shape = small or {
            "hidden_size": 1280,
            "intermediate_size": 3456,
            "num_hidden_layers": 24,
            "num_attention_heads": 20,
            "num_key_value_heads": 20,
            "tie_word_embeddings": False,
        }
        n = random_causal_lm(args.smollm2, big, **shape)
        print(f"Llama-style causal LM from a config: {n / 1e6:.0f}M parameters (random weights)")
        best = None
        for batch in [int(b) for b in args.batches.split(",")][: 1 if tiny else None]:
            out = run(
                f"Llama-515M full, micro-batch {batch}",
                big,
                splits,
                {**hp, "per_device_train_batch_size": batch, "learning_rate": 1e-5},
                None,
                n,
                args.peak_tflops,
                device,
            )
            if not out["tokens_s"] > 0:
                failures.append(f"Llama-515M batch {batch} trained nothing")
            best = max(best or out, out, key=lambda o: o["mfu"])
        print(f"Llama-515M best MFU: {100 * best['mfu']:.1f}% (target 40%)")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
