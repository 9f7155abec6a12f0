"""Atomic writes: a file or a directory appears complete or not at all, and survives a crash.

Both helpers fill a temporary sibling of the target (so that the final rename stays within one
filesystem), fsync what they wrote, rename it into place and fsync the parent directory, so that
after `kill -9` or a power cut a reader finds either the old version or the whole new one. On any
error the temporary is removed and the error propagates; the target is left as it was.

    write_file_atomic(path, lambda tmp: tmp.write_bytes(data))
    replace_dir_atomic(directory, lambda tmp: (tmp / "a.json").write_text("{}"))
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_file_atomic(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Writes the file `path`: `fill(tmp)` writes a temporary file beside it, which is fsynced and
    renamed over `path` (an existing file is replaced in one step)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        fill(tmp)
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def replace_dir_atomic(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Writes the directory `path`: `fill(tmp)` fills a temporary sibling directory, whose files
    are fsynced before it is renamed to `path`. An existing `path` is first moved aside (and
    removed once the new one is in place): for a moment neither name holds the directory, which
    a reader of `path` sees as "not written yet", never as a partial directory."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old: Path | None = None
    try:
        fill(tmp)
        for entry in tmp.iterdir():
            if entry.is_file():
                fsync_file(entry)
        fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(old / target.name)
        tmp.rename(target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # best effort: the error being raised is the one to report
        if old is not None and not target.exists():
            (old / target.name).rename(target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the replaced version; a leftover is hidden and harmless
    return target


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Makes the directory's entries (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
