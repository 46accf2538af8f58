"""Result storage: a local folder, a shared mount (NFS/PVC) or an S3-compatible URI."""

from __future__ import annotations

import os
import posixpath

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` storage (S3, GCS, ...)."""
    return "://" in path


def normalize(storage_path: str) -> str:
    """An absolute local path (Tune needs one) or the URI unchanged."""
    return (
        storage_path if is_uri(storage_path) else os.path.abspath(os.path.expanduser(storage_path))
    )


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URIs alike."""
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def exists(path: str) -> bool:
    """Does a file or folder exist at ``path``?"""
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def list_names(path: str) -> list[str]:
    """Names directly under folder ``path`` (empty if it does not exist)."""
    fs, p = _fs(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    return [posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p))]


def delete_dir(path: str) -> None:
    """Remove folder ``path`` and everything under it (no-op if missing)."""
    fs, p = _fs(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local folder to ``dest`` (local path or URI)."""
    fs, p = _fs(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(
        local_dir, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def download_dir(src: str, local_dir: str) -> None:
    """Copy folder ``src`` (local path or URI) to a local folder."""
    fs, p = _fs(src)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(
        p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )


def download_file(src: str, local_path: str) -> None:
    """Copy one file ``src`` (local path or URI) to a local path."""
    fs, p = _fs(src)
    os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
    with fs.open_input_stream(p) as fh, open(local_path, "wb") as out:
        while chunk := fh.read(1 << 20):
            out.write(chunk)


def write_text(dest: str, text: str) -> None:
    """Write a text file atomically where the filesystem allows (local: tmp + rename)."""
    if not is_uri(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, dest)
        return
    fs, p = _fs(dest)
    with fs.open_output_stream(p) as out:
        out.write(text.encode())


def read_text(src: str) -> str:
    """Read a text file from a local path or URI."""
    fs, p = _fs(src)
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
