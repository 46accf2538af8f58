"""Command line: ``tunefleet run|validate CONFIG [key=value ...]``.

Bad input (spec, data, resources) prints one screen naming the key and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2


def smoke_enabled(spec: Any) -> bool:
    """smoke.enabled, where auto means: on for cluster runs, off for the local debug mode."""
    if spec.smoke.enabled == "auto":
        return bool(spec.run.address or os.environ.get("RAY_ADDRESS"))
    return bool(spec.smoke.enabled)


def shipped_configs() -> dict[str, str]:
    """Name -> path of the job specs shipped in ``tune_jobs/configs``."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    return {
        n.removesuffix(".yaml"): os.path.join(folder, n)
        for n in sorted(os.listdir(folder))
        if n.endswith(".yaml")
    }


def resolve_config(name_or_path: str) -> str:
    """A spec path, or the name of a shipped spec (``debug-local``)."""
    if os.path.exists(name_or_path):
        return name_or_path
    return shipped_configs().get(name_or_path.removesuffix(".yaml"), name_or_path)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also documents the CLI in --help)."""
    parser = argparse.ArgumentParser(
        prog="tunefleet",
        description="Hyperparameter search for fine-tuning Hugging Face models on Ray Tune + Ray Train.",
        epilog=f"Shipped configs: {', '.join(sorted(shipped_configs()))}. Exit codes: 0 ok, 1 run failed, 2 bad input.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("run", "validate the job spec, then run the sweep and export the best model"),
        ("validate", "check a job spec (and its data) without starting Ray"),
        (
            "smoke",
            "run only the smoke pass: the pipeline on a small subset, a few steps, 1-2 trials",
        ),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", metavar="CONFIG", help="job spec YAML, or a shipped config name")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. search.num_samples=8",
        )
        if name == "validate":
            p.add_argument("--no-data", action="store_true", help="skip loading the data")
        if name == "run":
            p.add_argument(
                "--no-smoke",
                action="store_true",
                help="skip the smoke pass (on by default for cluster runs: smoke.enabled=auto)",
            )
    replay = sub.add_parser(
        "replay",
        help="retrain a PBT trial from scratch following the schedule of hyperparameters PBT found",
        description="retrain a PBT trial from scratch following its schedule (Tune's PBT replay)",
    )
    replay.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (holds job_spec.yaml)")
    replay.add_argument("trial", metavar="TRIAL", help="trial name, e.g. trial_00003")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tunefleet`` console script."""
    args = build_parser().parse_args(argv)
    from cluster.resources import ResourceError
    from trainers.data import DataError, load_splits
    from trainers.model import ModelError
    from tune_jobs.smoke import SmokeError
    from tune_jobs.spec import SpecError, load_spec

    try:
        if args.command == "replay":
            from tune_jobs.replay import replay

            replay(args.run_dir, args.trial)
            return 0
        spec = load_spec(resolve_config(args.config), args.overrides)
        if args.command == "validate":
            if not args.no_data:
                splits = load_splits(spec.data.model_dump(), spec.run.seed)
                print(
                    f"data ok: train {len(splits.train)} / validation {len(splits.validation)} / test {len(splits.test)}"
                )
            print(f"{args.config}: valid")
            return 0
        from tune_jobs.run import run_job
        from tune_jobs.smoke import run_smoke

        if args.command == "smoke":
            run_smoke(spec)
            return 0
        if not args.no_smoke and smoke_enabled(spec):
            run_smoke(spec, keep_ray=True)
        run_job(spec)
        return 0
    except (SpecError, DataError, ResourceError, ModelError) as exc:
        print(f"tunefleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SmokeError as exc:
        print(f"tunefleet: {exc}\n(fix it, or skip the pass with --no-smoke)", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
