"""Scale, simulated: hundreds of multi-GPU trials under tunefleet's ASHA and PBT on a Ray
cluster of fake GPU nodes.

No GPU is here, so the trials are the one mock: each reserves what a tunefleet trial of
``GPUS_PER_TRIAL`` one-GPU workers reserves (the trial bundle and a bundle per worker, the
real ``TrialResources`` arithmetic) on nodes that advertise GPUs they do not have, and
reports a synthetic learning curve (its quality set by how far its learning rate is from
a hidden optimum, plus noise) instead of training. Everything else is tunefleet's: the
job spec, the scheduler and search algorithm built from it (``RungASHA`` deciding on the
loss, PBT mutating the learning rate and the schedule), the budget gate, the report log,
the trial summaries. Checked and measured:

- no deadlock: the sweep ends within its timeout with every trial TERMINATED;
- every trial accounted for: the summaries count every trial Tune made, each with the
  reports it made;
- the scheduler's time per decision (its ``on_trial_result``, timed around the call);
- the driver's memory (RSS) after the first tenth of the results and at the end.

    .venv/bin/python benchmarks/scale_sim.py [--trials 300] [--pbt-trials 48] [--pbt-epochs 3]
        [--nodes 4] [--out FILE]

``simulate`` is also what ``tests/tune_jobs/test_scale_sim.py`` runs, at a smaller size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GPUS_PER_NODE = 8
GPUS_PER_TRIAL = 4  # four one-GPU workers, as resources.num_workers: 4, gpus_per_worker: 1
BEST_LR = 6e-5  # the synthetic optimum


def job_spec(scheduler: str, trials: int, storage: str, epochs: float = 3.0) -> Any:
    """A tunefleet job spec for the simulated sweep (trials of ``epochs``)."""
    from tune_jobs.spec import parse_spec

    sched: dict[str, Any] = {"type": "asha", "reduction_factor": 3}
    if scheduler == "pbt":
        sched = {
            "type": "pbt",
            "perturbation_interval": 0.5,
            "mutations": {
                "learning_rate": {"loguniform": [1e-5, 3e-4]},
                "lr_scheduler_type": {"choice": ["linear", "cosine"]},
            },
        }
    return parse_spec(
        {
            "training": {"num_train_epochs": epochs},
            "search": {
                "num_samples": trials,
                "space": {"learning_rate": {"loguniform": [1e-5, 3e-4]}},
                "start_with_defaults": False,
            },
            "scheduler": sched,
            "resources": {
                "num_workers": GPUS_PER_TRIAL,
                "gpus_per_worker": 1,
                "cpus_per_worker": 0.01,
            },
            "run": {"name": f"sim-{scheduler}", "storage_path": storage},
        }
    )


def synthetic_trial(config: dict[str, Any]) -> None:
    """A training curve without training: reports every eighth of an epoch for
    ``config["ticks"]`` eighths (3 epochs unless told), checkpointing (a tiny JSON) every
    half epoch so PBT can exploit and a restore continue."""
    from ray import tune

    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder, open(os.path.join(folder, "state.json")) as fh:
            start = json.load(fh)["tick"]
    quality = math.exp(-abs(math.log(config["learning_rate"] / BEST_LR)))  # 1 at the optimum
    noise = random.Random(hash(config["learning_rate"]))
    ticks = int(config.get("ticks", 24))
    for tick in range(start + 1, ticks + 1):
        time.sleep(config.get("tick_s", 0.02))
        epoch = tick / 8
        accuracy = 0.5 + 0.4 * quality * (1 - math.exp(-epoch)) + noise.gauss(0, 0.005)
        metrics = {
            "eval_accuracy": accuracy,
            "eval_loss": 0.7 - 0.5 * quality * (1 - math.exp(-epoch)) + noise.gauss(0, 0.005),
            "epoch": epoch,
            "step": tick * 10,
            "total_steps": ticks * 10,  # what a tunefleet trial reports: its budget in steps
        }
        if tick % 4:  # a checkpoint every half epoch (PBT's interval), as a trial writes
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "state.json"), "w") as fh:
                json.dump({"tick": tick}, fh)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def MemoryLog() -> Any:  # noqa: N802 - a Tune callback made where ray.tune is imported
    """The driver's RSS every 50 results (pickles without a process handle: Tune pickles
    its callbacks)."""
    from ray import tune

    class _MemoryLog(tune.Callback):
        def __init__(self) -> None:
            self.seen = 0
            self.rows: list[tuple[int, int]] = []  # (results so far, RSS bytes)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            import psutil

            self.seen += 1
            if self.seen % 50 == 0:
                self.rows.append((self.seen, psutil.Process().memory_info().rss))

    return _MemoryLog()


class Timed:
    """Times a scheduler's ``on_trial_result`` (the decision a result asks for)."""

    def __init__(self, scheduler: Any) -> None:
        self.seconds: list[float] = []
        inner = scheduler.on_trial_result

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - started)

        scheduler.on_trial_result = timed


def simulate(
    scheduler: str,
    trials: int,
    storage: str,
    timeout_s: float = 1800,
    tick_s: float = 0.02,
    epochs: float = 3.0,
) -> dict[str, Any]:
    """One simulated sweep on the Ray this process is connected to (trials of ``epochs``);
    its figures."""
    import psutil
    from ray import tune

    from tune_jobs import layout
    from tune_jobs.report_log import ReportLog, read_all_reports
    from tune_jobs.results import summarize_trial
    from tune_jobs.run import trial_resources
    from tune_jobs.schedulers import build_scheduler, build_search_alg
    from tune_jobs.space import param_space

    spec = job_spec(scheduler, trials, storage, epochs)
    res = trial_resources(spec)
    sched = build_scheduler(spec)
    timed = Timed(sched)
    run_dir = os.path.join(storage, spec.run.name)
    memory = MemoryLog()

    tuner = tune.Tuner(
        tune.with_resources(synthetic_trial, tune.PlacementGroupFactory(res.bundles())),
        param_space={**param_space(spec), "tick_s": tick_s, "ticks": round(8 * epochs)},
        tune_config=tune.TuneConfig(
            metric=spec.search.metric,
            mode=spec.search.resolved_mode,
            scheduler=sched,
            search_alg=None if scheduler == "pbt" else build_search_alg(spec, [], None),
            num_samples=trials,
            trial_name_creator=layout.trial_name,
            trial_dirname_creator=layout.trial_name,
            time_budget_s=timeout_s,
        ),
        run_config=tune.RunConfig(
            name=spec.run.name,
            storage_path=storage,
            callbacks=[ReportLog(run_dir), memory],
            verbose=0,
        ),
    )
    started = time.monotonic()
    grid = tuner.fit()
    wall = time.monotonic() - started
    reports = read_all_reports(run_dir)
    summaries = [
        summarize_trial(
            r,
            spec.search.metric,
            spec.search.resolved_mode,
            reports.get(os.path.basename(r.path), []),
        )
        for r in grid
    ]
    statuses: dict[str, int] = {}
    for s in summaries:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    decisions = sorted(timed.seconds)
    tenth = next((rss for seen, rss in memory.rows if seen >= len(decisions) / 10), None)
    return {
        "scheduler": scheduler,
        "epochs": epochs,
        "trials_planned": trials,
        "trials_made": len(grid),
        "trials_summarized": len(summaries),
        "statuses": statuses,
        "stopped_early": sum(s.stopped_early for s in summaries),
        "ran_to_the_end": sum(float(s.last.get("epoch") or 0) >= epochs for s in summaries),
        "reports": sum(len(rows) for rows in reports.values()),
        "wall_s": round(wall, 1),
        "timed_out": wall >= timeout_s,
        "decisions": len(decisions),
        "decision_ms_median": round(1000 * decisions[len(decisions) // 2], 3)
        if decisions
        else None,
        "decision_ms_p99": round(1000 * decisions[int(len(decisions) * 0.99)], 3)
        if decisions
        else None,
        "decision_ms_max": round(1000 * decisions[-1], 3) if decisions else None,
        "driver_rss_mb_after_a_tenth": round(tenth / 2**20, 1) if tenth else None,
        "driver_rss_mb_at_end": round(psutil.Process().memory_info().rss / 2**20, 1),
        "gpus_per_trial": GPUS_PER_TRIAL,
    }


def start_cluster(nodes: int) -> Any:
    """A local Ray cluster: a head with no GPU and ``nodes`` fake GPU nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=GPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300, help="ASHA's trials")
    parser.add_argument(
        "--pbt-trials",
        type=int,
        default=48,
        help="PBT's population (members beyond what runs at once are paused and resumed "
        "at every interval: a second or two each here)",
    )
    parser.add_argument(
        "--pbt-epochs",
        type=float,
        default=3.0,
        help="each PBT member's epochs (an exploit every half epoch)",
    )
    parser.add_argument("--timeout-s", type=int, default=1800, help="per sweep")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks", "results", "scale_sim.json")
    )
    args = parser.parse_args()
    import ray

    cluster = start_cluster(args.nodes)
    ray.init(address=cluster.address, log_to_driver=False)
    report: dict[str, Any] = {
        "benchmark": "scale_sim",
        "nodes": args.nodes,
        "gpus": args.nodes * GPUS_PER_NODE,
        "runs": [],
    }
    try:
        for scheduler, trials in (("asha", args.trials), ("pbt", args.pbt_trials)):
            if trials <= 0:  # 0: that scheduler not run
                continue
            with tempfile.TemporaryDirectory() as storage:
                epochs = args.pbt_epochs if scheduler == "pbt" else 3.0
                row = simulate(scheduler, trials, storage, timeout_s=args.timeout_s, epochs=epochs)
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
