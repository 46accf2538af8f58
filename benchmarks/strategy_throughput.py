"""Training throughput of one trial, three ways, side by side in one run.

Same model (MiniLM-L6), data, effective batch (16) and fp32 math:
  * a 2-worker DeepSpeed trial (ZeRO-2; --stage to change), 8 per worker;
  * a 2-worker DDP trial, 8 per worker;
  * the plain loop in one process (two threads), 16 per step.
Samples/s is the loop's own figure for the second evaluation interval (worker
start, tokenization and the first interval's warm-up excluded).

    .venv/bin/python benchmarks/strategy_throughput.py [--steps 40] [--stage 2]
"""

from __future__ import annotations

import argparse

from trainers import metrics as M


def spec_for(strategy: str, stage: int, steps: int, workers: int, batch: int):
    from tune_jobs.spec import parse_spec

    return parse_spec(
        {
            "model": {"max_length": 64},
            "data": {"max_train_samples": 1024, "max_eval_samples": 64},
            "training": {
                "max_steps": steps,
                "per_device_train_batch_size": batch,
                "eval_steps": steps // 2,
            },
            "scheduler": {"type": "fifo", "time_attr": "step"},
            "resources": {"num_workers": workers, "cpus_per_worker": 0.49 if workers > 1 else 1},
            "distributed": {
                "strategy": strategy,
                "deepspeed": {"zero_stage": stage, "precision": "fp32"},
            },
            "run": {"name": "throughput"},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    import tempfile

    import ray

    from cluster.connect import connect, disconnect
    from trainers.data import load_splits
    from trainers.loop import run_local
    from tune_jobs.groups import WarmGroup, run_on_group
    from tune_jobs.run import trial_resources
    from tune_jobs.space import trial_hparams
    from tune_jobs.trial import TrialPlan, loop_config

    single = spec_for("ddp", args.stage, args.steps, 1, 16)
    splits = load_splits(single.data.model_dump(), seed=0)
    figures = {}
    connect(None, 2)
    try:
        ref = ray.put(splits)
        for label, strategy in (
            (f"2-worker DeepSpeed ZeRO-{args.stage}", "deepspeed"),
            ("2-worker DDP", "ddp"),
        ):
            spec = spec_for(strategy, args.stage, args.steps, 2, 8)
            plan = TrialPlan(
                spec, ref, tempfile.mkdtemp(prefix="throughput-"), trial_resources(spec)
            )
            hp = {**trial_hparams(spec, {}), "save_checkpoints": False}
            name = label.replace(" ", "-")
            group = WarmGroup(plan, name)
            try:
                reports = [m for m, _ in run_on_group(group, plan, hp, name)]
            finally:
                group.close()
            figures[label] = reports[-1][M.SAMPLES_PER_SECOND]
    finally:
        disconnect()
    cfg = loop_config(
        single,
        {**trial_hparams(single, {}), "save_checkpoints": False},
        splits,
        trial_resources(single),
    )
    cfg = cfg.replace(threads=2)
    ctx = run_local(cfg)
    figures["single process (2 threads)"] = ctx.reports[-1][M.SAMPLES_PER_SECOND]
    base = figures["2-worker DDP"]
    print(f"MiniLM-L6, effective batch 16, max length 64, fp32, {args.steps} steps; samples/s:")
    for label, value in figures.items():
        print(f"  {label:<28} {value:7.1f}  ({value / base:.2f}x DDP)")


if __name__ == "__main__":
    main()
