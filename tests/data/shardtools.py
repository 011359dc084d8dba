"""Small real shards for the data tests, written with ufo's writer or by hand with tarfile."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from ufo.data import open_source, write_task_shards


def write_synth(out: Path, task: str = "shapes", samples: int = 50, maxcount: int = 7, classes: int = 5,
                generator: str = "shapes", **kw) -> Path:
    source = open_source(f"synth:{generator}", task, classes=classes, samples=samples, image_size=16, seed=1)
    write_task_shards(source, task, out, kind=source.kind, maxcount=maxcount, log=lambda _: None, **kw)
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar in the standard WebDataset layout, written with plain tarfile."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members_of(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())
