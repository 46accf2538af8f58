"""Storage paths: local folders and URIs, query strings kept, one filesystem per root."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster import storage


def test_join_keeps_a_uri_query_string_at_the_end():
    base = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    joined = storage.join(base, "sweep", "summary.json")
    assert (
        joined == "s3://bucket/runs/sweep/summary.json?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.join("s3://bucket/runs", "a") == "s3://bucket/runs/a"
    assert storage.join("/tmp/x", "a", "b") == "/tmp/x/a/b"


def test_resolve_strips_scheme_and_query_and_reuses_the_filesystem(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-unit-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs1, path1 = storage.resolve("s3://bucket/runs/a?endpoint_override=127.0.0.1:9&scheme=http")
    fs2, path2 = storage.resolve("s3://bucket/runs/b?endpoint_override=127.0.0.1:9&scheme=http")
    assert isinstance(fs1, pafs.S3FileSystem) and fs1 is fs2
    assert (path1, path2) == ("bucket/runs/a", "bucket/runs/b")
    # what Ray is handed: the filesystem object and a prefix-stripped path
    cfg = storage.ray_storage("s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http")
    assert cfg["storage_path"] == "bucket/runs" and cfg["storage_filesystem"] is fs1
    # a pickled filesystem (shipped to every trial and worker) carries no credentials
    assert b"planted-unit-secret" not in pickle.dumps(fs1)


def test_local_paths_stay_local(tmp_path):
    fs, path = storage.resolve(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    assert storage.ray_storage(str(tmp_path)) == {"storage_path": str(tmp_path)}


def test_uri_of_a_path_ray_returns_takes_the_roots_form():
    fs, _ = storage.resolve("s3://bucket/x?endpoint_override=h:1&scheme=http")
    assert (
        storage.uri_of(
            fs, "bucket/runs/ckpt", like="s3://bucket/runs?endpoint_override=h:1&scheme=http"
        )
        == "s3://bucket/runs/ckpt?endpoint_override=h:1&scheme=http"
    )
    assert storage.uri_of(pafs.LocalFileSystem(), "/a/b", like="/a") == "/a/b"


@pytest.mark.parametrize("path", ["/tmp/x", "./results", "~/r"])
def test_normalize_makes_local_paths_absolute(path):
    assert storage.normalize(path).startswith("/")


def test_write_text_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    """A writer SIGKILLed (by its pid) while it writes 400 MB: the file is the old one or the
    new one, never part of the new one."""
    import signal
    import subprocess
    import sys
    import time

    dest = tmp_path / "summary.json"
    dest.write_text("old\n")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from cluster import storage; text = 'x' * 400_000_000; "
            "print('ready', flush=True); storage.write_text(sys.argv[1], text)",
            str(dest),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).parents[2]),
    )
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    assert child.poll() is None, "the writer finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    size = dest.stat().st_size
    assert size in (4, 400_000_000), size
    if size == 4:
        assert dest.read_text() == "old\n"


def test_replace_dir_failing_mid_copy_keeps_the_old_folder(tmp_path, monkeypatch):
    import shutil

    dest = tmp_path / "best_model"
    dest.mkdir()
    (dest / "model.safetensors").write_text("old weights")
    new = tmp_path / "new"
    new.mkdir()
    (new / "model.safetensors").write_text("new weights")
    (new / "metrics.json").write_text("{}")

    real_copytree = shutil.copytree

    def copy_then_fail(src, dst, **kw):
        real_copytree(src, dst, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        storage.replace_dir(str(new), str(dest))
    assert (dest / "model.safetensors").read_text() == "old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best_model",
        "new",
    ]  # nothing staged left

    monkeypatch.setattr(shutil, "copytree", real_copytree)
    storage.replace_dir(str(new), str(dest))
    assert (dest / "model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model", "new"]
