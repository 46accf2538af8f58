"""What must hold across a spec's sections (cross-checks), and the validation errors of
one section as ``Problem``s. Each returns every problem it finds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from trainers import metrics as M
from trainers.data import FORMATS, TEXT_LABEL
from trainers.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION
from tune_jobs.spec.errors import MISSING, FieldProblems, Problem
from tune_jobs.spec.sections import (
    ADAPTER_MUTABLE,
    ADAPTER_SEARCHABLE,
    DISTRIBUTIONS,
    MUTABLE,
    SEARCHABLE,
    AdapterSpec,
    DataSpec,
    DistributedSpec,
    ModelSpec,
    ResourcesSpec,
    RunSpec,
    SchedulerSpec,
    SearchSpec,
    Section,
    TrackingSpec,
    TrainingSpec,
)


def problems_from_validation(
    section: str, cls: type[Section], exc: ValidationError
) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (section, *err["loc"]))
        ctx_error = err.get("ctx", {}).get("error")
        if isinstance(ctx_error, FieldProblems):
            out += [
                Problem(f"{section}.{k}", v if v is not None else MISSING, m)
                for k, v, m in ctx_error.problems
            ]
            continue
        if err["type"] == "extra_forbidden":
            valid = ", ".join(cls.model_fields)
            out.append(Problem(loc, MISSING, f"unknown key; valid keys in '{section}': {valid}"))
            continue
        out.append(Problem(loc, err.get("input", MISSING), err["msg"]))
    return _merge_union_branches(out, section, cls)


def _merge_union_branches(
    problems: list[Problem], section: str, cls: type[Section]
) -> list[Problem]:
    """One problem per key of a union type (``int | "auto"``): pydantic reports each branch
    apart (``key.constrained-int``, ``key.literal['auto']``); the user wrote one key."""
    import types
    import typing

    def is_union(field: str) -> bool:
        info = cls.model_fields.get(field)
        origin = typing.get_origin(info.annotation) if info else None
        return origin is typing.Union or origin is types.UnionType

    merged: dict[str, Problem] = {}
    out: list[Problem] = []
    for problem in problems:
        head, _, branch = problem.key.rpartition(".")
        field = head.removeprefix(f"{section}.")
        if branch and "." not in field and is_union(field):
            if head in merged:
                prior = merged[head]
                merged[head] = Problem(
                    head,
                    prior.value,
                    f"{prior.message}, or {problem.message.removeprefix('Input should be ')}",
                )
                out[out.index(prior)] = merged[head]
                continue
            merged[head] = Problem(head, problem.value, problem.message)
            out.append(merged[head])
            continue
        out.append(problem)
    return out


def _check_space(
    search: SearchSpec, section: str = "search.space", allowed: frozenset[str] = SEARCHABLE
) -> list[Problem]:
    problems = []
    space = search.space if isinstance(search, SearchSpec) else search
    for key, entry in space.items():
        where = f"{section}.{key}"
        if allowed is MUTABLE and key in ADAPTER_SEARCHABLE - ADAPTER_MUTABLE:
            problems.append(
                Problem(
                    where,
                    MISSING,
                    f"{key} fixes the shape of the adapter's tensors and a PBT exploit copies "
                    "the donor's tensors into the recipient, so it cannot change mid-training; "
                    "search it in search.space (each trial keeps its own), or mutate "
                    f"{', '.join(sorted(ADAPTER_MUTABLE))}",
                )
            )
            continue
        adapter_keys = ADAPTER_SEARCHABLE if allowed is SEARCHABLE else ADAPTER_MUTABLE
        if key not in allowed | adapter_keys:
            problems.append(
                Problem(
                    where,
                    MISSING,
                    f"not a {'searchable' if allowed is SEARCHABLE else 'mutable'} key; allowed: {', '.join(sorted(allowed | adapter_keys))}",
                )
            )
            continue
        if not isinstance(entry, Mapping):
            values = [entry]
        elif len(entry) != 1 or next(iter(entry)) not in DISTRIBUTIONS:
            forms = "; ".join(f"{k}: {v}" for k, v in DISTRIBUTIONS.items())
            problems.append(
                Problem(where, dict(entry), f"expected a fixed value or one of {{{forms}}}")
            )
            continue
        else:
            ((kind, values),) = entry.items()
            if not isinstance(values, list) or not values:
                problems.append(Problem(f"{where}.{kind}", values, "expected a non-empty list"))
                continue
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2:
                    problems.append(Problem(f"{where}.{kind}", values, "expected [low, high]"))
                    continue
                try:
                    low, high = float(values[0]), float(values[1])
                except (TypeError, ValueError):
                    problems.append(Problem(f"{where}.{kind}", values, "bounds must be numbers"))
                    continue
                if not low < high:
                    problems.append(Problem(f"{where}.{kind}", values, "low must be < high"))
                if kind == "loguniform" and low <= 0:
                    problems.append(Problem(f"{where}.{kind}", values, "loguniform needs low > 0"))
                if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
                    problems.append(
                        Problem(f"{where}.{kind}", values, "randint bounds must be integers")
                    )
        for value in values:  # every value (or bound) must be a valid training setting
            try:
                if key.startswith("adapter."):
                    AdapterSpec.model_validate({key.split(".", 1)[1]: value})
                else:
                    TrainingSpec.model_validate({key: value})
            except ValidationError as exc:
                problems.append(Problem(where, value, exc.errors()[0]["msg"]))
    return problems


def extreme(key: str, fixed: Any, space: Mapping[str, Any], pick: Any = max) -> Any:
    """The largest (``pick=min``: smallest) value ``key`` can take: of its searched values,
    else the fixed one."""
    entry = space.get(key, fixed)
    if not isinstance(entry, Mapping):
        return entry
    ((_, values),) = entry.items()
    return pick(values)


def _largest(key: str, fixed: Any, space: Mapping[str, Any]) -> Any:
    return extreme(key, fixed, space, max)


def _check_population(sched: SchedulerSpec, search: Any, training: Any) -> list[Problem]:
    """PBT/PB2 settings: an interval, mutations of mutable keys, checkpoints at every report."""
    problems: list[Problem] = []
    if not sched.perturbation_interval:
        problems.append(
            Problem(
                "scheduler.perturbation_interval",
                MISSING,
                f"{sched.type} needs an interval in {sched.time_attr}s, e.g. 0.5",
            )
        )
    if not sched.mutations:
        problems.append(
            Problem(
                "scheduler.mutations",
                MISSING,
                f"{sched.type} needs at least one key to mutate, e.g. learning_rate: {{loguniform: [1.0e-5, 1.0e-4]}}",
            )
        )
    problems += _check_space(sched.mutations, "scheduler.mutations", MUTABLE)
    if sched.type == "pb2":
        for key, entry in sched.mutations.items():
            if not (
                isinstance(entry, Mapping)
                and next(iter(entry), None) in ("uniform", "loguniform", "randint")
            ):
                problems.append(
                    Problem(
                        f"scheduler.mutations.{key}",
                        entry,
                        "pb2 explores numeric ranges only: {uniform: [low, high]}",
                    )
                )
    for key, entry in sched.mutations.items():
        if isinstance(entry, Mapping) and "grid" in entry:
            problems.append(
                Problem(f"scheduler.mutations.{key}", dict(entry), "a mutation cannot be a grid")
            )
    if isinstance(search, SearchSpec) and search.algorithm != "random":
        problems.append(
            Problem(
                "search.algorithm",
                search.algorithm,
                f"{sched.type} needs algorithm: random (it is itself the search)",
            )
        )
    if isinstance(training, TrainingSpec) and not training.save_checkpoints:
        problems.append(
            Problem(
                "training.save_checkpoints",
                False,
                f"{sched.type} exploits checkpoints; set it to true",
            )
        )
    if isinstance(training, TrainingSpec) and sched.perturbation_interval:
        budget = budget_in(
            sched.time_attr, training, search.space if isinstance(search, SearchSpec) else {}
        )
        if budget and sched.perturbation_interval >= budget:
            problems.append(
                Problem(
                    "scheduler.perturbation_interval",
                    sched.perturbation_interval,
                    f"must be < the budget ({budget:g} {sched.time_attr}s)",
                )
            )
    return problems


def _check_deepspeed(
    dist: DistributedSpec, training: Any, search: Any, sched: Any, res: Any
) -> list[Problem]:
    """DeepSpeed settings that can never work, and extra config keys that fight tuned values."""
    from trainers.ds_config import CONTROLLED, conflicts, flatten, generated_config

    ds, problems = dist.deepspeed, []
    if dist.precision != "auto":
        problems.append(
            Problem(
                "distributed.precision",
                dist.precision,
                "applies to ddp trials; a DeepSpeed engine keeps its own precision: set "
                f"distributed.deepspeed.precision: {dist.precision} and leave this key out",
            )
        )
    if isinstance(res, ResourcesSpec) and res.trial_mode == "single_process":
        problems.append(
            Problem(
                "distributed.strategy",
                "deepspeed",
                "DeepSpeed runs in Ray Train workers; use resources.trial_mode: train",
            )
        )
    if ds.offload_params and ds.zero_stage != 3:
        problems.append(
            Problem(
                "distributed.deepspeed.offload_params",
                True,
                f"parameter offload needs ZeRO stage 3 (zero_stage is {ds.zero_stage})",
            )
        )
    if ds.offload_optimizer and ds.zero_stage == 0:
        problems.append(
            Problem(
                "distributed.deepspeed.offload_optimizer",
                True,
                "optimizer offload needs ZeRO stage 1, 2 or 3",
            )
        )
    if isinstance(res, ResourcesSpec) and ds.precision == "fp16" and not res.gpus_per_worker:
        problems.append(
            Problem(
                "distributed.deepspeed.precision",
                "fp16",
                "fp16 needs GPUs (resources.gpus_per_worker > 0); use bf16 or fp32 on CPUs",
            )
        )
    if isinstance(training, TrainingSpec) and training.gradual_unfreeze_every:
        problems.append(
            Problem(
                "training.gradual_unfreeze_every",
                training.gradual_unfreeze_every,
                "not with deepspeed (the engine would be rebuilt mid-run); use a fixed "
                "unfreeze_depth, or PBT mutating it, or distributed.strategy: ddp",
            )
        )
    if isinstance(training, TrainingSpec) and isinstance(res, ResourcesSpec):
        tuned: set[str] = set(search.space) if isinstance(search, SearchSpec) else set()
        if isinstance(sched, SchedulerSpec):
            tuned |= set(sched.mutations)
        settings = {**ds.model_dump(), "config": {}}
        generated = generated_config(training.model_dump(), settings, res.num_workers)
        reported = set()
        for path, value in flatten(ds.config).items():
            searched = sorted(k for k in tuned if f"training.{k}" in CONTROLLED.get(path, ""))
            if searched:
                reported.add(path)
                problems.append(
                    Problem(
                        f"distributed.deepspeed.config.{path}",
                        value,
                        f"depends on searched key(s) {', '.join(searched)}, so it varies per "
                        "trial and tunefleet sets it; drop the key",
                    )
                )
        for path, value, why in conflicts(generated, ds.config):
            if path not in reported:
                problems.append(Problem(f"distributed.deepspeed.config.{path}", value, why))
    return problems


def _check_rungs(sched: SchedulerSpec, training: Any, task: str) -> list[Problem]:
    """grace_period > 0, a rung metric the task reports, evaluations at rungs only under ASHA."""
    problems = []
    if sched.grace_period != "auto" and sched.grace_period <= 0:
        problems.append(
            Problem("scheduler.grace_period", sched.grace_period, "must be > 0, or auto")
        )
    valid = M.TASK_OBJECTIVES[task]
    if sched.rung_metric != "auto" and sched.rung_metric not in valid:
        problems.append(
            Problem(
                "scheduler.rung_metric",
                sched.rung_metric,
                f"not reported by model.task {task}; one of {sorted(valid)}, or auto",
            )
        )
    # eval_at already written (by the driver: a retraining keeps its sweep's points) stands
    rungs = (
        isinstance(training, TrainingSpec)
        and training.eval_strategy == "rungs"
        and not training.eval_at
    )
    if rungs and (sched.type != "asha" or sched.time_attr not in (M.EPOCH, M.STEP)):
        problems.append(
            Problem(
                "training.eval_strategy",
                "rungs",
                "evaluates at ASHA's rungs: needs scheduler.type asha with time_attr epoch or "
                f"step (got {sched.type}, {sched.time_attr}); use steps or epoch",
            )
        )
    return problems


def _check_reevaluate(search: SearchSpec, sched: Any) -> list[Problem]:
    """A config must be something a new seed can retrain, and there must be k of them."""
    problems = []
    top_k = search.reevaluate.top_k
    if isinstance(sched, SchedulerSpec) and sched.type in ("pbt", "pb2"):
        problems.append(
            Problem(
                "search.reevaluate.top_k",
                top_k,
                f"a {sched.type} member's hyperparameters change as it trains, so its config "
                "alone does not retrain it: use 0 (export the best member, or `tunefleet "
                "replay` its schedule), or scheduler.type asha/hyperband/fifo",
            )
        )
    if top_k > search.num_trials:
        problems.append(
            Problem(
                "search.reevaluate.top_k",
                top_k,
                f"the sweep makes {search.num_trials} trial(s): at most {search.num_trials}",
            )
        )
    return problems


def budget_in(
    time_attr: str, training: TrainingSpec, space: Mapping[str, Any] | None = None
) -> float | None:
    """The longest training budget in the scheduler's units, when it is known before the data is."""
    space = space or {}
    max_steps = _largest("max_steps", training.max_steps, space)
    if time_attr == M.EPOCH and not max_steps:
        return float(_largest("num_train_epochs", training.num_train_epochs, space))
    if time_attr == M.STEP and max_steps:
        return float(max_steps)
    return None


#: query keys of storage URIs that carry a secret (pyarrow's S3 options, and the usual others)
_SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token", "password", "token", "sig")


def _check_no_credentials(
    uri: str,
    key: str,
    how: str = "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL",
) -> list[Problem]:
    """Keys belong in the environment (or a Kubernetes Secret), never in the spec: the spec is
    copied into the run folder, the export and the job's logs. The problem shows the URI
    with the secret masked."""
    from urllib.parse import parse_qsl, urlsplit

    if "://" not in uri:
        return []
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret_keys = [k for k, _ in query if k.lower() in _SECRET_QUERY_KEYS]
    if not parts.username and not parts.password and not secret_keys:
        return []
    host = parts.hostname or ""
    masked_query = "&".join(f"{k}={'***' if k in secret_keys else v}" for k, v in query)
    masked = (
        f"{parts.scheme}://***@{host}{parts.path}"
        if parts.username
        else (f"{parts.scheme}://{parts.netloc}{parts.path}")
    )
    if masked_query:
        masked += f"?{masked_query}"
    return [
        Problem(
            key,
            masked,
            f"holds credentials: give them through the environment ({how}; on Kubernetes a "
            "Secret), never in the spec, which is copied into the run folder and the export",
        )
    ]


def _check_task(task: str, data: Any, adapter: Any, res: Any) -> list[Problem]:
    """The data's format and the adapter fit the task."""
    problems: list[Problem] = []
    if isinstance(data, DataSpec):
        causal_formats = [f for f in FORMATS if f != TEXT_LABEL]
        if task == SEQUENCE_CLASSIFICATION and data.format not in (None, TEXT_LABEL):
            problems.append(
                Problem(
                    "data.format",
                    data.format,
                    f"sequence_classification reads text_label rows; {data.format} is for "
                    "model.task: causal_lm",
                )
            )
        if data.instruction_template and data.answer_choices is not None:
            problems.append(
                Problem(
                    "data.answer_choices",
                    data.answer_choices,
                    "with data.instruction_template the answers are the label names; set "
                    "data.label_names to rename or order them, and leave answer_choices out",
                )
            )
        if task == SEQUENCE_CLASSIFICATION and data.instruction_template:
            problems.append(
                Problem(
                    "data.instruction_template",
                    data.instruction_template,
                    "turns labelled texts into instructions for model.task: causal_lm; leave it "
                    "out for sequence_classification",
                )
            )
        if task == CAUSAL_LM and data.format == TEXT_LABEL:
            problems.append(
                Problem(
                    "data.format",
                    data.format,
                    f"causal_lm reads one of {', '.join(causal_formats)}; to train on labelled "
                    "texts set data.instruction_template, e.g. 'Review: {text} Fresh or rotten?'",
                )
            )
        if (
            task == CAUSAL_LM
            and data.instruction_template
            and data.format not in (None, "instruction")
        ):
            problems.append(
                Problem(
                    "data.format",
                    data.format,
                    "data.instruction_template makes instruction rows; leave format out",
                )
            )
        if task == CAUSAL_LM and data.source == "rotten_tomatoes" and not data.instruction_template:
            problems.append(
                Problem(
                    "data.instruction_template",
                    MISSING,
                    "source rotten_tomatoes is labelled text; causal_lm needs a prompt around "
                    "it, e.g. 'Is this review fresh or rotten?\n\n{text}'",
                )
            )
    if isinstance(adapter, AdapterSpec) and adapter.type == "lora":
        if task != CAUSAL_LM:
            problems.append(
                Problem(
                    "adapter.type",
                    adapter.type,
                    "lora trains causal LMs here (model.task: causal_lm); a classifier's fresh "
                    "head needs full training: use adapter.type: none",
                )
            )
        gpus = res.gpus_per_worker if isinstance(res, ResourcesSpec) else 0
        if adapter.quantization == "4bit" and not gpus:
            problems.append(
                Problem(
                    "adapter.quantization",
                    adapter.quantization,
                    "a 4-bit base (QLoRA) needs bitsandbytes on CUDA GPUs and these workers "
                    "have none (resources.gpus_per_worker: 0); use quantization: none",
                )
            )
        elif adapter.quantization == "4bit":
            # Not built yet: it needs bitsandbytes and a GPU to test on; refusing beats
            # silently training a bf16 base the spec said was 4-bit.
            problems.append(
                Problem(
                    "adapter.quantization",
                    adapter.quantization,
                    "QLoRA (a 4-bit base through bitsandbytes) is not built yet in this "
                    "version; use quantization: none (LoRA on a bf16 base)",
                )
            )
    elif isinstance(adapter, AdapterSpec) and adapter.quantization != "none":
        problems.append(
            Problem(
                "adapter.quantization",
                adapter.quantization,
                "quantizes the frozen base under an adapter; set adapter.type: lora",
            )
        )
    return problems


def cross_checks(s: Mapping[str, Section]) -> list[Problem]:
    problems: list[Problem] = []
    search, sched, training = s.get("search"), s.get("scheduler"), s.get("training")
    model = s.get("model")
    task = model.task if isinstance(model, ModelSpec) else SEQUENCE_CLASSIFICATION
    problems += _check_task(task, s.get("data"), s.get("adapter"), s.get("resources"))
    if isinstance(search, SearchSpec):
        if search.metric not in M.TASK_OBJECTIVES[task]:
            problems.append(
                Problem(
                    "search.metric",
                    search.metric,
                    f"not reported by model.task {task}; one of {sorted(M.TASK_OBJECTIVES[task])}",
                )
            )
        elif search.mode and search.mode != M.OBJECTIVES[search.metric]:
            natural = M.OBJECTIVES[search.metric]
            problems.append(
                Problem(
                    "search.mode",
                    search.mode,
                    f"{search.metric} is better {'higher' if natural == 'max' else 'lower'}: "
                    f"use mode: {natural}, or leave mode out (it follows the metric)",
                )
            )
        problems += _check_space(search)
    res = s.get("resources")
    if (
        isinstance(res, ResourcesSpec)
        and res.trial_mode == "single_process"
        and res.num_workers != 1
    ):
        problems.append(
            Problem(
                "resources.num_workers",
                res.num_workers,
                "single_process trials run one worker; use 1 or trial_mode: train",
            )
        )
    if isinstance(sched, SchedulerSpec):
        problems += _check_rungs(sched, training, task)
    if isinstance(search, SearchSpec) and search.probe and task != SEQUENCE_CLASSIFICATION:
        problems.append(
            Problem(
                "search.probe",
                True,
                f"the probe fits a classifier on the frozen features: model.task "
                f"{SEQUENCE_CLASSIFICATION} only (for {task}, the summary's zero-shot score "
                "says how much the base model already knows); use false",
            )
        )
    if isinstance(search, SearchSpec) and isinstance(res, ResourcesSpec):
        gpus = res.num_workers * res.gpus_per_worker
        if search.budget.accelerator_hours is not None and not gpus:
            problems.append(
                Problem(
                    "search.budget.accelerator_hours",
                    search.budget.accelerator_hours,
                    "the trials reserve no GPU (resources.gpus_per_worker: 0): limit "
                    f"trial_hours instead (e.g. trial_hours: {search.budget.accelerator_hours:g})",
                )
            )
    if isinstance(sched, SchedulerSpec) and sched.type in ("pbt", "pb2"):
        problems += _check_population(sched, search, training)
    if isinstance(search, SearchSpec) and search.reevaluate.enabled:
        problems += _check_reevaluate(search, sched)
    run = s.get("run")
    if isinstance(run, RunSpec):
        problems += _check_no_credentials(run.storage_path, "run.storage_path")
    tracking = s.get("tracking")
    if isinstance(tracking, TrackingSpec) and tracking.mlflow_uri:
        problems += _check_no_credentials(
            tracking.mlflow_uri,
            "tracking.mlflow_uri",
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN",
        )
    if isinstance(tracking, TrackingSpec) and tracking.registered_model and not tracking.mlflow_uri:
        problems.append(
            Problem(
                "tracking.registered_model",
                tracking.registered_model,
                "a registry needs an MLflow server: set tracking.mlflow_uri too",
            )
        )
    dist = s.get("distributed")
    if isinstance(dist, DistributedSpec) and dist.strategy == "deepspeed":
        problems += _check_deepspeed(dist, training, search, sched, res)
    if isinstance(search, SearchSpec) and search.algorithm in ("optuna", "qmc"):
        for key, entry in search.space.items():
            if isinstance(entry, Mapping) and "grid" in entry:
                problems.append(
                    Problem(
                        f"search.space.{key}",
                        dict(entry),
                        f"{search.algorithm} cannot search a grid; use {{choice: [...]}} or "
                        "search.algorithm: random",
                    )
                )
    if (
        isinstance(sched, SchedulerSpec)
        and isinstance(training, TrainingSpec)
        and sched.type in ("asha", "hyperband")
    ):
        space = search.space if isinstance(search, SearchSpec) and not _check_space(search) else {}
        budget = budget_in(sched.time_attr, training, space)
        max_t = sched.max_t or budget
        if sched.max_t and budget and sched.max_t > budget:
            problems.append(
                Problem(
                    "scheduler.max_t",
                    sched.max_t,
                    f"exceeds the training budget of {budget:g} {sched.time_attr}s",
                )
            )
        if max_t is None:
            problems.append(
                Problem(
                    "scheduler.max_t",
                    MISSING,
                    f"needed when time_attr={sched.time_attr!r} and the budget is set in other units",
                )
            )
        elif sched.grace_period != "auto" and sched.grace_period >= max_t:
            problems.append(
                Problem(
                    "scheduler.grace_period",
                    sched.grace_period,
                    f"must be < max_t ({max_t:g}); ASHA could never stop a trial",
                )
            )
    return problems
