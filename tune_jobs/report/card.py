"""The model card: ``best_model/README.md`` in the Hugging Face format (YAML metadata, then
Markdown), written once the run's summary is, from the summary and the spec alone.

It says what a person picking the model up needs: the base model, the data and its
splits, the chosen hyperparameters, the validation and test scores beside the baseline
and the family's defaults, what the sweep cost, and the command that reproduces it.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Any

import yaml

from cluster import storage
from trainers.tasks import get_task
from tune_jobs.spec import JobSpec
from tune_jobs.tables import fmt

CARD_FILE = "README.md"
#: ``org/name``: a hub id, which the card's ``base_model`` may name (a folder may not)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PIPELINE = {"sequence_classification": "text-classification", "causal_lm": "text-generation"}


def _version() -> str:
    try:
        return metadata.version("tunefleet")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_card(spec: JobSpec, summary: dict[str, Any]) -> str:
    """The card's text for the run ``summary`` describes (its best model exported)."""
    best = summary["best"]
    task = get_task(summary.get("task") or spec.model.task)
    metric = summary["metric"]
    data = summary.get("data") or {}
    base = spec.model.name_or_path
    test = best.get("test") or {}
    validation = best.get("reloaded_validation") or {}
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": _PIPELINE.get(spec.model.task, spec.model.task),
        "tags": ["tunefleet", "hyperparameter-search"]
        + (["lora", "peft"] if spec.adapter.type == "lora" else []),
    }
    if _HUB_ID.match(base) and not os.path.exists(base):
        meta["base_model"] = base
    results = [
        {"type": k, "name": f"{split} {k}", "value": round(float(v), 4)}
        for split, scored in (("validation", validation), ("test", test))
        for k, v in scored.items()
        if k in task.scores and isinstance(v, int | float)
    ]
    if results:
        meta["model-index"] = [
            {
                "name": summary["run"],
                "results": [
                    {
                        "task": {"type": meta["pipeline_tag"]},
                        "dataset": {"name": spec.data.source, "type": spec.data.source},
                        "metrics": results,
                    }
                ],
            }
        ]
    baseline = (summary.get("majority_baseline") or {}).get("test_accuracy")
    versus = summary.get("best_vs_defaults")
    seconds = sum(t["last"].get("time_total_s") or 0.0 for t in summary.get("trials", []))
    seconds += (summary.get("reevaluation") or {}).get("trial_seconds") or 0.0
    spec_file = storage.join(best["export_dir"], "job_spec.yaml")
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {summary['run']}: the best model of a tunefleet sweep",
        "",
        f"Fine-tuned from `{base}` ({spec.model.task.replace('_', ' ')}"
        + (
            f", LoRA r={spec.adapter.r} alpha={fmt(spec.adapter.alpha)}"
            if spec.adapter.type == "lora"
            else ""
        )
        + f") by tunefleet {_version()}. The weights are the checkpoint of the trial "
        f"`{best.get('exported_trial') or best['trial']}` at its best evaluation, reloaded "
        "and scored again after the export.",
        "",
        "## Data",
        "",
        f"- source: `{spec.data.source}`" + (f" (`{spec.data.path}`)" if spec.data.path else ""),
        f"- rows: {data.get('rows')}; train {data.get('train')}, validation "
        f"{data.get('validation')}, test {data.get('test')} (seed {spec.run.seed})",
        f"- labels: {', '.join(map(str, data.get('label_names') or [])) or '-'}",
        "",
        "## Chosen hyperparameters",
        "",
        *(f"- `{k}`: {fmt(v)}" for k, v in best["config"].items()),
        *(
            f"- `{k}`: {fmt(v)} (not searched)"
            for k, v in spec.training.model_dump().items()
            if k not in best["config"]
            and k in ("learning_rate", "num_train_epochs", "max_steps")
            and v is not None
        ),
        "",
        "## Scores",
        "",
        f"| split | {' | '.join(task.scores)} |",
        "|---|" + "---|" * len(task.scores),
        *(
            f"| {split} | " + " | ".join(fmt(scored.get(k, "-")) for k in task.scores) + " |"
            for split, scored in (("validation", validation), ("test (scored once)", test))
            if scored
        ),
        "",
    ]
    if baseline is not None and baseline == baseline:
        lines.append(f"- majority baseline (test accuracy): {fmt(baseline)}")
    if versus:
        lines.append(
            f"- the family's default hyperparameters: {metric} {fmt(versus['defaults'])} "
            f"against the best's {fmt(versus['best'])} (validation)"
        )
    again = summary.get("reevaluation") or {}
    if again.get("chosen"):
        chosen = next(c for c in again["configs"] if c["trial"] == again["chosen"])
        spread = "" if chosen["sd"] is None else f" ± {fmt(chosen['sd'])}"
        lines.append(
            f"- chosen by its mean over {len(chosen['seeds'])} new seeds "
            f"({metric} {fmt(chosen['mean'])}{spread}; the sweep's one seed: "
            f"{fmt(chosen['sweep'])}); this model is its best seed, "
            f"{(again.get('export') or {}).get('seed', '-')}"
        )
    lines += [
        "",
        "## The sweep",
        "",
        f"- {len(summary.get('trials', []))} trials ({spec.search.algorithm} search, "
        f"{spec.scheduler.type} scheduler), searched on validation {metric}",
        f"- cost: {seconds:.0f} trial-seconds, {summary.get('wall_time_s', 0):.0f} s wall time"
        + (
            f" (the retraining on new seeds: {again['trial_seconds']:.0f} trial-seconds of them)"
            if again.get("trial_seconds")
            else ""
        ),
        f"- report: `{storage.join(summary['run_dir'], 'report.html')}`",
        "",
        "## Reproduce",
        "",
        "The spec the sweep ran with is beside this card; the same seed gives the same trials:",
        "",
        "```",
        f"tunefleet run {spec_file} run.name={summary['run']}-again",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(spec: JobSpec, summary: dict[str, Any]) -> str | None:
    """Write the card into the exported model's folder; its path (None: nothing exported)."""
    best = summary.get("best") or {}
    if not best.get("export_dir"):
        return None
    path = storage.join(best["export_dir"], CARD_FILE)
    storage.write_text(path, model_card(spec, summary))
    return path
