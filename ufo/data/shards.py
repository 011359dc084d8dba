"""Task shards on disk: writing them with webdataset's ShardWriter, their manifest, and finding them.

A task's shards are standard WebDataset tars (`NAME-000000.tar`; a sample is `__key__`, an
image `.png`/`.jpg`, a `.cls` label and optional `.json`). `manifest.json` beside them records
the task, kind, classes and, per shard, its sample count, size and sha256.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import random
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from ufo.atomic import atomic_dir
from ufo.data.sources import RawSample, Source
from ufo.errors import DataError
from ufo.metrics import PROTOCOLS, EvalSet, default_protocol

MANIFEST = "manifest.json"
FORMAT = "ufo-shards/1"
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://")


@dataclass(frozen=True)
class Shard:
    url: str  # what webdataset opens: a local path, pipe:..., or a URL
    samples: int | None  # known from a manifest or a local scan; None for remote shards without one
    local: bool


def write_task_shards(source: Source, task: str, out: Path, *, kind: str, maxcount: int = 10000,
                      maxsize: float = 1e9, seed: int = 0, eval_fraction: float = 0.0, overwrite: bool = False,
                      max_side: int | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Write a source as shuffled task shards (and an eval split); returns the manifests written.
    `max_side`: images whose longer side is above it are stored resized to it (see `fit_image`)."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction {eval_fraction}: must be in [0, 1)")
    if max_side is not None and max_side < 8:
        raise DataError(f"--max-side {max_side}: must be at least 8 pixels")
    order = list(range(len(source.items)))
    random.Random(seed).shuffle(order)  # class-sorted sources must not give class-sorted shards
    splits = {"": order}
    if source.splits is not None:  # the dataset's own splits, as it defines them
        if eval_fraction > 0:
            raise DataError(f"--eval-fraction: {source.description} comes with its own splits "
                            f"({', '.join(source.splits)}); leave it out")
        rank = {i: n for n, i in enumerate(order)}
        splits = {name: sorted(indices, key=rank.__getitem__) for name, indices in source.splits.items()}
    elif eval_fraction > 0:
        by_class: dict[int, list[int]] = {}
        for i in order:
            by_class.setdefault(source.labels[i], []).append(i)
        held = {i for members in by_class.values() for i in members[: max(1, round(eval_fraction * len(members)))]}
        splits = {"train": [i for i in order if i not in held], "eval": [i for i in order if i in held]}
    manifests = []
    with atomic_dir(out) as tmp:
        for split, indices in splits.items():
            directory = tmp / split if split else tmp
            manifest = _write_split(source, [source.items[i] for i in indices], directory, task, kind,
                                    split or None, maxcount, maxsize, max_side)
            where = out / split if split else out
            log(f"  {task}{'/' + split if split else ''}: {manifest['samples']} samples, "
                f"{len(manifest['shards'])} shard{'s' if len(manifest['shards']) != 1 else ''} -> {where}")
            manifests.append(manifest)
    return manifests


def _write_split(source: Source, items: Sequence, directory: Path, task: str, kind: str, split: str | None,
                 maxcount: int, maxsize: float, max_side: int | None) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    finished: list[tuple[str, int]] = []
    writer = wds.ShardWriter(str(directory / f"{task}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0,
                             post=lambda fname: finished.append((fname, writer.count)))
    class_counts: Counter = Counter()
    with writer:
        for n, item in enumerate(items):
            sample = source.load(item)
            if max_side:
                sample = fit_image(sample, max_side, f"{source.description}: {_where(sample, item)}")
            record = {"__key__": f"{task}_{n:07d}", sample.ext: sample.image, "cls": sample.label}
            if sample.meta is not None:
                record["json"] = sample.meta
            writer.write(record)
            class_counts[sample.label] += 1
    shards = [{"file": Path(fname).name, "samples": count, "bytes": Path(fname).stat().st_size,
               "sha256": sha256_file(Path(fname))} for fname, count in finished if count > 0]
    for fname, count in finished:
        if count == 0:
            Path(fname).unlink()
    manifest = {
        "format": FORMAT, "task": task, "kind": kind, "split": split, "num_classes": len(source.classes),
        **_protocol_keys(source, split),
        "classes": source.classes, "source": source.description, "samples": sum(s["samples"] for s in shards),
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())}, "shards": shards,
        **({"max_side": max_side} if max_side else {}),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


JPEG_QUALITY = 95  # resized images: visually lossless, a third of the bytes of quality 100


def fit_image(sample: RawSample, max_side: int, where: str) -> RawSample:
    """The sample with its image's longer side at most `max_side`: a larger image is resized (Lanczos,
    aspect kept) and stored as a JPEG of quality 95 (a PNG stays PNG: a lossless source stays
    lossless); an image that fits keeps its bytes. Decoding a full-size photo costs several times
    what training on it does: done once here rather than every epoch in the loader."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            if max(img.size) <= max_side:
                return sample
            scale = max_side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img.draft("RGB", size)  # JPEG: decode at a reduced scale where it can (exact resize below)
            small = img.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable image ({str(e).splitlines()[0]})") from None
    out = io.BytesIO()
    if sample.ext == "png":
        small.save(out, format="PNG")
    else:
        small.save(out, format="JPEG", quality=JPEG_QUALITY)
    return RawSample(out.getvalue(), "png" if sample.ext == "png" else "jpg", sample.label, sample.meta)


def _where(sample: RawSample, item) -> str:
    """A sample's origin for an error: its file in the dataset where the source records one."""
    meta = sample.meta or {}
    return str(meta.get("file") or meta.get("index", item))


def _protocol_keys(source: Source, split: str | None) -> dict:
    """The manifest's `protocol` of a split, and what its labels are where they are not training classes
    (an evaluation split of a dataset: its own identities, or verification pairs)."""
    protocol = source.protocol.get(split) if isinstance(source.protocol, dict) else source.protocol
    keys = {"protocol": protocol} if protocol else {}
    if source.protocol and split not in (None, "train"):
        keys["labels"] = "pair" if protocol == "verification" else "identity"
    return keys


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict | None:
    file = directory / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        manifest["shards"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{file}: not a valid shard manifest") from None
    return manifest


def resolve_shards(spec: str | Sequence[str], task: str) -> list[Shard]:
    """The shards a task's `shards` value names, with sample counts where they can be known."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    shards: list[Shard] = []
    for item in specs:
        if item.startswith(REMOTE_PREFIXES):
            shards += [Shard(url, None, False) for url in braceexpand.braceexpand(item)]
            continue
        path = Path(item)
        if path.is_dir():
            manifest = read_manifest(path)
            if manifest is not None:
                shards += [Shard(str(path / s["file"]), int(s["samples"]), True) for s in manifest["shards"]]
            else:
                shards += [_local(p) for p in sorted(path.glob("*.tar"))]
            continue
        files = sorted({f for pattern in braceexpand.braceexpand(item)
                        for f in (glob.glob(pattern) if glob.has_magic(pattern) else [pattern])})
        shards += [_local(Path(f)) for f in files if Path(f).exists()]
    if not shards:
        raise DataError(f"task {task}: shards {spec!r} match no shard file")
    return shards


def check_task_data(cfg, warn: Callable[[str], None]) -> None:
    """Before a run starts anything: every task's train and eval shards resolve to files (one line
    naming the task and key where not), a task without eval shards is named, and local shards whose
    size differs from their manifest's record are reported (a sample count the loader plans with
    would be wrong)."""
    for task, tc in cfg.tasks.items():
        if tc.eval_shards is None:
            warn(f"task {task}: tasks.{task}.eval_shards is not set: it is never evaluated")
        parts = [("shards", tc.shards)] if tc.shards is not None else []
        if isinstance(tc.eval_shards, dict):
            parts += [(f"eval_shards.{name}", spec) for name, spec in tc.eval_shards.items()]
        elif tc.eval_shards is not None:
            parts.append(("eval_shards", tc.eval_shards))
        for key, spec in parts:
            try:
                found = resolve_shards(spec, task)
            except DataError as e:
                raise DataError(f"tasks.{task}.{key}: {e}") from None
            for directory in sorted({Path(s.url).parent for s in found if s.local}):
                manifest = read_manifest(directory) or {"shards": []}
                for entry in manifest["shards"]:
                    file = directory / entry["file"]
                    if not file.is_file():
                        warn(f"task {task}: {file}: listed in {directory / MANIFEST} but missing")
                    elif "bytes" in entry and file.stat().st_size != entry["bytes"]:
                        warn(f"task {task}: {file}: {file.stat().st_size} bytes, its manifest says {entry['bytes']} "
                             f"(its {entry['samples']} samples may not all be there)")
        eval_sets(cfg, task)  # a protocol that cannot measure the task: now, not at the first eval


def label_counts(spec: str | Sequence[str], task: str) -> Counter:
    """How often each label occurs in a task's shards: from manifests, else by reading local tars' `.cls`."""
    counts: Counter = Counter()
    counted: dict[Path, bool] = {}  # directory -> its manifest gave the class counts of all its shards
    for shard in resolve_shards(spec, task):
        if not shard.local:
            raise DataError(f"task {task}: shard {shard.url} is remote and has no manifest with class counts")
        path = Path(shard.url)
        if path.parent not in counted:
            manifest = read_manifest(path.parent) or {}
            counted[path.parent] = "class_counts" in manifest
            counts.update({int(k): int(v) for k, v in manifest.get("class_counts", {}).items()})
        if not counted[path.parent]:
            try:
                for _, ext, tar, member in tar_members(path):
                    if ext == "cls":
                        counts[int(tar.extractfile(member).read())] += 1
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                raise DataError(f"task {task}: shard {path}: cannot read its labels ({type(e).__name__}: {e})") \
                    from None
    return counts


def _local(path: Path) -> Shard:
    manifest = read_manifest(path.parent)
    if manifest is not None:
        counts = {s["file"]: int(s["samples"]) for s in manifest["shards"]}
        if path.name in counts:
            return Shard(str(path), counts[path.name], True)
    return Shard(str(path), count_samples(path)[0], True)


def tar_members(path: Path) -> Iterator[tuple[str | None, str | None, tarfile.TarFile, tarfile.TarInfo]]:
    """The regular members of a local tar, streamed, with their webdataset key and extension."""
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if member.isreg():
                key, ext = base_plus_ext(member.name)
                yield key, ext, tar, member


def count_samples(path: Path) -> tuple[int, str | None]:
    """Samples in a local tar (distinct keys), and the error that stopped the count, if any."""
    keys, last = 0, None
    try:
        for key, _, _, _ in tar_members(path):
            if key is not None and key != last:
                keys, last = keys + 1, key
    except (tarfile.TarError, OSError, EOFError) as e:
        return keys, f"{type(e).__name__}: {e}"
    return keys, None


def probe_shard(path: str) -> str | None:
    """Why a local shard cannot be opened (its first member is read), or None if it can."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            next(iter(tar), None)
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _manifest_protocol(spec: str, task: str) -> str | None:
    for shard in resolve_shards(spec, task):
        if shard.local:
            protocol = (read_manifest(Path(shard.url).parent) or {}).get("protocol")
            if protocol:
                return protocol
    return None


def eval_sets(cfg, task: str) -> list[EvalSet]:
    """The task's evaluation sets from `tasks.<task>.eval_shards` and `.protocol` (default: what the
    shards' manifest says, else by the task's kind); one-line errors for what cannot be measured."""
    tc = cfg.tasks[task]
    spec, key = tc.eval_shards, f"tasks.{task}.eval_shards"
    if spec is None:
        return []
    if isinstance(spec, str):
        sets = [EvalSet(task, None, tc.protocol or _manifest_protocol(spec, task) or default_protocol(tc.kind),
                        {"all": spec})]
    elif {"query", "gallery"} & set(spec):
        if set(spec) != {"query", "gallery"}:
            raise DataError(f"{key}: a query/gallery evaluation takes exactly the keys query and gallery, "
                            f"got {', '.join(spec)}")
        sets = [EvalSet(task, None, tc.protocol or "reid", dict(spec))]
    else:
        sets = [EvalSet(task, name, tc.protocol or _manifest_protocol(s, task) or default_protocol(tc.kind),
                        {"all": s}) for name, s in spec.items()]
    for es in sets:
        where = f"{key}.{es.name}" if es.name else key
        if es.protocol not in PROTOCOLS:
            raise DataError(f"{where}: the shards' manifest names protocol {es.protocol!r}; ufo knows "
                            f"{', '.join(PROTOCOLS)} (set tasks.{task}.protocol)")
        if (es.protocol == "classification") != (tc.kind == "classification"):
            raise DataError(f"{where}: the {es.protocol} protocol cannot measure a {tc.kind} task "
                            f"(set tasks.{task}.protocol)")
        if (es.protocol == "reid") != ("query" in es.parts):
            raise DataError(f"{where}: the reid protocol takes a query and a gallery: "
                            f"eval_shards: {{query: DIR, gallery: DIR}}" if es.protocol == "reid" else
                            f"{where}: query and gallery sets are measured by the reid protocol, not "
                            f"{es.protocol}")
    return sets
