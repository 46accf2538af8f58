"""The arithmetic a DDP or single-process trial trains in: bf16 autocast, or fp32.

``distributed.precision: auto`` (the default) picks bf16 where the device does
bf16 matrix products natively and fp32 elsewhere:

- an NVIDIA GPU of compute capability 8.0 or later (Ampere, Ada, Hopper, ...); not a
  V100 (7.0) or T4 (7.5), where ``torch.cuda.is_bf16_supported()`` says yes by
  default because it counts bf16 *emulated* in fp32 units, which is slower than fp32;
- an AMD GPU (ROCm) whose bf16 torch reports as native;
- a CPU with AVX512-BF16 or AMX tiles (Intel Cooper Lake / Sapphire Rapids and
  later, AMD Zen 4 and later).

bf16 here is *autocast*: the weights, gradients and AdamW state stay fp32, and
only the matrix products run in bf16 (softmax, layer norm and the loss stay
fp32, as ``torch.autocast`` lists them). Nothing in a checkpoint changes.
Measured on this project's CPU (AMD EPYC, AVX512-BF16), MiniLM, one thread,
batch 16: a training step 591 -> 406 ms (1.5x), evaluation 1.6x (DECISIONS 42).

DeepSpeed trials do not use this: their engine's own ``bf16``/``fp16`` config
(``distributed.deepspeed.precision``) holds the weights in half precision.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch

Precision = Literal["bf16", "fp32"]
#: the first NVIDIA compute capability with bf16 tensor cores
AMPERE = (8, 0)


def native_bf16(device: Any) -> bool:
    """Does ``device`` do bf16 matrix products in hardware?"""
    kind = torch.device(device).type
    try:
        if kind == "cuda":
            if torch.version.hip:  # ROCm: capability numbers are not NVIDIA's
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            return torch.cuda.get_device_capability(device) >= AMPERE
        if kind == "cpu":  # private, but the only probes torch has (both plain CPUID reads)
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


def resolve(setting: str, device: Any) -> Precision:
    """``auto`` made concrete for ``device``; ``bf16`` and ``fp32`` as given."""
    if setting == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if setting not in ("bf16", "fp32"):
        raise ValueError(f"distributed.precision: {setting!r} is not auto, bf16 or fp32")
    return setting  # type: ignore[return-value]


def autocast(precision: Precision, device: Any) -> AbstractContextManager[Any]:
    """The context a forward pass runs in (training and evaluation alike)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
