"""A spec from YAML text, a file or plain data, with ``key=value`` overrides: filled, checked
(every section, then across them), and raised once as ``SpecError``."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from trainers import metrics as M
from trainers.tasks import CAUSAL_LM
from tune_jobs.spec.checks import cross_checks, problems_from_validation
from tune_jobs.spec.errors import MISSING, Problem, SpecError
from tune_jobs.spec.sections import SECTIONS, JobSpec, Section


def _task(raw: Mapping[str, Any]) -> Any:
    model = raw.get("model")
    return model.get("task") if isinstance(model, Mapping) else None


def _default_metric(model: Any) -> str:
    """What a search watches when the spec does not say: accuracy for a classifier, the
    validation loss for a causal LM."""
    return M.EVAL_LOSS if _task({"model": model}) == CAUSAL_LM else M.EVAL_ACCURACY


def parse_spec(raw: Mapping[str, Any] | None, source: str | None = None) -> JobSpec:
    """Build a ``JobSpec`` from plain data, raising one ``SpecError`` listing every problem."""
    raw = dict(raw or {})
    problems: list[Problem] = []
    sections: dict[str, Section] = {}
    for key in raw:
        if key not in SECTIONS:
            problems.append(
                Problem(
                    str(key), MISSING, f"unknown section; valid sections: {', '.join(SECTIONS)}"
                )
            )
    for name, cls in SECTIONS.items():
        body = raw.get(name) or {}
        if not isinstance(body, Mapping):
            problems.append(Problem(name, body, "expected a mapping of keys to values"))
            continue
        if name == "search" and "metric" not in body:  # the task's own default metric
            body = {**body, "metric": _default_metric(raw.get("model"))}
        if name == "data" and body.get("format") is None and _task(raw) == CAUSAL_LM:
            # a causal LM reads instructions by default (labelled texts become them)
            body = {**body, "format": "instruction"}
        try:
            sections[name] = cls.model_validate(dict(body))
        except ValidationError as exc:
            problems += problems_from_validation(name, cls, exc)
    problems += cross_checks(sections)
    if problems:
        raise SpecError(problems, source)
    return JobSpec(**sections)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise SpecError(
            [
                Problem(
                    text,
                    MISSING,
                    "override must look like key.path=value, e.g. search.num_samples=8",
                )
            ]
        )
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError([Problem(key, MISSING, "empty part in dotted key")])
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(key, value, f"not valid YAML: {exc}")]) from exc
    return parts, parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``key=value`` override set (nested dicts created as needed)."""
    out = copy.deepcopy(dict(raw))
    problems = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except SpecError as exc:
            problems += exc.problems
            continue
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(
                    Problem(
                        ".".join(parts[: i + 1]),
                        child,
                        "is a value, not a section; cannot set a key inside it",
                    )
                )
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise SpecError(problems)
    return out


def load_spec(path: str, overrides: Iterable[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply overrides and validate; ``SpecError`` on any problem."""
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError as exc:
        raise SpecError([Problem("CONFIG", path, "file not found")]) from exc
    return load_spec_text(text, overrides, source=path)


def load_spec_text(text: str, overrides: Iterable[str] = (), source: str | None = None) -> JobSpec:
    """Validate a job spec given as YAML text (``source`` names it in errors)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([Problem("CONFIG", source, f"not valid YAML: {exc}")]) from exc
    if raw is not None and not isinstance(raw, Mapping):
        raise SpecError([Problem("CONFIG", source, "top level must be a mapping of sections")])
    return parse_spec(apply_overrides(raw or {}, overrides), source=source)
