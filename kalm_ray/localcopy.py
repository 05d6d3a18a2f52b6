"""Local copies of run-directory files for libraries that only read local paths.

Workers on any node read their inputs from the run directory itself (a URI such as
``s3://...``), never from a path that exists only on the driver's machine. Hugging Face
``from_pretrained``, ``Codec.load`` and RLlib's ``from_checkpoint`` need a local folder, so a
worker calls :func:`local_copy` first: a local path comes back unchanged (a local run
directory is only allowed on a cluster whose nodes all mount it), a URI is downloaded once
per node into a cache keyed by the URI and its listing (a re-created folder at the same URI
is a new entry) and that copy's path comes back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pyarrow is imported only for URIs: the train loop runs without it
    import pyarrow.fs as pafs

CACHE_DIR = "kalm-cache"
"""Folder under the system temp dir (``cache_root``) holding downloaded copies."""


def is_uri(path: str) -> bool:
    """Whether ``path`` names a remote filesystem (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` of a URI (``pyarrow.fs.FileSystem.from_uri``)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _signature(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> str:
    """What the copy is of: every file's relative path, size and mtime (one listing call)."""
    import pyarrow.fs as pafs

    if info.type == pafs.FileType.File:
        entries = [info]
    else:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    parts = sorted(
        f"{e.path[len(path):]}|{e.size}|{e.mtime_ns}"
        for e in entries
        if e.type == pafs.FileType.File
    )
    return "\n".join(parts)


def local_copy(path: str, *, cache_root: str | None = None) -> str:
    """A local path holding the file or folder ``path`` (local path or URI); see the module doc.

    Raises FileNotFoundError when the URI names nothing. Concurrent callers on one node
    (several actors) may both download; each writes its own temporary folder and the first
    rename wins, so nobody ever reads a half-written copy.
    """
    path = str(path)
    if not is_uri(path):
        return path
    import pyarrow.fs as pafs

    fs, fs_path = filesystem_of(path)
    fs_path = fs_path.rstrip("/")
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file or folder")
    key = hashlib.sha256(f"{path}\n{_signature(fs, fs_path, info)}".encode()).hexdigest()[:20]
    root = os.path.join(cache_root or tempfile.gettempdir(), CACHE_DIR)
    entry = os.path.join(root, key)
    name = os.path.basename(fs_path) or "root"
    target = os.path.join(entry, name)
    if os.path.exists(target):
        return target
    os.makedirs(root, exist_ok=True)
    staging = os.path.join(root, f".{key}.{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(staging)
        if info.type == pafs.FileType.Directory:
            os.makedirs(os.path.join(staging, name))
        pafs.copy_files(
            fs_path,
            os.path.join(staging, name),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        try:
            os.rename(staging, entry)
        except OSError:  # another process finished first: use its copy
            if not os.path.exists(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
