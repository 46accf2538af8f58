"""Result storage: a local folder, a shared mount (NFS/PVC) or an S3-compatible URI.

Every file tunefleet writes itself, and everything Ray Tune and Ray Train
write, goes through one ``pyarrow.fs`` filesystem per storage root. For a URI
the filesystem is built once from the URI (``s3://bucket/prefix``) and handed
to Ray as an object (``RunConfig(storage_filesystem=...)``), so Ray never
re-parses a URI. Credentials and the endpoint come from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for MinIO, Ceph or moto), never from the job spec: a
pickled filesystem built this way holds no secret (checked by the S3 test).
A query string (``s3://b/p?endpoint_override=...``) is allowed and is kept on
every joined path.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import posixpath
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

T = TypeVar("T")
log = logging.getLogger("tunefleet")

#: How long an operation on remote storage (a URI) keeps being retried while the storage
#: does not answer (connection refused or reset, timeouts, 5xx, throttling), with
#: exponential backoff from ``RETRY_FIRST_S`` up to ``RETRY_MAX_S`` between tries; then
#: ``StorageUnavailable``. The S3 client's own few quick retries come first.
RETRY_S = float(os.environ.get("TUNEFLEET_STORAGE_RETRY_S", "300"))
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 20.0

#: What the text of an error of an unreachable (not a refusing) storage contains:
#: pyarrow's AWS SDK errors, botocore's, and the OS's.
_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "Connection refused",
    "Connection reset",
    "Could not connect",
    "Failed to connect",
    "timed out",
    "Timeout",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "INTERNAL_FAILURE",
    "Service Unavailable",
    "InternalError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "Broken pipe",
    "Couldn't connect",
)


class StorageUnavailable(OSError):
    """Remote storage did not answer within ``RETRY_S`` seconds of retries."""


def unreachable(exc: BaseException) -> bool:
    """Is ``exc`` storage that did not answer (worth retrying), not one that said no?"""
    if isinstance(exc, (FileNotFoundError, PermissionError, StorageUnavailable)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _UNREACHABLE)


def retrying(what: str, path: str, op: Callable[[], T]) -> T:
    """``op()``, retried with backoff while the storage at ``path`` does not answer; a
    local path is tried once. ``StorageUnavailable`` (naming the path and how long it was
    tried) once ``RETRY_S`` seconds are spent. Each retry repeats the whole
    operation, which must be idempotent (a PUT of the same bytes, a read, a listing)."""
    if not is_uri(path):
        return op()
    budget = RETRY_S
    started, delay, tries = time.monotonic(), RETRY_FIRST_S, 0
    while True:
        tries += 1
        try:
            return op()
        except Exception as exc:
            if not unreachable(exc):
                raise
            waited = time.monotonic() - started
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            if waited + delay > budget:
                raise StorageUnavailable(
                    f"storage: {what} {path} failed: the storage did not answer for {waited:.0f} "
                    f"s ({tries} tries, TUNEFLEET_STORAGE_RETRY_S={budget:g}): {cause}. Check "
                    "the endpoint (AWS_ENDPOINT_URL or the URI's endpoint_override) and the "
                    "network; what was written before is untouched"
                ) from exc
            log.warning("storage: %s %s: %s; retry %d in %.1f s", what, path, cause, tries, delay)
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, RETRY_MAX_S)


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` storage (S3, GCS, ...)."""
    return "://" in path


def normalize(storage_path: str) -> str:
    """An absolute local path (Tune needs one) or the URI unchanged."""
    return (
        storage_path if is_uri(storage_path) else os.path.abspath(os.path.expanduser(storage_path))
    )


def split_query(uri: str) -> tuple[str, str]:
    """``s3://b/p?x=1`` -> (``s3://b/p``, ``?x=1``)."""
    base, sep, query = uri.partition("?")
    return base, (sep + query if sep else "")


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URIs alike; a URI's query string stays at the end."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, query = split_query(base)
    return posixpath.join(head, *parts) + query


@functools.lru_cache(maxsize=16)
def _filesystem(root: str) -> pafs.FileSystem:
    # One filesystem per scheme, bucket and query: building an S3 client resolves
    # credentials and the endpoint, which is too slow to repeat for every file.
    return pafs.PyFileSystem(RetryingHandler(_remote_filesystem(root), root))


def _remote_filesystem(root: str) -> pafs.FileSystem:
    """The filesystem of a URI; for S3, without background writes: the retrying wrapper's
    streams are written from pyarrow's IO threads (``copy_files``), and a background
    write waits for a thread of that same pool (with every thread in a wrapper's
    ``close``, a deadlock: seen with Tune's syncer)."""
    fs = pafs.FileSystem.from_uri(root)[0]
    if isinstance(fs, pafs.S3FileSystem):
        _, (options,) = fs.__reduce__()
        fs = pafs.S3FileSystem._reconstruct({**options, "background_writes": False})
    return fs


#: Files up to this size are buffered in memory on their way to or from remote storage;
#: larger ones in a temporary file.
SPOOL_BYTES = 64 << 20
CHUNK_BYTES = 8 << 20


class RetryingHandler(pafs.FileSystemHandler):
    """A remote filesystem (S3, GCS, ...) whose every operation is ``retrying``: wrapped
    around the filesystem of every URI, so Ray Tune's and Ray Train's own reads and writes
    (experiment state, checkpoints) wait out an outage as tunefleet's do.

    A write is buffered and sent whole when the stream closes, and sent again whole if
    the storage did not answer (S3 applies a PUT whole, so a retry never leaves half a
    file); a read fetches the whole file before the first byte is handed out.
    """

    def __init__(self, inner: pafs.FileSystem, root: str) -> None:
        self.inner = inner
        self.scheme = urlsplit(root).scheme

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingHandler) and self.inner.equals(other.inner)

    def __hash__(self) -> int:
        return hash(self.inner.type_name)

    def _do(self, what: str, path: str, op: Callable[[], T]) -> T:
        return retrying(what, f"{self.scheme}://{path}", op)

    def get_type_name(self) -> str:
        return f"retrying+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._do(
            "look up", paths[0] if paths else "", lambda: self.inner.get_file_info(paths)
        )

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._do("list", selector.base_dir, lambda: self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._do("create", path, lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._do("delete", path, lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._do(
            "delete",
            path,
            lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
        )

    def delete_root_dir_contents(self) -> None:
        self._do("delete", "/", lambda: self.inner.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        self._do("delete", path, lambda: self.inner.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._do("move", src, lambda: self.inner.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._do("copy", src, lambda: self.inner.copy_file(src, dest))

    def _fetch(self, path: str) -> Any:
        def fetch() -> Any:
            buf = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - handed out
            with self.inner.open_input_stream(path) as fh:
                while chunk := fh.read(CHUNK_BYTES):
                    buf.write(chunk)
            buf.seek(0)
            return buf

        return pa.PythonFile(self._do("read", path, fetch), mode="r")

    def open_input_stream(self, path: str) -> Any:
        return self._fetch(path)

    def open_input_file(self, path: str) -> Any:
        return self._fetch(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return pa.PythonFile(_Upload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.inner.open_append_stream(path, metadata=metadata)


class _Upload(io.RawIOBase):
    """An output stream that buffers, then PUTs the whole file on close, retried."""

    def __init__(self, handler: RetryingHandler, path: str, metadata: Any) -> None:
        super().__init__()
        self.handler, self.path, self.metadata = handler, path, metadata
        self.buf = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed in close()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self.buf.write(data)

    def tell(self) -> int:
        return self.buf.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.handler._do("write", self.path, self._put)
        finally:
            self.buf.close()
            super().close()

    def _put(self) -> None:
        self.buf.seek(0)
        with self.handler.inner.open_output_stream(self.path, metadata=self.metadata) as out:
            while chunk := self.buf.read(CHUNK_BYTES):
                out.write(chunk)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path on it for a local path or a URI."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), path
    head, query = split_query(path)
    parts = urlsplit(head)
    fs = _filesystem(f"{parts.scheme}://{parts.netloc}{query}")
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def ray_storage(root: str) -> dict[str, object]:
    """``storage_path`` and ``storage_filesystem`` for a Tune or Train ``RunConfig``."""
    if not is_uri(root):
        return {"storage_path": root}
    fs, path = resolve(root)
    return {"storage_path": path, "storage_filesystem": fs}


def uri_of(fs: pafs.FileSystem, path: str, like: str) -> str:
    """A path Ray gave on ``fs`` as a URI in the form of storage root ``like`` (with its query)."""
    if isinstance(fs, pafs.LocalFileSystem) or not is_uri(like):
        return path
    return f"{urlsplit(like).scheme}://{path.lstrip('/')}" + split_query(like)[1]


def exists(path: str) -> bool:
    """Does a file or folder exist at ``path``?"""
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def list_names(path: str) -> list[str]:
    """Names directly under folder ``path`` (empty if it does not exist)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    return [posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p))]


def delete_dir(path: str) -> None:
    """Remove folder ``path`` and everything under it (no-op if missing)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def download_dir(src: str, local_dir: str) -> None:
    """Copy folder ``src`` (local path or URI) to a local folder."""
    fs, p = resolve(src)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(
        p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )


def download_file(src: str, local_path: str) -> None:
    """Copy one file ``src`` (local path or URI) to a local path."""
    fs, p = resolve(src)
    os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
    with fs.open_input_stream(p) as fh, open(local_path, "wb") as out:
        while chunk := fh.read(1 << 20):
            out.write(chunk)


def write_text(dest: str, text: str) -> None:
    """Write a text file atomically: a reader (or a crash) sees the old file or the new one,
    never half of one. Local: a uniquely named temporary file beside it, flushed to disk,
    then renamed over it. A URI: one object PUT, which S3 applies whole."""
    if not is_uri(dest):
        folder = os.path.dirname(dest) or "."
        os.makedirs(folder, exist_ok=True)
        # a unique name beside it, created with the umask's mode (mkstemp's is 0600: a
        # report or summary in a shared folder would be readable by its writer alone)
        tmp = os.path.join(folder, f".{os.path.basename(dest)}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    fs, p = resolve(dest)
    with fs.open_output_stream(p) as out:
        out.write(text.encode())


def replace_dir(local_dir: str, dest: str, last: str | None = None) -> None:
    """Put a local folder at ``dest`` in place of whatever is there, without a moment where
    a crash leaves neither the old folder nor the new one.

    Local: copied beside ``dest`` under a temporary name, then swapped in by two renames
    (the old folder goes only once the new one is in place). A URI has no rename: each
    file is one whole PUT, ``last`` (a file in ``local_dir``, the marker that the folder
    is complete) is written after all others, and files the new folder lacks go at the end.
    """
    if not is_uri(dest):
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        staged = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.new-", dir=parent)
        old = f"{staged.replace('.new-', '.old-')}"
        try:
            shutil.copytree(local_dir, staged, dirs_exist_ok=True)
            if os.path.exists(dest):
                os.replace(dest, old)
            os.replace(staged, dest)
        except BaseException:
            if os.path.exists(old) and not os.path.exists(dest):
                os.replace(old, dest)  # put the old folder back
            shutil.rmtree(staged, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    fs, p = resolve(dest)
    fs.create_dir(p, recursive=True)
    names = sorted(
        os.path.relpath(os.path.join(root, f), local_dir)
        for root, _, files in os.walk(local_dir)
        for f in files
    )
    for name in sorted(names, key=lambda n: n == last):
        target = posixpath.join(p, name.replace(os.sep, "/"))
        with open(os.path.join(local_dir, name), "rb") as fh, fs.open_output_stream(target) as out:
            while chunk := fh.read(1 << 22):  # streamed: a model's weights can be GBs
                out.write(chunk)
    keep = {posixpath.join(p, n.replace(os.sep, "/")) for n in names}
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if info.type == pafs.FileType.File and info.path not in keep:
            fs.delete_file(info.path)


def read_text(src: str) -> str:
    """Read a text file from a local path or URI."""
    fs, p = resolve(src)
    with fs.open_input_stream(p) as fh:
        return fh.read().decode()


def next_free_name(base: str, name: str) -> str:
    """``name`` if ``base/name`` is free, else ``name-2``, ``name-3``, ... (deterministic)."""
    taken = set(list_names(base))
    if name not in taken:
        return name
    k = 2
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


def total_bytes(path: str) -> tuple[int, int]:
    """(files, bytes) under folder ``path``."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return 0, 0
    files = [
        i
        for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
        if i.type == pafs.FileType.File
    ]
    return len(files), sum(i.size or 0 for i in files)


class Exists(RuntimeError):
    """A conditional write found the file there already (or changed since it was read)."""


def _s3_client(uri: str):
    """A boto3 S3 client for ``uri``'s endpoint: the query's ``endpoint_override`` or, like
    pyarrow, ``AWS_ENDPOINT_URL`` from the environment (boto3 reads it itself)."""
    from urllib.parse import parse_qs

    import boto3

    query = parse_qs(split_query(uri)[1].lstrip("?"))
    endpoint = None
    if "endpoint_override" in query:
        scheme = query.get("scheme", ["https"])[0]
        endpoint = f"{scheme}://{query['endpoint_override'][0]}"
    return boto3.client("s3", endpoint_url=endpoint)


def _bucket_key(uri: str) -> tuple[str, str]:
    _, path = resolve(uri)
    bucket, _, key = path.partition("/")
    return bucket, key


def create_exclusive(path: str, text: str) -> None:
    """Write ``text`` to ``path`` only if nothing is there; ``Exists`` otherwise.

    Local: ``O_CREAT | O_EXCL``. S3: a conditional PUT (``If-None-Match: *``, which
    pyarrow cannot send; boto3 can). Other URIs have no atomic create: refused.
    """
    if not is_uri(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError as exc:
            raise Exists(path) from exc
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return
    if not path.startswith("s3://"):
        raise ValueError(
            f"{path}: no atomic create-if-absent on this storage; use a local path or s3://"
        )
    import botocore.exceptions

    bucket, key = _bucket_key(path)
    client = _s3_client(path)
    try:
        retrying(
            "create",
            path,
            lambda: client.put_object(Bucket=bucket, Key=key, Body=text.encode(), IfNoneMatch="*"),
        )
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in (
            "PreconditionFailed",
            "ConditionalRequestConflict",
        ):
            raise Exists(path) from exc
        raise


def replace_unchanged(path: str, text: str, expected: str) -> None:
    """Overwrite ``path`` with ``text`` only if it still holds ``expected``; ``Exists`` otherwise.

    Local: the file is renamed away first (one rename wins), then re-created exclusively.
    S3: a PUT conditional on the ETag of what was read.
    """
    if not is_uri(path):
        claimed = f"{path}.{os.getpid()}.claimed"
        try:
            os.rename(path, claimed)
        except FileNotFoundError as exc:
            raise Exists(path) from exc
        with open(claimed) as fh:
            seen = fh.read()
        if seen != expected:  # someone else's file: put it back untouched
            os.rename(claimed, path)
            raise Exists(path)
        os.remove(claimed)
        create_exclusive(path, text)
        return
    import botocore.exceptions

    bucket, key = _bucket_key(path)
    client = _s3_client(path)
    try:
        head = retrying("read", path, lambda: client.get_object(Bucket=bucket, Key=key))
        if head["Body"].read().decode() != expected:
            raise Exists(path)
        retrying(
            "write",
            path,
            lambda: client.put_object(
                Bucket=bucket, Key=key, Body=text.encode(), IfMatch=head["ETag"]
            ),
        )
    except botocore.exceptions.ClientError as exc:
        raise Exists(path) from exc


def delete_file(path: str) -> None:
    """Remove one file (no-op if missing)."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_file(p)
