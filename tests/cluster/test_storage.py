"""Storage paths: local folders and URIs, query strings kept, one filesystem per root."""

from __future__ import annotations

import os
import pickle
import threading
import time
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
    assert fs1 is fs2
    # S3, behind the retrying handler every URI's filesystem has (Ray's reads and writes too)
    assert isinstance(fs1.handler, storage.RetryingHandler)
    assert isinstance(fs1.handler.inner, pafs.S3FileSystem)
    assert (path1, path2) == ("bucket/runs/a", "bucket/runs/b")
    # what Ray is handed: the filesystem object and a prefix-stripped path
    cfg = storage.ray_storage("s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http")
    assert cfg["storage_path"] == "bucket/runs" and cfg["storage_filesystem"] is fs1
    # a pickled filesystem (shipped to every trial and worker) carries no credentials
    assert b"planted-unit-secret" not in pickle.dumps(fs1)
    assert pickle.loads(pickle.dumps(fs1)).equals(fs1)


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


# --- storage that stops answering for a while (a real S3 server behind a cut link) -------


@pytest.fixture(scope="module")
def s3_behind_link(tmp_path_factory):
    """``(root URI, link)``: a bucket on a moto server reached through an ``Outage`` link
    (credentials in the environment, the endpoint in the URI's query)."""
    import boto3

    from tests.e2e.cluster_procs import S3_TEST_KEYS, Outage, S3Server, environment

    server = S3Server()
    server.start(str(tmp_path_factory.mktemp("s3") / "s3.log"))
    link = Outage(server.port)
    link.restore()
    try:
        with environment(**S3_TEST_KEYS):
            boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="outage")
            yield f"s3://outage/runs?endpoint_override={link.endpoint}&scheme=http", link
    finally:
        link.cut()
        server.stop()


def _restore_after(link, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), link.restore()), daemon=True)
    thread.start()
    return thread


def test_writes_wait_out_a_storage_outage_with_backoff(s3_behind_link, tmp_path, caplog):
    root, link = s3_behind_link
    storage.write_text(storage.join(root, "before.json"), '{"kept": 1}')
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(os.urandom(1 << 20))
    (folder / "metrics.json").write_text("{}")
    link.cut()
    # longer than the S3 client's own retries (about 6 s): tunefleet's backoff takes over
    restored = _restore_after(link, 10.0)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="tunefleet"):
        storage.write_text(storage.join(root, "during.json"), '{"written": 2}')
        storage.replace_dir(str(folder), storage.join(root, "model"), last="metrics.json")
    waited = time.monotonic() - started
    restored.join()
    assert waited >= 9.5  # it waited for the link, rather than failing at once
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and "during.json" in retries[0], retries  # logged, with backoff
    assert storage.read_text(storage.join(root, "during.json")) == '{"written": 2}'
    assert storage.read_text(storage.join(root, "before.json")) == '{"kept": 1}'
    local = tmp_path / "back"
    storage.download_dir(storage.join(root, "model"), str(local))
    assert (local / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()


def test_an_outage_past_the_budget_is_a_clear_error_and_loses_nothing(s3_behind_link, monkeypatch):
    root, link = s3_behind_link
    target = storage.join(root, "summary.json")
    storage.write_text(target, "good")
    monkeypatch.setattr(storage, "RETRY_S", 3.0)
    link.cut()
    try:
        started = time.monotonic()
        with pytest.raises(storage.StorageUnavailable) as err:
            storage.write_text(target, "new")
        assert time.monotonic() - started < 30
    finally:
        link.restore()
    message = str(err.value)
    assert "summary.json" in message and "did not answer" in message
    assert "TUNEFLEET_STORAGE_RETRY_S" in message and "AWS_ENDPOINT_URL" in message
    assert storage.read_text(target) == "good"  # the file that was there is whole


def test_a_refusal_is_not_retried(s3_behind_link):
    root, _ = s3_behind_link
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(root, "no-such-file.json"))
    assert time.monotonic() - started < 5
