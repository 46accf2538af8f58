#!/usr/bin/env bash
# GPU checks on a lent H100/H200 (under 9 minutes): the DeepSpeed path, then causal-LM
# fine-tuning (scripts/gpu_llm_check.py: SmolLM2 full and LoRA, a 515M Llama full).
# Needs: torch with CUDA, transformers, deepspeed (installed from .gpucheck/wheels when
# missing: the device has no network), and the MiniLM folder + Rotten Tomatoes csv that
# `make gpucheck-files` puts in .gpucheck/ (carry ".gpucheck" to the device).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the lent machine's python3 holds its CUDA torch
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links .gpucheck/wheels deepspeed
fi
if ! "$PY" -c "import peft" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --find-links .gpucheck/wheels peft
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 290 "$PY" scripts/gpu_check.py --model .gpucheck/model --csv .gpucheck/rt.csv "$@"
timeout 240 "$PY" scripts/gpu_llm_check.py --smollm2 .gpucheck/smollm2 --csv .gpucheck/rt.csv
