"""Recommended fine-tuning settings per model family, and the defaults trial of a sweep.

Every sweep first runs these settings (Tune's ``points_to_evaluate``) for the
keys it searches, so the summary can say how the best trial compares with what
a careful practitioner would have tried first.
"""

from __future__ import annotations

from typing import Any

# Sources, per family (the numbers are the papers' recommended or most-used values):
# bert       Devlin et al. 2019, BERT, app. A.3: lr in {5e-5, 3e-5, 2e-5}, batch {16, 32},
#            2-4 epochs, 10% linear warmup then linear decay, weight decay 0.01.
# roberta    Liu et al. 2019, RoBERTa, table 10 (GLUE): lr in {1e-5, 2e-5, 3e-5}, batch {16, 32},
#            weight decay 0.1, 6% warmup, linear decay, 10 epochs (we keep 3: small-data default).
# distilbert Sanh et al. 2019 fine-tune as BERT; the transformers GLUE example uses lr 5e-5.
# albert     Lan et al. 2020, ALBERT, table 14: lr 1e-5 to 5e-5 (SST-2: 1e-5, batch 32),
#            ~6% warmup, no dropout.
# electra    Clark et al. 2020, ELECTRA, table 7 (base): lr 1e-4, layer-wise LR decay 0.8,
#            10% warmup, weight decay 0, batch 32, 3 epochs.
# deberta-v2 He et al. 2021, DeBERTa, table 11 / DeBERTa-v3 model card: lr ~2e-5 (base),
#            batch 32, 10% warmup (~50-1000 steps), weight decay 0.01.
# gpt2       Radford et al. 2018 (GPT) fine-tuning: lr 6.25e-5, batch 32, 3 epochs,
#            0.2% warmup, linear decay, weight decay 0.01.
# llama etc. Taori et al. 2023 (Alpaca) / Llama fine-tuning recipes: lr 2e-5, cosine,
#            3% warmup, weight decay 0, 3 epochs.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": {
        "learning_rate": 3e-5,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 3,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
    },
    "roberta": {
        "learning_rate": 2e-5,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 3,
        "warmup_ratio": 0.06,
        "weight_decay": 0.1,
        "lr_scheduler_type": "linear",
    },
    "distilbert": {
        "learning_rate": 5e-5,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 3,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
    },
    "albert": {
        "learning_rate": 1e-5,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 3,
        "warmup_ratio": 0.06,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    },
    "electra": {
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 3,
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
        "lr_scheduler_type": "linear",
        "layerwise_lr_decay": 0.8,
        "adam_epsilon": 1e-6,
    },
    "deberta-v2": {
        "learning_rate": 2e-5,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 3,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
    },
    "gpt2": {
        "learning_rate": 6.25e-5,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 3,
        "warmup_ratio": 0.002,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
    },
    "llama": {
        "learning_rate": 2e-5,
        "per_device_train_batch_size": 16,
        "num_train_epochs": 3,
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "lr_scheduler_type": "cosine",
    },
}
#: Under a LoRA adapter the learning rate is its own: typically 10-100x full fine-tuning's
#: (torchtune's Qwen2.5-0.5B configs: 2e-3 LoRA vs 2e-5 full; its Llama-3.2-1B configs 3e-4
#: vs 2e-5; litgpt's finetune/lora.py, TRL's "LoRA without regret" and axolotl's
#: examples/llama-3/lora-1b.yml: 2e-4 to 3e-4). 2e-4 with cosine decay and a short warmup
#: (axolotl: 10 steps; LLaMA-Factory: ratio 0.1; 0.03 here, as the family's full recipe),
#: r 16 / alpha 32 / dropout 0.05 (axolotl's lora-1b.yml; alpha = 2r as LLaMA-Factory).
LORA_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "adapter.r": 16,
    "adapter.alpha": 32.0,
    "adapter.dropout": 0.05,
}
FAMILY_ALIASES = {
    "xlm-roberta": "roberta",
    "mpnet": "roberta",
    "camembert": "roberta",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "phi": "llama",
    "opt": "llama",
}
#: Families nobody has a table for get BERT's numbers: the most widely used recipe.
FALLBACK_FAMILY = "bert"


def family_of(model_type: str) -> str:
    """The table row used for ``config.model_type``."""
    family = FAMILY_ALIASES.get(model_type, model_type)
    return family if family in FAMILY_DEFAULTS else FALLBACK_FAMILY


def model_type_of(name_or_path: str) -> str:
    """``config.model_type`` of a model (reads only its config.json: runs none of its code)."""
    from transformers import PretrainedConfig

    from trainers.model import resolve_model_path

    config, _ = PretrainedConfig.get_config_dict(resolve_model_path(name_or_path))
    return str(config.get("model_type", ""))


def defaults_point(
    space: dict[str, Any], model_type: str, in_domain: bool, adapter: str = "none"
) -> dict[str, Any]:
    """The defaults trial: the family's value for every searched key that has one (under a
    LoRA adapter, ``LORA_DEFAULTS`` over the family's).

    Grid keys are left to the grid. With ``in_domain`` (searchers such as Optuna
    that reject values outside the space), values are clipped into ranges and
    snapped to the nearest choice.
    """
    values = dict(FAMILY_DEFAULTS[family_of(model_type)])
    if adapter == "lora":
        values.update(LORA_DEFAULTS)
    return fit_to_space(space, values, in_domain)


def fit_to_space(space: dict[str, Any], values: dict[str, Any], in_domain: bool) -> dict[str, Any]:
    """``values`` as a point of ``space``: only its searched (non-grid) keys; with
    ``in_domain``, clipped into ranges and snapped to the nearest numeric choice (a
    non-numeric value outside its choices is left out, for the searcher to pick)."""
    point = {}
    for key, entry in space.items():
        if key not in values or not isinstance(entry, dict):
            continue  # unknown here, or a fixed value: the user's choice, not ours to replace
        value = values[key]
        ((kind, domain),) = entry.items()
        if kind == "grid":
            continue
        if in_domain and kind == "choice" and value not in domain:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in domain)
            if not numeric:
                continue
            value = min(domain, key=lambda v: abs(v - values[key]))
        elif in_domain and kind in ("uniform", "loguniform", "randint"):
            low, high = float(domain[0]), float(domain[1])
            value = min(max(value, low), high)
            if kind == "randint":
                value = int(round(value))
        point[key] = value
    return point
