"""Where a DeepSpeed ZeRO-2 optimizer step spends its time on one GPU (issue 11).

The GPU check (``scripts/gpu_check.py``) found the step time of a 515M Llama-style
model hardly moving with the batch (165 ms at 16 rows, 189 ms at 128): a fixed cost
per step. This script times, on the same model and batch, one training step of

* plain torch: bf16 autocast, fused AdamW, gradient clipping;
* the DeepSpeed engine as ``trainers/ds_engine.py`` builds it (ZeRO-2, bf16, client
  optimizer from ``trainers/optim.py``);

then profiles a few DeepSpeed steps and prints the operators that take the time.

    python scripts/gpu_step_profile.py --model DIR [--steps 20] [--batch 16]

``--cpu-dry-run`` checks the script on a CPU (a tiny model, fp32, gloo).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_check import llama_folder  # noqa: E402  (scripts/ is on the path)
from gpu_loop_check import HP as LOOP_HP  # noqa: E402

from trainers import ds_engine  # noqa: E402
from trainers.config import HParams  # noqa: E402
from trainers.optim import build_optimizer  # noqa: E402

# the loop check's hyperparameters, at the GPU check's Llama settings
HP = HParams.from_dict(
    {**LOOP_HP, "learning_rate": 1e-5, "per_device_train_batch_size": 16, "warmup_ratio": 0.0}
)


def batch_of(rows: int, length: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(5, vocab, (rows, length), generator=g).to(device),
        "attention_mask": torch.ones(rows, length, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (rows,), generator=g).to(device),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_steps(folder: str, batch: dict, steps: int, device: str) -> float:
    """Seconds per step: torch alone (autocast bf16 on a GPU)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device)
    opt = build_optimizer(model, HP)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def deepspeed_engine(folder: str, device: str):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device)
    opt = build_optimizer(model, HP)
    settings = {
        "zero_stage": 2,
        "offload_optimizer": False,
        "offload_params": False,
        "precision": "bf16" if device == "cuda" else "fp32",
        "config": {},
    }
    return ds_engine.initialize(model, opt, HP.to_dict(), settings, 1, device)


def ds_step(engine, batch: dict) -> None:
    engine.set_gradient_accumulation_boundary(True)
    loss = engine(**batch).loss.float()
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a tokenizer folder (all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    torch.distributed.init_process_group(
        "nccl" if device == "cuda" else "gloo", rank=0, world_size=1
    )
    with tempfile.TemporaryDirectory() as folder:
        n = llama_folder(args.model, folder, tiny=device == "cpu")
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(folder).vocab_size
        batch = batch_of(args.batch, args.length, vocab, device)
        plain = plain_steps(folder, batch, args.steps, device)
        print(f"{n / 1e6:.0f}M params, batch {args.batch} x {args.length} tokens", flush=True)
        print(f"plain torch (autocast, fused AdamW): {plain * 1000:.1f} ms/step", flush=True)
        engine = deepspeed_engine(folder, device)
        for _ in range(3):
            ds_step(engine, batch)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            ds_step(engine, batch)
        sync(device)
        ds = (time.perf_counter() - start) / args.steps
        print(
            f"DeepSpeed ZeRO-2 engine: {ds * 1000:.1f} ms/step ({ds / plain:.2f}x plain); "
            f"optimizer {type(engine.optimizer).__name__} over "
            f"{type(getattr(engine.optimizer, 'optimizer', engine.optimizer)).__name__}",
            flush=True,
        )
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                ds_step(engine, batch)
            sync(device)
        for key in ("self_cpu_time_total", "self_device_time_total" if device == "cuda" else None):
            if key:
                print(f"--- top operators by {key} (5 DeepSpeed steps)")
                print(
                    prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
                )
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
