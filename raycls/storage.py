"""Small files on any fsspec filesystem: JSON records, exclusive creation, listing, removal.

Resume manifests, leases and incremental claims are all small JSON files written next to
the output, wherever it lives (local disk, `s3://`, `memory://`, ...). Two operations
carry the correctness of the whole scheme, so they are defined once here:

- `write_json` replaces a record whole (a reader sees the old or the new one, never half):
  local files are written aside and renamed; an object-store PUT is atomic by nature.
- `create_exclusive` creates a record only if none exists, atomically, so that of two
  processes racing for the same name exactly one wins:
  * local disk: write a temporary file, then `os.link` it to the name (fails if taken);
  * S3: a conditional PUT (`If-None-Match: *`, via s3fs `pipe_file(mode="create")`),
    honoured by AWS S3 since 2024, by MinIO and by moto; on an S3-compatible store that
    ignores the header, two racers could both "win";
  * `memory://`: a lock around check-then-write (one process only, for tests);
  * any other filesystem: its `pipe_file(mode="create")` where it has one (gcsfs: a
    write with `ifGenerationMatch=0`, atomic); else check-then-write, which is *not*
    atomic: leases and claims there are only as good as the scheduler's promise not to
    overlap runs.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

_MEMORY_LOCK = threading.Lock()


def utc_now() -> str:
    """The time stamp written in records: UTC, to the second, ISO 8601."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def join(url: str, *parts: str) -> str:
    """Join path segments onto a URL or local path with `/` (fsspec paths are POSIX-like)."""
    return posixpath.join(url.rstrip("/"), *parts)


def fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of a URL or local path."""
    return url_to_fs(url)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers and pyarrow need it); URLs pass unchanged."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def _forget(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop fsspec's cached listings: other processes change these directories."""
    fs.invalidate_cache(path)
    fs.invalidate_cache(posixpath.dirname(path))


def exists(url: str) -> bool:
    fs, path = fs_path(url)
    _forget(fs, path)
    return fs.exists(path)


def read_json(url: str) -> Any | None:
    """The decoded record at `url`, or None when there is none."""
    fs, path = fs_path(url)
    _forget(fs, path)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def _local_aside(path: str, data: bytes) -> str:
    """Write `data` durably to a fresh temporary file beside `path`; return its name."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_json(url: str, record: Any) -> None:
    """Replace the record at `url` whole: readers never see a half-written file."""
    data = json.dumps(record, indent=2, sort_keys=True).encode("utf-8")
    fs, path = fs_path(url)
    parent = posixpath.dirname(path)
    if is_local(fs):
        os.replace(_local_aside(path, data), path)
        return
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def create_exclusive(url: str, record: Any) -> bool:
    """Create the record at `url` if nothing is there; True if this call created it.

    Atomic on local disk, S3 and `memory://` (see the module docstring for the limits).
    """
    data = json.dumps(record, indent=2, sort_keys=True).encode("utf-8")
    fs, path = fs_path(url)
    parent = posixpath.dirname(path)
    protocols = _protocols(fs)
    if is_local(fs):
        tmp = _local_aside(path, data)
        try:
            os.link(tmp, path)  # atomic, and the record is complete the moment it appears
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "memory" in protocols:
        with _MEMORY_LOCK:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True
    try:
        fs.pipe_file(path, data, mode="create")  # S3: conditional PUT, If-None-Match: *
        return True
    except FileExistsError:
        return False
    except TypeError:  # a filesystem without conditional creation
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def list_names(url: str) -> list[str]:
    """Base names of the entries directly under `url` (empty when it does not exist)."""
    fs, path = fs_path(url)
    _forget(fs, path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = [posixpath.basename(str(e).rstrip("/")) for e in entries]
    return sorted(n for n in names if n)


def remove(url: str, recursive: bool = False) -> None:
    """Remove a file (or a directory tree with `recursive`); missing is fine."""
    fs, path = fs_path(url)
    try:
        if recursive:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        else:
            fs.rm_file(path)
    except FileNotFoundError:
        pass
    _forget(fs, path)
