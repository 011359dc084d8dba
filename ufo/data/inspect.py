"""`ufo data inspect`: what any standard WebDataset shards hold, and what is wrong with them.

Reads the tars member by member (no manifest needed; one is checked when present): samples
per shard and class, unreadable members, samples without a label or with an undecodable
image, and a contact sheet PNG of a few samples per class.
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ufo.data.loader import IMAGE_EXTS
from ufo.data.shards import read_manifest, resolve_shards, sha256_file, tar_members
from ufo.errors import DataError


@dataclass
class ShardReport:
    shard: str
    samples: int = 0
    bytes: int = 0
    classes: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    spec: str
    shards: list[ShardReport]
    samples: int
    classes: dict[int, int]
    problems: list[str]
    manifest: dict | None
    contact_sheet: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_shards(spec: str, sheet: Path | None = None, per_class: int = 6, max_classes: int = 20,
                   decode: bool = True) -> InspectReport:
    """Inspect shards given as a directory, a pattern or a list; optionally draw a contact sheet."""
    shards = resolve_shards(spec, "inspect")
    manifest = read_manifest(Path(spec)) if Path(spec).is_dir() else None
    listed = {s["file"]: s for s in manifest["shards"]} if manifest else {}
    reports, thumbs = [], defaultdict(list)
    for shard in shards:
        if not shard.local:
            raise DataError(f"{shard.url}: inspect reads local shards only")
        if not Path(shard.url).is_file():
            reports.append(ShardReport(shard.url, problems=["listed in the manifest but missing"]))
            continue
        report = _inspect_one(Path(shard.url), thumbs, per_class, decode)
        entry = listed.get(Path(shard.url).name)
        if entry is not None:
            if entry["samples"] != report.samples:
                report.problems.append(f"manifest says {entry['samples']} samples, found {report.samples}")
            if entry.get("sha256") and entry["sha256"] != sha256_file(Path(shard.url)):
                report.problems.append("sha256 differs from the manifest")
        reports.append(report)
    classes: Counter = Counter()
    for r in reports:
        classes.update(r.classes)
    problems = [f"{r.shard}: {p}" for r in reports for p in r.problems]
    known = manifest.get("num_classes") if manifest and manifest.get("labels") is None else None
    if isinstance(known, int):  # labels the manifest's classes do not cover
        for r in reports:
            outside = sorted(label for label in r.classes if not 0 <= label < known)
            if outside:
                problems.append(f"{r.shard}: {sum(r.classes[c] for c in outside)} samples with labels outside the "
                                f"manifest's {known} classes (0..{known - 1}): {', '.join(map(str, outside[:10]))}")
    result = InspectReport(str(spec), reports, sum(r.samples for r in reports), dict(sorted(classes.items())),
                           problems, manifest and {k: v for k, v in manifest.items() if k != "shards"})
    if sheet is not None and thumbs:
        names = manifest.get("classes") if manifest else None
        _contact_sheet(thumbs, sheet, max_classes, names)
        result.contact_sheet = str(sheet)
    return result


def _inspect_one(path: Path, thumbs: dict, per_class: int, decode: bool) -> ShardReport:
    report = ShardReport(str(path), bytes=path.stat().st_size)
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        for key, ext, tar, member in tar_members(path):
            if key is None:
                report.problems.append(f"member {member.name}: no key.extension name")
                continue
            if key not in samples:
                samples[key] = {}
                order.append(key)
            samples[key][ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        after = f" after key {order[-1]}" if order else ""
        report.problems.append(f"unreadable{after}: {type(e).__name__}: {e}")
    for key in order:
        sample = samples[key]
        report.samples += 1
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if "cls" not in sample:
            report.problems.append(f"key {key}: missing label (.cls)")
            continue
        try:
            label = int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            report.problems.append(f"key {key}: bad label {sample['cls'][:20]!r}")
            continue
        report.classes[label] = report.classes.get(label, 0) + 1
        if image is None:
            report.problems.append(f"key {key}: no image member")
            continue
        if decode or len(thumbs[label]) < per_class:
            try:
                img = Image.open(io.BytesIO(image))
                img = img.convert("RGB")
            except Exception as e:
                report.problems.append(f"key {key}: undecodable image ({type(e).__name__})")
                continue
            if len(thumbs[label]) < per_class:
                thumbs[label].append(img)
    return report


def _contact_sheet(thumbs: dict[int, list], out: Path, max_classes: int, names: list[str] | None) -> None:
    cell, label_w = 48, 72
    labels = sorted(thumbs)[:max_classes]
    columns = max(len(thumbs[c]) for c in labels)
    sheet = Image.new("RGB", (label_w + columns * (cell + 2), len(labels) * (cell + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, label in enumerate(labels):
        y = row * (cell + 2)
        name = names[label] if names and label < len(names) else str(label)
        draw.text((4, y + cell // 2 - 6), f"{label}: {name}"[:11], fill="black")
        for col, img in enumerate(thumbs[label]):
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (label_w + col * (cell + 2), y))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def format_report(r: InspectReport, limit: int = 20) -> str:
    lines = [f"{r.spec}: {r.samples} samples in {len(r.shards)} shards, {len(r.classes)} classes"
             + (f" (task {r.manifest['task']}, {r.manifest['kind']})" if r.manifest else " (no manifest)")]
    for s in r.shards:
        lines.append(f"  {Path(s.shard).name:<28} {s.samples:>8} samples  {s.bytes / 1e6:8.2f} MB"
                     + (f"  {len(s.problems)} problems" if s.problems else ""))
    counts = sorted(r.classes.values())
    if counts:
        lines.append(f"  per class: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}")
    if r.problems:
        lines.append(f"  problems ({len(r.problems)}):")
        lines += [f"    {p}" for p in r.problems[:limit]]
        if len(r.problems) > limit:
            lines.append(f"    ... and {len(r.problems) - limit} more (--json lists all)")
    else:
        lines.append("  no problems found")
    if r.contact_sheet:
        lines.append(f"  contact sheet: {r.contact_sheet}")
    return "\n".join(lines)
