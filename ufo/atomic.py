"""Writes that a crash or an error can never leave half done.

A file is written under a hidden temporary name, flushed to disk and renamed into place; a
directory is built as a hidden sibling and renamed into place whole. What existed before is
replaced only by something complete.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def pid_alive(pid: str) -> bool:
    """Whether a process of that id runs on this host (temporary names end in their writer's pid)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove what writes that died left in `parent` (hidden `.NAME.tmp-PID`/`.NAME.old-PID` files and
    directories whose process is gone), of `name` only if given; returns what was removed."""
    removed = []
    for stale in parent.glob(f".{name if name is not None else '*'}.*-*"):
        written, dot, rest = stale.name[1:].rpartition(".")
        kind, _, pid = rest.partition("-")
        if dot and (name is None or written == name) and kind in ("tmp", "old") and not pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def readable_mode() -> int:
    """The mode an ordinary new file gets here (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, readable_mode())  # some writers (safetensors) create 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a hidden temporary directory; on success it replaces `out` whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, out.name)  # a killed earlier write of the same directory
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(readable_mode())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
