"""Storage paths: local folders and URIs, query strings kept, one filesystem per root."""

from __future__ import annotations

import pickle

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
