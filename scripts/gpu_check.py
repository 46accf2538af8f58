"""GPU check of the DeepSpeed path: ZeRO-2, bf16, one CUDA device, no Ray needed.

Runs the real worker loop (``trainers.loop.run_local``) with a DeepSpeed engine
on two models and prints samples/s, peak memory and model FLOPs utilization:

* all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (validation accuracy too);
* a ~0.5B-parameter Llama-style model built from a config (random weights),
  to see the engine at a size where ZeRO and bf16 matter.

MFU = achieved model FLOPs / the device's bf16 dense peak, with model FLOPs
per trained token = 6 x parameters (forward + backward; attention's quadratic
term left out: sequences here are short). Exits 1 if a check fails.

    python scripts/gpu_check.py --model DIR --csv FILE [--peak-tflops 989]

``--cpu-dry-run`` runs the same script on a CPU (gloo, fp32, a tiny Llama, few
rows) to check the script itself where no GPU is lent.
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
from gpu_loop_check import rt_csv, worker_config  # noqa: E402

from trainers import metrics as M  # noqa: E402
from trainers.data import load_splits, tokenize  # noqa: E402
from trainers.loop import run_local  # noqa: E402
from trainers.model import build_tokenizer  # noqa: E402

HP = {**LOOP_HP, "save_checkpoints": False}  # the loop check's hyperparameters
ZERO2_BF16 = {
    "strategy": "deepspeed",
    "precision": "auto",
    "activation_checkpointing": False,
    "deepspeed": {
        "zero_stage": 2,
        "offload_optimizer": False,
        "offload_params": False,
        "precision": "bf16",
        "config": {},
    },
}

ZERO2_FP32 = {**ZERO2_BF16, "deepspeed": {**ZERO2_BF16["deepspeed"], "precision": "fp32"}}


def llama_folder(tokenizer_dir: str, dest: str, tiny: bool = False) -> int:
    """A ~0.5B Llama-style sequence classifier with random weights; its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64 if tiny else 1280,
        intermediate_size=128 if tiny else 3456,
        num_hidden_layers=2 if tiny else 24,
        num_attention_heads=4 if tiny else 20,
        num_key_value_heads=4 if tiny else 20,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return sum(p.numel() for p in model.parameters())


def run(
    name: str,
    model_dir: str,
    splits,
    hp,
    max_length: int,
    peak_tflops: float,
    device: str,
    eval_every: int | None = None,
) -> dict:
    """One training run; samples/s is the last evaluation window's (the first one
    holds CUDA's and DeepSpeed's warm-up)."""
    eval_keys = (
        {"eval_strategy": "steps", "eval_steps": eval_every}
        if eval_every
        else {"eval_strategy": "epoch", "eval_steps": 1}
    )
    config = worker_config(
        name,
        model_dir,
        max_length,
        splits,
        {**hp, **eval_keys},
        ZERO2_BF16 if device == "cuda" else ZERO2_FP32,
    )
    tokenizer = build_tokenizer(model_dir)
    ids = tokenize(tokenizer, splits.train.texts, max_length)
    tokens_per_sample = sum(len(x) for x in ids) / len(ids)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ctx = run_local(config, device=device)
    wall = time.perf_counter() - start
    last = ctx.reports[-1]
    params = last[M.TRAINABLE_PARAMS]
    samples_s = last[M.SAMPLES_PER_SECOND]
    tflops = 6 * params * tokens_per_sample * samples_s / 1e12
    out = {
        "samples_s": samples_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
        "mfu": tflops / peak_tflops,
        "tflops": tflops,
        "accuracy": last[M.EVAL_ACCURACY],
        "params": params,
        "wall": wall,
        "tokens": tokens_per_sample,
    }
    print(
        f"{name}: {params / 1e6:.0f}M trainable params, {samples_s:.0f} samples/s "
        f"({tokens_per_sample:.0f} tokens/sample), peak {out['peak_gib']:.2f} GiB, "
        f"{tflops:.1f} model TFLOP/s = MFU {100 * out['mfu']:.1f}% of {peak_tflops:g}, "
        f"validation accuracy {out['accuracy']:.3f}, wall {wall:.0f} s",
        flush=True,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="all-MiniLM-L6-v2 folder")
    parser.add_argument("--csv", required=True, help="Rotten Tomatoes csv (text,label)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--cpu-dry-run", action="store_true", help="check the script on a CPU")
    args = parser.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.train = min(args.train, 256)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # what a launcher (or Ray Train) sets for DeepSpeed
    torch.distributed.init_process_group(
        "nccl" if device == "cuda" else "gloo", rank=0, world_size=1
    )
    splits = load_splits(rt_csv(args.csv, args.train, test=0), seed=0)
    failures = []
    minilm = run(
        "MiniLM-L6 ZeRO-2 bf16",
        args.model,
        splits,
        {**HP, "num_train_epochs": 2},
        64,
        args.peak_tflops,
        device,
    )
    if device == "cuda" and minilm["accuracy"] < 0.7:
        failures.append(f"MiniLM validation accuracy {minilm['accuracy']:.3f} < 0.7")
    with tempfile.TemporaryDirectory() as folder:
        n = llama_folder(args.model, folder, tiny=device == "cpu")
        print(f"Llama-style model from a config: {n / 1e6:.0f}M parameters (random weights)")
        for batch in (16, 128):
            big = run(
                f"Llama-0.5B ZeRO-2 bf16 batch {batch}",
                folder,
                splits,
                {
                    **HP,
                    "per_device_train_batch_size": batch,
                    "max_steps": 90,
                    "learning_rate": 1e-5,
                },
                128,
                args.peak_tflops,
                device,
                eval_every=30,
            )
            if not big["samples_s"] > 0:
                failures.append(f"Llama-0.5B batch {batch} trained no samples")
    torch.distributed.destroy_process_group()
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
