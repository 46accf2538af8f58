"""One tuning run: validate, connect, sweep with Tune, summarise, export."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cluster import ray_private, storage
from cluster.connect import connect, disconnect
from cluster.resources import (
    ClusterCapacity,
    ResourceError,
    TrialResources,
    autoscaler_can_place,
    capacity_of_running_cluster,
    max_concurrent_trials,
)
from trainers.checkpoint import CorruptCheckpoint
from trainers.data import Splits
from tune_jobs import console, fidelity, layout, results
from tune_jobs.budget import Budget, budget_of, check_affordable, describe_limits, gpus_per_trial
from tune_jobs.budget import describe as describe_budget
from tune_jobs.console import Output, SweepConsole
from tune_jobs.defaults import defaults_point, family_of, model_type_of
from tune_jobs.leader import read_leader
from tune_jobs.lineage import write_lineage
from tune_jobs.paths import check_on_every_node
from tune_jobs.preflight import load_data, preflight
from tune_jobs.report_log import ReportLog, read_all_reports
from tune_jobs.spec import JobSpec, Problem, SpecError
from tune_jobs.tables import leaderboard

log = logging.getLogger("tunefleet")


@dataclass(frozen=True)
class RunOutcome:
    """Where a finished run left its results."""

    run_dir: str
    summary_path: str
    summary: dict[str, Any]
    data_ref: Any = None  # the run's splits in the object store (valid while Ray stays up)
    mlflow: dict[str, Any] | None = None  # what MLflow got (run id, registered version)


def trial_resources(spec: JobSpec) -> TrialResources:
    """The spec's per-trial reservation."""
    r = spec.resources
    return TrialResources(
        r.num_workers,
        r.cpus_per_worker,
        r.gpus_per_worker,
        r.driver_cpus,
        r.trial_mode == "single_process",
        r.placement_strategy,
    )


def local_capacity(spec: JobSpec) -> ClusterCapacity:
    """Capacity of the local debug cluster this run would start."""
    cpus = float(spec.resources.local_num_cpus or os.cpu_count() or 1)
    return ClusterCapacity(cpus=cpus, gpus=0.0, max_node_cpus=cpus, max_node_gpus=0.0)


def resolve_run_name(spec: JobSpec, storage_root: str) -> str:
    """The run folder name under ``if_exists`` (new -> name-2, ...; resume/overwrite -> name)."""
    if spec.run.if_exists == "new":
        return storage.next_free_name(storage_root, spec.run.name)
    return spec.run.name


def defaults_points(spec: JobSpec) -> list[dict[str, Any]]:
    """The defaults trial (as Tune's points_to_evaluate), or none."""
    if not spec.search.start_with_defaults or not spec.search.space:
        return []
    point = defaults_point(
        spec.search.space,
        model_type_of(spec.model.name_or_path),
        in_domain=spec.search.algorithm != "random",
        adapter=spec.adapter.type,
    )
    return [point] if point else []


def unique_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``points`` without repeats and empty points, first occurrence kept."""
    seen, out = set(), []
    for point in points:
        key = repr(sorted(point.items()))
        if point and key not in seen:
            seen.add(key)
            out.append(point)
    return out


def generator_limit(spec: JobSpec, max_concurrent: int) -> int | None:
    """Concurrency limit for the search generator.

    TorchTrainer trials reserve only a sliver for their driver in Tune, so Tune
    alone would start more trials than their worker groups can fit: the limit
    sits on the generator. Single-process trials reserve their worker's
    resources in Tune itself, but a ``resources.max_concurrent_trials`` below
    what fits must still hold, so the limit is there too; except for a
    single-process population (PBT), which may be larger than what runs at once:
    its paused members would count against a generator limit and deadlock it,
    and Tune's resource accounting does the limiting.
    """
    population = spec.scheduler.type in ("pbt", "pb2")
    if spec.resources.trial_mode == "single_process" and population:
        return None
    if spec.resources.trial_mode == "single_process" and spec.scheduler.type == "asha":
        # trials waiting at a rung (scheduler.rung_peers) are paused but count as live:
        # room for that many more, so that the peers they wait for can start (Tune's own
        # resource accounting still runs no more than fit)
        return max_concurrent + spec.scheduler.rung_peers
    return max_concurrent


def check_population_fits(spec: JobSpec, max_concurrent: int) -> None:
    """PBT/PB2 with TorchTrainer trials need the whole population at once."""
    population = spec.scheduler.type in ("pbt", "pb2") and spec.resources.trial_mode == "train"
    size = spec.search.num_trials
    if population and size > max_concurrent:
        grid = f" ({spec.search.num_samples} x the grid)" if size != spec.search.num_samples else ""
        raise ResourceError(
            f"search.num_samples: a {spec.scheduler.type} population of {size}{grid} "
            f"TorchTrainer trials must run at once, but {max_concurrent} fit; use a population "
            f"of {max_concurrent} or resources.trial_mode: single_process"
        )


def tune_checkpoint_config() -> Any:
    """Tune's checkpoints are pointers of a few bytes to what the trials wrote
    (``tune_jobs.warm``): keep them all, and none at a trial's end (what the export needs
    was written when it led; Tune's default would write the full state of every finished
    or stopped trial: measured, 1.3 GB of the 1.9 GB an 8-trial sweep wrote)."""
    from ray import tune

    return tune.CheckpointConfig(num_to_keep=None, checkpoint_at_end=False)


#: Ray Tune copies these from the driver's environment into every trial actor's runtime
#: env, and each node's runtime-env agent writes that env, in plain text, to its log
#: (measured: the S3 test's planted secret key turned up in runtime_env_agent.log). The
#: cluster's nodes hold their own credentials; the driver's must not travel.
CREDENTIAL_VARS = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
)


def set_trial_environment() -> None:
    """What Tune copies from the driver's environment into every trial actor's runtime env
    (and so into the Train controller and its placement-group cleaner): never the cloud
    credentials; always the local cluster's dashboard address (see ``cluster.connect``)."""
    from cluster import ray_private
    from cluster.connect import API_SERVER_ENV

    propagated = ray_private.propagated_env_vars() - CREDENTIAL_VARS
    ray_private.set_propagated_env_vars(propagated | {API_SERVER_ENV})


def build_tuner(
    spec: JobSpec,
    splits_ref: Any,
    storage_root: str,
    run_name: str,
    max_concurrent: int,
    restore: bool,
    points: list[dict[str, Any]] | None = None,
    hp_schedule: tuple[tuple[int, dict[str, Any]], ...] = (),
    output: Output | None = None,
    tracker: Any = None,
    budget: Any = None,
    space: dict[str, Any] | None = None,
    pool: Any = None,
    trial_prefix: str = "",
) -> tuple[Any, Any, SweepConsole | None]:
    """The ``ray.tune.Tuner`` for this run (new or restored), the pool of warm worker
    groups its trials lease (``tune_jobs.groups.GroupPool``; None for single-process
    trials: the caller closes it after the sweep), and the live console (None with
    ``--verbose``: Tune's own reporter). ``points`` are tried first.

    ``hp_schedule`` switches every trial's hyperparameters at those steps (a PBT replay);
    ``tracker``: the sweep's MLflow runs (``tune_jobs.mlflow_tracking.MlflowRuns``), its
    trial runs named ``trial_prefix`` + the trial (a reevaluation's ``reevaluate/``);
    ``budget``: a ``tune_jobs.budget.Budget`` gating new trials and stopping the sweep at
    its limits (a restored run keeps the one it began with, given the spec's limits);
    ``space``: Tune's param space in place of the spec's (a reevaluation's points);
    ``pool``: warm groups to lease from, an earlier sweep's (its owner closes it).
    """
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.stopper import CombinedStopper
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tune_jobs.budget import gate
    from tune_jobs.faults import PopulationGuard
    from tune_jobs.groups import GroupPool
    from tune_jobs.leader import ExportLeader
    from tune_jobs.schedulers import build_scheduler, build_search_alg
    from tune_jobs.space import param_space, trial_hparams
    from tune_jobs.tensorboard import TensorBoard
    from tune_jobs.trial import TrialPlan
    from tune_jobs.warm import WarmTrial

    set_trial_environment()
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the run's callbacks say which
    run_dir = storage.join(storage_root, run_name)
    res = trial_resources(spec)
    # Every trial is a WarmTrial. Multi-worker trials run on warm worker groups that the
    # sweep's pool hosts and each trial actor leases; a single-process trial serves
    # itself (tune_jobs.groups.ProcessGroup). Tune hands an actor (and its group or its
    # loaded model) from trial to trial and to exploits.
    warm = spec.resources.trial_mode == "train"
    plan = TrialPlan(
        spec=spec,
        data_ref=splits_ref,
        train_storage=layout.train_runs(run_dir),
        resources=res,
        hp_schedule=hp_schedule,
        leaderboard=ExportLeader.remote(spec.search.resolved_mode, run_dir),
        failures_dir=layout.failures_dir(run_dir),
    )
    if warm and pool is None:
        pool = GroupPool.options(
            # on the driver's node: it lives and dies with the driver (ray job submit: the head)
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=True
            )
        ).remote(plan, max_concurrent)
    if warm:
        plan = replace(plan, groups=pool)
    trainable = tune.with_resources(tune.with_parameters(WarmTrial, plan=plan), res.trial_bundle())
    metric, mode = spec.search.metric, spec.search.resolved_mode
    output = output or console.active()
    live = None
    if not output.verbose:
        live = SweepConsole(
            output,
            metric,
            mode,
            # what a trial's config holds: the searched keys, and PBT's mutated ones
            searched=list(space)
            if space is not None
            else list(dict.fromkeys([*spec.search.space, *spec.scheduler.mutations])),
            planned=spec.search.num_samples,
            scheduler=spec.scheduler.type,
            board=plan.leaderboard,
            failures_dir=plan.failures_dir,
        )
    say = live.say if live else output.echo
    # this driver's own callbacks (not carried in Tune's saved state: a resume adds its own)
    mine: list[Any] = [live] if live else []
    if tracker is not None:
        from tune_jobs.mlflow_tracking import MlflowCallback

        mine.append(
            MlflowCallback(tracker, lambda config: trial_hparams(spec, config), trial_prefix)
        )
    verbose = 1 if output.verbose else 0  # 1: Tune's own reporter; 0: the console alone
    if restore:
        fs = storage.ray_storage(run_dir)
        restored = tune.Tuner.restore(
            fs["storage_path"],
            trainable,
            resume_errored=True,
            storage_filesystem=fs.get("storage_filesystem"),
        )
        # this process's console, in place of the one the run began with (not pickled)
        config = ray_private.restored_run_config(restored)
        config.callbacks = [
            c for c in config.callbacks or [] if not isinstance(c, console.NotCarried)
        ] + mine
        config.verbose = verbose
        for kept in config.callbacks:
            if isinstance(kept, Budget):  # the run's own, its count restored by Tune
                kept.limits = spec.search.budget
                attach_budget(kept, live, say)
        return restored, pool, live
    synch = spec.scheduler.type in ("pbt", "pb2") and spec.scheduler.synch
    guard = PopulationGuard() if synch else None
    if budget is not None:
        attach_budget(budget, live, say)
    stoppers = [s for s in (guard, budget) if s is not None]
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec) if space is None else space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=build_scheduler(spec),
            search_alg=gate(
                build_search_alg(spec, points or [], generator_limit(spec, max_concurrent)),
                budget,
            ),
            num_samples=spec.search.num_samples,
            reuse_actors=True,
            trial_name_creator=layout.trial_name,
            trial_dirname_creator=layout.trial_name,
        ),
        run_config=tune.RunConfig(
            name=run_name,
            **storage.ray_storage(storage_root),
            checkpoint_config=tune_checkpoint_config(),
            # a failed trial restarts from its last checkpoint (tune_jobs.faults: not when
            # its own code raised); a synch population stops once a member is past retries
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            stop=CombinedStopper(*stoppers) if len(stoppers) > 1 else next(iter(stoppers), None),
            callbacks=[
                ReportLog(run_dir),
                *stoppers,
                # Tune's own loggers, chosen here (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS):
                # result.json and progress.csv always, TensorBoard unless turned off
                JsonLoggerCallback(),
                CSVLoggerCallback(),
                *([TensorBoard()] if spec.tracking.tensorboard else []),
                *mine,
            ],
            verbose=verbose,
        ),
    )
    return tuner, pool, live


def attach_budget(budget: Budget, live: SweepConsole | None, say: Callable[[str], None]) -> None:
    """This driver's lines for the budget's decisions, and the console told what it stops."""
    budget.say = say
    if live is not None:
        live.budget = budget


class RunFailed(RuntimeError):
    """The sweep ran but produced nothing usable (every trial failed); the summary says why."""


def plan_concurrency(
    spec: JobSpec, res: TrialResources, local: bool
) -> tuple[ClusterCapacity, int]:
    """The connected cluster's capacity and how many trials run at once.

    On an autoscaling cluster a trial that fits a node type the autoscaler can
    start is allowed even while no such node is up: concurrency is then the
    requested (or the whole sweep's) number of trials, and Tune's pending trials
    ask the autoscaler for nodes. A trial that fits no node type is refused.
    """
    capacity = capacity_of_running_cluster()
    requested = spec.resources.max_concurrent_trials
    try:
        fits_now: int | None = max_concurrent_trials(res, capacity, requested)
        refusal: ResourceError | None = None
    except ResourceError as exc:
        fits_now, refusal = None, exc
    wanted = requested or spec.search.num_trials
    if fits_now is not None and fits_now >= wanted:
        return capacity, fits_now
    verdict = None if local else autoscaler_can_place(res.bundles())
    if verdict is None:  # no autoscaler: what is up now is all there is
        if refusal is not None:
            raise refusal
        return capacity, fits_now or 1
    if verdict is False:
        raise ResourceError(
            f"resources: one trial needs {res.bundles()} (its driver, then "
            f"{res.num_workers} worker(s)), which no node type of this autoscaling cluster can "
            "hold; lower resources.num_workers, cpus_per_worker or gpus_per_worker, or add a "
            "node type that fits"
        )
    return replace(capacity, autoscaling=True), max(fits_now or 0, wanted)


def describe_capacity(capacity: ClusterCapacity) -> str:
    """One line: nodes and resources (and that it autoscales)."""
    text = f"{capacity.nodes} node(s), {capacity.cpus:g} CPUs, {capacity.gpus:g} GPUs"
    return text + (" now, autoscaling" if capacity.autoscaling else "")


def check_storage_reachable(spec: JobSpec, storage_root: str, capacity: ClusterCapacity) -> None:
    """A local storage path on a multi-node cluster would scatter results across node disks."""
    if storage.is_uri(storage_root) or spec.run.shared_storage:
        return
    if capacity.nodes > 1 or capacity.autoscaling:
        nodes = f"{capacity.nodes} nodes" + (" and autoscales" if capacity.autoscaling else "")
        raise SpecError(
            [
                Problem(
                    "run.storage_path",
                    spec.run.storage_path,
                    f"a local path, but the cluster has {nodes}: each node would keep its own "
                    "part of the checkpoints and results. Use a bucket (e.g. "
                    "s3://bucket/prefix, endpoint and keys from the environment) or, for a mount "
                    "every node sees (NFS, a PVC), set run.shared_storage: true",
                )
            ]
        )


def close_pool(pool: Any) -> None:
    """End the sweep's warm groups (their workers) and the pool; None: nothing to end."""
    import ray

    if pool is not None:
        ray.get(pool.close_all.remote())
        ray.kill(pool)


def on_a_worker(spec: JobSpec, fn: Callable[..., Any], *args: Any, worker: Any = None) -> Any:
    """``fn(*args)`` in a Ray task with one trial worker's CPUs, not in the driver: the
    model work around a sweep (the probe's features, the export's reload and scoring) runs
    where the trials' compute is, and the driver keeps to coordinating (on a cluster it is
    the head node's process; measured on the benchmark's recipe, these two were 12.5 of
    its 20 busy CPU-seconds: DECISIONS 85). Object refs among ``args`` arrive resolved.
    Without a connected Ray (a unit test), in this process. ``worker``: a warm group of
    the sweep (``tune_jobs.groups.LeasedGroup``) whose rank 0 runs it instead
    (``trainers.serve.Call``: its process has torch and the model's libraries loaded; a
    task's new process imports them first, seconds on a small model); a group that has
    died meanwhile leaves it to a task."""
    import ray

    if worker is not None and worker.alive:
        from trainers.serve import Call, Raised
        from tune_jobs.groups import WorkerGroupError

        with contextlib.suppress(WorkerGroupError):
            reply = worker.call(Call(fn, args))
            if isinstance(reply, Raised):
                raise reply.error
            return reply
    if not ray.is_initialized():
        return fn(*(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args))
    res = trial_resources(spec)
    task = ray.remote(num_cpus=res.cpus_per_worker, max_retries=0)(fn)
    return ray.get(task.remote(*args))


def export_verified(
    spec: JobSpec,
    run_dir: str,
    uri: str,
    metrics: dict[str, Any],
    splits: Any,
    echo: Callable[[str], None],
    source_dir: str | None = None,
    worker: Any = None,
) -> dict[str, Any]:
    """Export ``uri`` into the run's export folder; if its files fail their checksums, the
    best other checkpoint written in ``source_dir`` (default: the run) that passes (the log
    says which and why). A corrupt checkpoint is never exported. ``splits``: the data, or
    its object ref (what the worker resolves: the sweep's, not another copy)."""
    dest = storage.join(run_dir, layout.EXPORT_DIR)
    try:
        return on_a_worker(
            spec, results.export_best, uri, dest, spec, metrics, splits, worker=worker
        )
    except CorruptCheckpoint as exc:
        echo(f"export: {exc}: not exported")
        failure = exc
    metric, mode = spec.search.metric, spec.search.resolved_mode
    for other, other_metrics in results.written_checkpoints(source_dir or run_dir, metric, mode):
        if other == uri:
            continue
        try:
            record = on_a_worker(
                spec, results.export_best, other, dest, spec, other_metrics, splits, worker=worker
            )
        except CorruptCheckpoint as exc:
            echo(f"export: {exc}: not exported")
            continue
        echo(f"export: exported {other} instead ({metric} {other_metrics[metric]:.4f})")
        return record
    raise RunFailed(f"no checkpoint that passes its checksums is left to export ({failure})")


def _choose_and_export(
    spec: JobSpec,
    run_dir: str,
    grid: Any,
    trials: list[Any],
    finished: list[Any],
    reevaluation: dict[str, Any] | None,
    splits: Any,
    worker: Any,
    echo: Callable[[str], None],
) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """The sweep's best trial (the reevaluation's choice, where one ran), its export, and
    the sweep's leader (the best checkpoint written, ``tune_jobs.leader``; None without
    checkpoints). ``splits``: the data or its object ref; ``worker``: a warm group to run
    the model work on, or None."""
    metric, mode = spec.search.metric, spec.search.resolved_mode
    best = None
    export = None
    leader = read_leader(run_dir) if spec.training.save_checkpoints else None
    chosen = (reevaluation or {}).get("chosen")
    if chosen:  # the config with the best mean over new seeds, its best seed exported
        from tune_jobs import reevaluate

        best = next(t for t in trials if t.trial == chosen)
        seeded = reevaluation.get("export")
        if seeded is not None:
            export = export_verified(
                spec,
                run_dir,
                seeded["uri"],
                seeded["metrics"],
                splits,
                echo,
                source_dir=storage.join(run_dir, reevaluate.FOLDER),
                worker=worker,
            )
        reevaluate.prune(run_dir, reevaluation)
    elif finished:
        best = results.best_trial(finished, metric, mode, leader and leader["trial"])
        best_result = next(r for r in grid if results.trial_dir(r) == best.trial)
        if leader is not None:
            # the best checkpoint written (tune_jobs.leader; none under pbt/pb2)
            uri, ckpt_metrics = leader["uri"], leader["metrics"]
            if leader["trial"] != best.trial:
                echo(
                    f"note: {best.trial} reported the best {metric} but its checkpoint "
                    f"was never written (it failed?); exporting {leader['trial']}'s "
                    f"({metric} {leader['value']:.4f})"
                )
        elif spec.training.save_checkpoints:
            uri, ckpt_metrics = results.best_checkpoint_uri(best_result, metric, mode)
        if spec.training.save_checkpoints:
            export = export_verified(spec, run_dir, uri, ckpt_metrics, splits, echo, worker=worker)
    return best, export, leader


def run_spec(run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """The spec the run in ``run_dir`` was started with (its ``job_spec.yaml``), with
    ``overrides``; ``SpecError`` naming RUN_DIR when the folder holds no run."""
    from tune_jobs.spec import load_spec_text

    path = storage.join(run_dir, layout.SPEC_FILE)
    if not storage.exists(path):
        raise SpecError(
            [Problem("RUN_DIR", run_dir, f"no {layout.SPEC_FILE}: not a tunefleet run folder")]
        )
    return load_spec_text(storage.read_text(path), overrides, source=path)


def resume_spec(run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """The spec to continue the run in ``run_dir`` with: its own ``job_spec.yaml``, named
    and stored as the folder says, ``if_exists: resume``, no smoke pass; ``SpecError``
    naming RUN_DIR when the folder holds no run."""
    run_dir = storage.normalize(run_dir.rstrip("/"))
    base, query = storage.split_query(run_dir)
    head, _, name = base.rpartition("/")
    fixed = [f"run.storage_path={head + query}", f"run.name={name}", "run.if_exists=resume"]
    for text in overrides:
        if text.split("=", 1)[0].strip() in ("run.storage_path", "run.name", "run.if_exists"):
            raise SpecError(
                [Problem(text.split("=", 1)[0], text, "set by RUN_DIR; resume another folder")]
            )
    spec = run_spec(run_dir, [*overrides, *fixed])
    if not storage.exists(storage.join(run_dir, layout.TUNER_FILE)):
        raise SpecError(
            [
                Problem(
                    "RUN_DIR",
                    run_dir,
                    "the run never started its sweep (no tuner.pkl): start it again with "
                    "tunefleet run",
                )
            ]
        )
    return spec.model_copy(update={"smoke": spec.smoke.model_copy(update={"enabled": False})})


def check_same_training(spec: JobSpec, run_dir: str) -> None:
    """A resumed run's checkpoints must fit the spec it resumes with: the same model and
    strategy (a checkpoint from another model would load as garbage, or not at all)."""
    path = storage.join(run_dir, layout.SPEC_FILE)
    if not storage.exists(path):
        return
    from tune_jobs.spec import load_spec_text

    before = load_spec_text(storage.read_text(path), source=path)
    problems = [
        Problem(
            key,
            now,
            f"the run in {run_dir} was trained with {key}: {was!r}, and its checkpoints only "
            f"continue with that; resume with {was!r}, or start a new run (run.if_exists: new)",
        )
        for key, was, now in (
            ("model.name_or_path", before.model.name_or_path, spec.model.name_or_path),
            ("distributed.strategy", before.distributed.strategy, spec.distributed.strategy),
        )
        if was != now
    ]
    if problems:
        raise SpecError(problems)


def run_job(
    spec: JobSpec,
    echo: Callable[[str], None] = print,
    keep_ray: bool = False,
    hp_schedule: tuple[tuple[int, dict[str, Any]], ...] = (),
    warm_points: list[dict[str, Any]] | None = None,
    splits: Splits | None = None,
    report: bool = True,
    trial_cost: Any = None,
) -> RunOutcome:
    """Run the whole job; raises ``DataError``/``ResourceError`` before Ray starts when it can.

    ``warm_points`` are tried first, before the defaults trial (a retrain's champion and
    previous best configs); ``splits`` are the data already loaded by the caller;
    ``report``: write the run's report at the end (a retrain writes it after deciding);
    ``trial_cost``: one trial's cost as the smoke pass measured it (``budget.TrialCost``):
    a ``search.budget`` that cannot buy one trial is refused with it.
    """
    import ray

    started = time.monotonic()
    storage_root = storage.normalize(spec.run.storage_path)
    if splits is None:
        splits = load_data(spec)  # bad data fails here
    preflight(spec, splits)  # the model, the storage folder, the batch sizes: before Ray
    one_trial_s = check_affordable(spec, len(splits.train), trial_cost)
    similarity = None
    dropped = {k: v for k, v in splits.dropped.items() if v}
    echo(
        f"data: {splits.source_rows} rows -> train {len(splits.train)} / validation "
        f"{len(splits.validation)} / test {len(splits.test)}; "
        f"{'answers' if spec.model.task == 'causal_lm' else 'labels'} {splits.label_names}; "
        f"majority baseline (validation) {splits.majority_baseline():.4f}"
        + (
            f"; dropped as longer than model.max_length ({spec.model.max_length}): {dropped}"
            if dropped
            else ""
        )
    )
    res = trial_resources(spec)
    target = spec.run.address or os.environ.get("RAY_ADDRESS")
    if not target:  # local debug cluster: check the arithmetic before starting it
        max_concurrent_trials(res, local_capacity(spec), spec.resources.max_concurrent_trials)
    run_name = resolve_run_name(spec, storage_root)
    run_dir = storage.join(storage_root, run_name)
    restore = spec.run.if_exists == "resume" and storage.exists(run_dir)
    if restore:
        check_same_training(spec, run_dir)

    conn = connect(spec.run.address, spec.resources.local_num_cpus)
    tracker = None
    try:
        capacity, concurrent = plan_concurrency(spec, res, conn.local)
        check_storage_reachable(spec, storage_root, capacity)
        check_on_every_node(spec)  # several nodes: the trials' workers may run on any
        echo(
            f"ray: {conn.describe()}: {describe_capacity(capacity)}; each trial: "
            + (
                f"the worker loop in the trial process, {res.worker_bundle()}; "
                if res.single_process
                else f"{res.num_workers} worker(s) x {res.worker_bundle()} + {res.driver_cpus:g} CPU driver; "
            )
            + f"{concurrent} trial(s) at once; run folder {run_dir}"
        )
        check_population_fits(spec, concurrent)
        data_ref = ray.put(splits)  # once: the probe, the trials and the export read it
        if spec.search.probe and not restore:  # the spec written below is the one it sets
            from tune_jobs import probe

            similarity = on_a_worker(spec, probe.measure, spec, data_ref)
            spec = probe.adapt(spec, similarity)
            echo(similarity.line())
        # grace_period: auto, evaluations at the rungs, their screening sample
        spec = fidelity.resolve(spec, len(splits.train), len(splits.validation))
        note = fidelity.budget_searched_note(spec)
        if note and not restore:
            echo(note)
        # Written only once every check has passed: a refused run leaves nothing behind.
        if spec.run.if_exists == "overwrite":
            storage.delete_dir(run_dir)
        storage.write_text(
            storage.join(run_dir, layout.SPEC_FILE), spec.to_yaml()
        )  # resume, replay
        output = console.active()
        output.attach(run_dir)  # Ray's own output: <run>/logs/driver.log from here on
        if spec.tracking.mlflow_uri:
            from tune_jobs.mlflow_tracking import MlflowRuns

            tracker = MlflowRuns(spec, run_dir, echo)
        defaults = defaults_points(spec)
        if defaults and similarity is not None:  # the probe's depth and rate, where searched
            from tune_jobs.probe import defaults_overrides

            defaults = [{**defaults[0], **defaults_overrides(similarity, spec.search.space)}]
        if defaults:
            echo(
                f"defaults trial {'next' if warm_points else 'first'} "
                f"({family_of(model_type_of(spec.model.name_or_path))} family): {defaults[0]}"
            )
        # Tune runs every point even past num_samples: the budget is the user's, so cut
        # the list (warm-start points first, then the defaults trial).
        points = unique_points([*(warm_points or []), *defaults])[: spec.search.num_samples]
        budget = None
        if spec.search.budget.limited and not restore:
            budget = Budget(spec.search.budget, gpus_per_trial(spec), one_trial_s)
            echo(describe_limits(spec.search.budget, one_trial_s))
        tuner, pool, live = build_tuner(
            spec,
            data_ref,
            storage_root,
            run_name,
            concurrent,
            restore,
            points,
            hp_schedule,
            output,
            tracker,
            budget,
        )
        budget = budget_of(tuner)  # a restored run's: its count goes on
        metric, mode = spec.search.metric, spec.search.resolved_mode
        reevaluation = None
        try:
            try:
                grid = tuner.fit()
            finally:
                if live is not None:
                    live.close()
            reports = read_all_reports(run_dir)  # once: the summary and the lineage read them
            trials = [
                results.summarize_trial(r, metric, mode, reports.get(results.trial_dir(r), []))
                for r in grid
            ]
            finished = [t for t in trials if t.best.get(metric) is not None]
            if spec.search.reevaluate.enabled and finished:
                from tune_jobs import reevaluate

                reevaluation = reevaluate.run(
                    spec,
                    data_ref,
                    run_dir,
                    trials,
                    concurrent,
                    restore,
                    pool,
                    budget,
                    echo,
                    tracker=tracker,
                )
                for line in reevaluate.describe(reevaluation, metric):
                    echo(line)
        except BaseException:
            close_pool(pool)
            raise
        # the groups' workers go but one, which does the export's model work (warm: torch,
        # the model's libraries, the tokenizer loaded; a new task's process loads them all)
        worker = None
        if pool is not None:
            from tune_jobs.groups import LeasedGroup

            kept = ray.get(pool.close_all.remote(keep=1))
            worker = LeasedGroup(pool, kept[0]) if kept else None
        try:
            best, export, leader = _choose_and_export(
                spec, run_dir, grid, trials, finished, reevaluation, data_ref, worker, echo
            )
        finally:
            close_pool(pool)
        keep = {t for t in (best.trial if best else None, leader and leader["trial"]) if t}
        statuses = {t.trial: t.status for t in trials}
        results.prune_train_runs(layout.train_runs(run_dir), statuses, keep)
        defaults_trial = results.find_defaults_trial(trials, defaults)
        summary = results.build_summary(
            spec,
            run_name,
            run_dir,
            trials,
            best,
            export,
            splits,
            time.monotonic() - started,
            defaults_trial,
            reports,
            zero_shot=(
                results.zero_shot(spec, splits, export["scored_in"] if export else None)
                if defaults_trial or export
                else None
            ),
            budget=budget.bought() if budget is not None else None,
            similarity=similarity.as_dict() if similarity is not None else None,
            reevaluation=reevaluation,
        )
        path = results.write_summary(run_dir, summary)
        picture = write_lineage(
            run_dir, summary["exploits"], metric, mode, best.trial if best else None, reports
        )
        from tune_jobs.report.card import write_model_card

        write_model_card(spec, summary)
    except BaseException:
        if tracker is not None:  # stopped (SIGTERM, Ctrl-C) or broken: its MLflow runs say so
            tracker.abandon()
        raise
    finally:
        if not keep_ray:
            disconnect()
    echo("")
    echo(leaderboard(summary))
    if summary.get("budget"):
        for line in describe_budget(summary["budget"]):
            echo(line)
    if picture:
        echo(f"lineage: {picture}")
    written = None
    if report:
        from tune_jobs.report import report_or_say  # matplotlib: only once a run has ended

        written = report_or_say(run_dir, echo, say_where=False)
    tracked = tracker.finish(summary, written.html if written else None) if tracker else None
    echo("")
    for line in console.ending(summary, written.html if written else None):
        echo(line)
    failed = [t for t in trials if t.status == "ERROR"]
    if trials and len(failed) == len(trials):
        raise RunFailed(
            f"every trial failed ({len(trials)}); summary: {path}\n"
            + "\n".join(f"  - {t.trial}: {t.error}" for t in failed)
        )
    return RunOutcome(run_dir, path, summary, data_ref if keep_ray else None, tracked)
