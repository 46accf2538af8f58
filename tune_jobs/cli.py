"""Command line: ``tunefleet run|validate CONFIG [key=value ...]``, ``tunefleet resume RUN_DIR``, ...

Bad input (spec, data, resources) prints one screen naming the key and exits 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

#: the registry lock's expiry for a rollback (s): two small writes, done in seconds
ROLLBACK_LOCK_TTL_S = 600.0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3  # retrain: another retrain holds the registry lock
EXIT_DETACHED = 130  # Ctrl-C while following a submitted job: it goes on

#: ``CONFIG`` of the form ``env:NAME`` reads the spec's YAML from that variable
#: (how ``tunefleet submit`` hands the resolved spec to the job).
ENV_CONFIG_PREFIX = "env:"


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


def load_config(config: str, overrides: list[str]) -> Any:
    """The validated job spec from a path, a shipped name or ``env:NAME``."""
    from tune_jobs.spec import Problem, SpecError, load_spec, load_spec_text

    if config.startswith(ENV_CONFIG_PREFIX):
        name = config[len(ENV_CONFIG_PREFIX) :]
        text = os.environ.get(name)
        if text is None:
            raise SpecError([Problem("CONFIG", config, f"environment variable {name} is not set")])
        return load_spec_text(text, overrides, source=config)
    return load_spec(resolve_config(config), overrides)


VERBOSE_HELP = (
    "Ray Tune's own progress tables and Ray's output in the terminal (by default they go to "
    "<run folder>/logs/driver.log and the terminal shows tunefleet's live console)"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also documents the CLI in --help)."""
    parser = argparse.ArgumentParser(
        prog="tunefleet",
        description="Hyperparameter search for fine-tuning Hugging Face models on Ray Tune + Ray Train.",
        epilog=f"Shipped configs: {', '.join(sorted(shipped_configs()))}. Exit codes: 0 ok, 1 run "
        "failed, 2 bad input, 3 another retrain holds the registry lock.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("run", "validate the job spec, then run the sweep and export the best model"),
        ("validate", "check a job spec (and its data) without starting Ray"),
        (
            "smoke",
            "run only the smoke pass: the pipeline on a small subset, a few steps, 1-2 trials",
        ),
        (
            "retrain",
            "the scheduled job: sweep on today's data (warm-started from the champion), score "
            "the new best and the champion on the same held-out promotion rows, promote only a "
            "better model",
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
            p.add_argument(
                "--no-data",
                action="store_true",
                help="skip loading the data and the model (check the spec and storage only)",
            )
            p.add_argument(
                "--retrain", action="store_true", help="also check what tunefleet retrain needs"
            )
        if name == "retrain":
            p.add_argument(
                "--show",
                action="store_true",
                help="print the registry (champion, history) and exit",
            )
        if name in ("run", "retrain", "smoke"):
            p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        if name in ("run", "retrain"):
            p.add_argument(
                "--no-smoke",
                action="store_true",
                help="skip the smoke pass (on by default for cluster runs: smoke.enabled=auto)",
            )
    submit = sub.add_parser(
        "submit",
        help="validate here, then run the sweep on a Ray cluster as a Ray job and follow it",
        description="validate the spec here (exit 2, nothing submitted, on bad input), upload the "
        "working dir and the resolved spec, start `python -m tune_jobs run` as a Ray job, and "
        "follow its logs; exit 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED, 130 "
        "when Ctrl-C detached from a job that goes on",
    )
    submit.add_argument("config", metavar="CONFIG", help="job spec YAML, or a shipped config name")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is accepted")
    submit.add_argument(
        "--no-smoke", action="store_true", help="skip the smoke pass on the cluster"
    )
    submit.add_argument(
        "--working-dir", default=".", help="folder uploaded as the job's working dir (default: .)"
    )
    submit.add_argument(
        "--retrain",
        action="store_true",
        help="run `tunefleet retrain` on the cluster instead of a plain sweep (the spec must "
        "then have a promotion set; checked here first)",
    )
    for name, text in (
        ("logs", "print a submitted job's logs (--follow: until it ends)"),
        ("stop", "stop a submitted job and wait until it has ended"),
        ("status", "print a submitted job's status"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("job_id", metavar="JOB_ID", help="as printed by tunefleet submit")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    for p in (submit, *(sub.choices[n] for n in ("logs", "stop", "status"))):
        p.add_argument(
            "--address",
            default=None,
            help="the cluster's dashboard, e.g. http://127.0.0.1:8265 "
            "(default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)",
        )
        p.add_argument(
            "--token-file",
            default=None,
            help="file holding the cluster's auth token (default: RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); never printed",
        )
    registry = sub.add_parser(
        "registry",
        help="print the retrain registry under a storage root: the champion and every retrain",
        description="print the champion and the history of retrains kept under ROOT/registry",
    )
    registry.add_argument("root", metavar="ROOT", help="the storage root (run.storage_path)")
    registry.add_argument(
        "--rollback",
        nargs="?",
        const="",
        default=None,
        metavar="RUN",
        help="make an earlier promoted model the champion again: RUN's, or (no RUN) the one "
        "promoted before the current champion; recorded in the history, under the lock",
    )
    registry.add_argument(
        "--lock-ttl-s",
        type=float,
        default=ROLLBACK_LOCK_TTL_S,
        metavar="S",
        help="--rollback: the registry lock's expiry (a rollback is two small writes; one "
        f"that crashed blocks retrains at most this long; default {ROLLBACK_LOCK_TTL_S:g})",
    )
    resume = sub.add_parser(
        "resume",
        help="continue a run whose driver died (killed, preempted): finished trials are kept, "
        "unfinished ones continue from their checkpoints",
        description="continue the run in RUN_DIR (Tune's restore; the spec is the run's own "
        "job_spec.yaml, its name and storage taken from the folder); trials that finished are "
        "not re-run, unfinished ones continue from their last checkpoints",
    )
    resume.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (holds job_spec.yaml)")
    resume.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    resume.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides of the run's spec, e.g. resources.max_concurrent_trials=2",
    )
    report = sub.add_parser(
        "report",
        help="write a run's report: report.html (self-contained) and report.md, from its folder",
        description="read the run folder RUN_DIR (local or a URI; finished, running or stopped) "
        "and write report.html (one file, pictures inline, opens without a network) and "
        "report.md with its pictures in report_files/; a run still in progress gives a "
        "partial report that says so",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (holds job_spec.yaml)")
    report.add_argument(
        "--out", default=None, metavar="DIR", help="write here instead of into the run folder"
    )
    replay = sub.add_parser(
        "replay",
        help="retrain a PBT trial from scratch following the schedule of hyperparameters PBT found",
        description="retrain a PBT trial from scratch following its schedule (Tune's PBT replay)",
    )
    replay.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (holds job_spec.yaml)")
    replay.add_argument("trial", metavar="TRIAL", help="trial name, e.g. trial_00003")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; overrides may also follow the options (``run CONFIG --no-smoke key=value``),
    which plain argparse refuses once an option has ended the ``key=value`` list."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # after an option, a bare word is an override (its missing "=" is reported by the spec)
    late = [x for x in extra if not x.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [x for x in extra if x not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tunefleet`` console script."""
    args = parse_args(argv)
    if args.command in ("run", "smoke", "retrain", "resume"):
        # Kubernetes stops a pod with SIGTERM: unwind (release the retrain lock, shut the
        # local Ray down) instead of dying on the spot. cluster.connect keeps this handler
        # across ray.init, and cancels the abort Ray's own C++ handler arms for 3 s later.
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    from cluster.resources import ResourceError
    from cluster.submit import SubmitError
    from trainers.data import DataError
    from trainers.model import ModelError
    from tune_jobs import console
    from tune_jobs.paths import with_absolute_paths
    from tune_jobs.registry import RegistryError, RegistryLocked
    from tune_jobs.run import RunFailed
    from tune_jobs.smoke import SmokeError
    from tune_jobs.spec import SpecError

    try:
        if args.command == "replay":
            from tune_jobs.replay import replay

            replay(args.run_dir, args.trial)
            return 0
        if args.command in ("logs", "stop", "status"):
            return job_command(args)
        if args.command == "report":
            return report_command(args.run_dir, args.out)
        if args.command == "registry":
            return registry_command(args.root, args.rollback, args.lock_ttl_s)
        if args.command == "resume":
            from tune_jobs.run import resume_spec, run_job

            spec = with_absolute_paths(resume_spec(args.run_dir, args.overrides))
            with console.session(args.verbose) as out:
                run_job(spec, echo=out.echo)
            return 0
        spec = load_config(args.config, args.overrides)
        if args.command == "submit":
            return submit_command(args, spec)  # relative paths are the cluster's to resolve
        # every local path absolute, relative to here: workers run elsewhere (tune_jobs.paths)
        spec = with_absolute_paths(spec)
        if args.command == "validate":
            if args.retrain:
                from tune_jobs.retrain import check_retrain_spec

                check_retrain_spec(spec)
            from tune_jobs.preflight import load_data, preflight

            splits = None if args.no_data else load_data(spec)
            preflight(spec, splits, model=not args.no_data)
            if splits is not None:
                print(
                    f"data ok: train {len(splits.train)} / validation {len(splits.validation)} / test {len(splits.test)}"
                )
                print(f"model ok: {spec.model.name_or_path}")
            print(f"{args.config}: valid")
            return 0
        from tune_jobs.run import run_job
        from tune_jobs.smoke import run_smoke

        if args.command == "retrain":
            return retrain_command(args, spec)
        with console.session(args.verbose) as out:
            if args.command == "smoke":
                run_smoke(spec, echo=out.echo)
                return 0
            smoked = None
            if not args.no_smoke and smoke_enabled(spec):
                smoked = run_smoke(spec, echo=out.echo, keep_ray=True)
            # the smoke pass measured what a trial costs: search.budget is checked against it
            run_job(spec, echo=out.echo, trial_cost=smoked.cost if smoked else None)
        return 0
    except (SpecError, DataError, ResourceError, ModelError) as exc:
        print(f"tunefleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SubmitError as exc:
        print(f"tunefleet: error: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except RunFailed as exc:
        print(f"tunefleet: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except SmokeError as exc:
        print(f"tunefleet: {exc}\n(fix it, or skip the pass with --no-smoke)", file=sys.stderr)
        return EXIT_RUN_FAILED
    except RegistryLocked as exc:
        print(
            f"tunefleet: retrain refused: {exc}. Nothing was started; the running retrain "
            "goes on (a crashed one's lock expires: retrain.lock_ttl_s)",
            file=sys.stderr,
        )
        return EXIT_LOCKED
    except RegistryError as exc:
        print(f"tunefleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def retrain_command(args: argparse.Namespace, spec: Any) -> int:
    """``tunefleet retrain``: one scheduled retrain (or, with --show, the registry)."""
    from tune_jobs import console
    from tune_jobs.retrain import retrain
    from tune_jobs.smoke import run_smoke

    if args.show:
        return registry_command(spec.run.storage_path, None)
    with console.session(args.verbose) as out:
        smoke = None
        if not args.no_smoke and smoke_enabled(spec):
            smoke = lambda run_spec: run_smoke(run_spec, echo=out.echo, keep_ray=True)  # noqa: E731
        retrain(spec, echo=out.echo, before_sweep=smoke)
    return 0


def report_command(run_dir: str, out: str | None) -> int:
    """``tunefleet report RUN_DIR [--out DIR]``."""
    from tune_jobs.report import write_report

    files = write_report(run_dir, out)
    view = files.view
    print(
        f"{view.name}: {view.state}, {len(view.reports)} trial(s) reported"
        + (f", {len(view.failures)} failed" if view.failures else "")
    )
    print(f"report: {files.html}\nmarkdown: {files.markdown}")
    return 0


def registry_command(
    root: str, rollback: str | None, lock_ttl_s: float = ROLLBACK_LOCK_TTL_S
) -> int:
    """``tunefleet registry ROOT [--rollback [RUN]] [--lock-ttl-s S]``."""
    import getpass

    from tune_jobs.registry import Registry
    from tune_jobs.tables import registry_table

    reg = Registry(root)
    if rollback is not None:
        with reg.lock(ttl_s=lock_ttl_s):
            record = reg.rollback(rollback or None, by=getpass.getuser())
        print(f"champion is now {record['run']} ({record['export_dir']})")
    print(registry_table(reg.champion(), reg.history()))
    return 0


def submit_command(args: argparse.Namespace, spec: Any) -> int:
    """``tunefleet submit``: the spec is valid here; submit it and (unless --no-wait) follow."""
    from cluster import submit as jobs
    from tune_jobs.paths import check_shipped

    # The job connects to its own cluster: an address in the spec means nothing there.
    spec = spec.model_copy(update={"run": spec.run.model_copy(update={"address": None})})
    command = "retrain" if args.retrain else "run"
    if args.retrain:
        from tune_jobs.retrain import check_retrain_spec

        check_retrain_spec(spec)
    uploaded = jobs.uploaded_files(args.working_dir)
    check_shipped(spec, args.working_dir, uploaded)  # before the token, the cluster, the upload
    auth = jobs.use_token(args.token_file)
    files, size = jobs.check_upload(args.working_dir, uploaded)
    print(
        f"submitting to {args.address or 'RAY_API_SERVER_ADDRESS/RAY_ADDRESS'} ({auth}); "
        f"uploading {args.working_dir} ({files} files, {size / 2**20:.1f} MiB)",
        flush=True,
    )
    job = jobs.submit(args.address, spec.to_yaml(), args.working_dir, args.no_smoke, command)
    flags = f"--address {job.address}"
    print(
        f"job {job.job_id} submitted\n"
        f"  follow: tunefleet logs {job.job_id} --follow {flags}\n"
        f"  stop:   tunefleet stop {job.job_id} {flags}",
        flush=True,
    )
    if args.no_wait:
        return 0
    try:
        final = jobs.follow(job.address, job.job_id)
    except KeyboardInterrupt:
        print(
            f"\ntunefleet: detached; job {job.job_id} goes on on the cluster "
            f"(tunefleet logs {job.job_id} --follow {flags}; tunefleet stop {job.job_id} {flags})",
            file=sys.stderr,
        )
        return EXIT_DETACHED
    print(f"job {job.job_id}: {final}", flush=True)
    return 0 if final == "SUCCEEDED" else EXIT_RUN_FAILED


def job_command(args: argparse.Namespace) -> int:
    """``tunefleet logs|stop|status JOB_ID``."""
    from cluster import submit as jobs

    jobs.use_token(args.token_file)
    if args.command == "stop":
        final = jobs.stop(args.address, args.job_id)
        print(f"job {args.job_id}: {final}")
        return 0 if final in jobs.TERMINAL else EXIT_RUN_FAILED
    if args.command == "logs" and args.follow:
        try:
            final = jobs.follow(args.address, args.job_id)
        except KeyboardInterrupt:
            print(f"\ntunefleet: detached; job {args.job_id} goes on", file=sys.stderr)
            return EXIT_DETACHED
        print(f"job {args.job_id}: {final}")
        return 0
    if args.command == "logs":
        print(jobs.logs(args.address, args.job_id), end="")
        return 0
    state, message = jobs.status(args.address, args.job_id)
    print(f"job {args.job_id}: {state}" + (f" ({message})" if message else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
