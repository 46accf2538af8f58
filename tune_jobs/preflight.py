"""What the job spec alone cannot show, checked before Ray starts: the model, the storage
folder, and whether the data fits the batch sizes.

``tune_jobs.spec`` checks a spec's shape and its cross-section rules; the data loader
(``trainers.data``) checks the files. What is left needs the outside world: does the
model folder exist, does it have a sequence-classification head, does ``max_length`` fit
its positions, can the storage folder be written, is a searched batch larger than a
worker's share of the training rows? ``preflight`` asks all of these and raises one
``SpecError`` listing every problem (exit code 2, one screen), before anything is
started or written. It costs a config and tokenizer load (about a second).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from cluster import storage
from trainers.data import Splits
from tune_jobs.spec import JobSpec, Problem, SpecError

MODEL_KEY = "model.name_or_path"


def preflight(spec: JobSpec, splits: Splits | None = None, model: bool = True) -> None:
    """Raise ``SpecError`` naming every problem found (``splits``: check the batch sizes)."""
    problems = check_storage(spec)
    if model:
        problems += check_model(spec)
    if splits is not None:
        problems += check_batches(spec, splits)
    if problems:
        raise SpecError(problems)


# --- the model -------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    """A path, not a hub name: absolute, relative with ./ or ../, ~, or present on disk."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def _remote_code(path: str) -> str:
    """The code a model folder (or hub name) asks to run (its config's ``auto_map``), as
    text; empty if none, or if its config cannot be read (reported by the caller)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError):
        return ""
    auto_map = config.get("auto_map") or {}
    return ", ".join(f"{k}: {v}" for k, v in sorted(auto_map.items()))


def check_model(spec: JobSpec) -> list[Problem]:
    """The model folder (or hub name) loads, has a classification head and enough positions."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    from trainers.model import ModelError, resolve_model_path

    name = spec.model.name_or_path
    try:
        path = os.path.expanduser(resolve_model_path(name))
    except ModelError as exc:
        return [Problem(MODEL_KEY, name, str(exc).removeprefix(f"{MODEL_KEY}: {name!r}: "))]
    if _looks_local(name) or name.startswith("package:"):
        if not os.path.exists(path):
            return [
                Problem(
                    MODEL_KEY,
                    name,
                    "no such folder; give a model folder (with "
                    "config.json), a hub name, or package:<module>",
                )
            ]
        if not os.path.isdir(path):
            return [Problem(MODEL_KEY, name, "a file; give the model's folder (with config.json)")]
        if not os.path.exists(os.path.join(path, "config.json")):
            return [
                Problem(
                    MODEL_KEY,
                    name,
                    "the folder has no config.json: not a saved "
                    "transformers model (save one with save_pretrained)",
                )
            ]
    trust = spec.model.trust_remote_code
    if not trust:
        code = _remote_code(path)
        if code:
            return [
                Problem(
                    "model.trust_remote_code",
                    False,
                    f"{name} ships its own Python code ({code}), which runs when it loads; "
                    "read it, then set model.trust_remote_code: true to run it (on the driver "
                    "and every worker), or use a model that transformers implements itself",
                )
            ]
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        return [
            Problem(
                MODEL_KEY,
                name,
                f"cannot load its config ({first}); a hub name needs "
                "the hub or a local cache: give a local folder offline",
            )
        ]
    problems = []
    kind = getattr(config, "model_type", None)
    own_head = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    if kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not own_head:
        problems.append(
            Problem(
                MODEL_KEY,
                name,
                f"model type {kind!r} has no sequence-classification head "
                "in transformers; use one that has (bert, roberta, deberta-v2, distilbert, "
                "llama, ...)",
            )
        )
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and spec.model.max_length > positions:
        problems.append(
            Problem(
                "model.max_length",
                spec.model.max_length,
                f"the model has {positions} positions; use at most {positions}",
            )
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        problems.append(Problem(MODEL_KEY, name, f"its tokenizer does not load: {first}"))
        return problems
    # Without its vocabulary files transformers builds a tokenizer of special tokens only,
    # and every word becomes [UNK]: a sweep that trains on nothing.
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) * 2 < vocab:
        problems.append(
            Problem(
                MODEL_KEY,
                name,
                f"its tokenizer has {len(tokenizer)} tokens for a model of {vocab}: the folder "
                "lacks the tokenizer's files (tokenizer.json, vocab.txt, ...); save the "
                "tokenizer with the model (tokenizer.save_pretrained)",
            )
        )
    return problems


# --- the storage folder -------------------------------------------------------------


def check_storage(spec: JobSpec) -> list[Problem]:
    """A local storage folder must be creatable and writable: probed with a temporary folder
    in its nearest existing parent, removed at once (a bucket is checked when Ray is up)."""
    root = spec.run.storage_path
    if storage.is_uri(root):
        return []
    path = os.path.abspath(os.path.expanduser(root))
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [
            Problem(
                "run.storage_path", root, f"{parent!r} is a file, so no folder can be made under it"
            )
        ]
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".tunefleet-probe-", dir=parent))
    except OSError as exc:
        return [
            Problem(
                "run.storage_path",
                root,
                f"cannot write under {parent!r} ({exc.strerror}); use a folder you can "
                "write, e.g. ./tunefleet-results, or a bucket (s3://...)",
            )
        ]
    return []


# --- the data against the batch sizes ---------------------------------------------


def _searched_values(entry: Any) -> list[Any]:
    """The values a search-space entry can take, where it lists them (choice, grid)."""
    if isinstance(entry, dict):
        for kind in ("choice", "grid"):
            if kind in entry:
                return list(entry[kind])
        return []
    return [entry]


def check_batches(spec: JobSpec, splits: Splits) -> list[Problem]:
    """A micro-batch larger than a worker's share of the training rows is a mistake (every
    epoch would be one short step)."""
    workers = spec.resources.num_workers
    per_worker = len(splits.train) // workers
    where = f"{len(splits.train)} training rows / {workers} worker(s)"
    problems = []
    batch = spec.training.per_device_train_batch_size
    searched = spec.search.space.get("per_device_train_batch_size")
    if searched is None and batch > per_worker:
        problems.append(
            Problem(
                "training.per_device_train_batch_size",
                batch,
                f"larger than the {per_worker} rows each worker trains on "
                f"({where}); use at most {per_worker}",
            )
        )
    too_big = [v for v in _searched_values(searched) if isinstance(v, int) and v > per_worker]
    if too_big:
        problems.append(
            Problem(
                "search.space.per_device_train_batch_size",
                searched,
                f"{too_big} larger than the {per_worker} rows each worker "
                f"trains on ({where}); keep every value at most {per_worker}",
            )
        )
    return problems
