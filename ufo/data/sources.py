"""Where a task's samples come from before they become shards.

`open_source` understands an image folder in the ImageFolder layout (one sub-folder per class),
a `.npz` with `images` and `labels`, `sklearn:digits` (the handwritten digits that
scikit-learn ships: real data, no download), and `synth:shapes` / `synth:instances`.
A source is a list of cheap items and a `load(item)` that returns one encoded sample.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ufo.data.synth import CAMERAS, KINDS, SynthTask
from ufo.errors import DataError

IMAGE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".bmp": "bmp"}


@dataclass(frozen=True)
class RawSample:
    image: bytes
    ext: str  # webdataset extension of the image member: png, jpg, ...
    label: int
    meta: dict[str, Any] | None = None


@dataclass
class Source:
    description: str
    kind: str | None  # what the source implies (synth), else None
    classes: list[str]
    items: list[Any]
    labels: list[int]  # label of each item, for stratified splits
    load: Callable[[Any], RawSample]
    # the dataset's own splits (split name -> indices into items), written as they are; None: one
    # set, split by --eval-fraction
    splits: dict[str, list[int]] | None = None
    # the evaluation protocol the splits follow (`ufo/evaluate.py`): one for all, or per split
    protocol: str | dict[str, str] | None = None


def open_source(spec: str, task: str, *, classes: int = 10, samples: int = 1000, difficulty: float = 0.3,
                image_size: int = 32, seed: int = 0) -> Source:
    """Resolve a SOURCE argument of `ufo data write`."""
    if spec.startswith("synth:"):
        generator = spec.split(":", 1)[1]
        if generator not in KINDS:
            raise DataError(f"--from {spec}: unknown generator; choose synth:{' or synth:'.join(KINDS)}")
        synth = SynthTask(generator, task, classes, image_size, difficulty, seed)
        if generator == "persons":
            return _synth_persons(spec, synth, samples, seed)
        items = list(range(samples))
        return Source(f"{spec} (classes {classes}, difficulty {difficulty:g}, {image_size}px, seed {seed})",
                      synth.kind, [f"{generator}_{c}" for c in range(classes)], items,
                      [synth.label(i) for i in items],
                      lambda i: RawSample(encode_png(synth.image(i)), "png", synth.label(i), {"index": i}))
    if spec == "sklearn:digits":
        return _digits(image_size)
    kind, _, where = spec.partition(":")
    if kind in REID_LAYOUTS and where:
        return reid_folders(Path(where), kind)
    if kind == "msmt17" and where:
        return msmt17(Path(where))
    if kind == "sop" and where:
        return stanford_online_products(Path(where))
    if kind == "insightface" and where:
        return insightface(Path(where))
    path = Path(spec)
    if path.suffix == ".npz":
        return _npz(path)
    if path.is_dir():
        return _image_folder(path)
    if not path.exists():
        raise DataError(f"--from {spec}: no such file or directory (or use sklearn:digits, synth:shapes, "
                        "synth:instances)")
    raise DataError(f"--from {spec}: not an image folder, a .npz file, sklearn:digits or synth:...")


def _synth_persons(spec: str, synth: SynthTask, samples: int, seed: int) -> Source:
    """A re-identification dataset as Market-1501 lays it out: `samples` training images of the
    `classes` training identities, and a test set of as many other identities (samples // 4 images),
    every identity seen by every camera; the query split holds one image of each test identity per
    camera, the gallery the rest."""
    classes = synth.num_classes
    test = max(2 * classes * CAMERAS, samples // 4)
    items: list[tuple[int, int, dict]] = []
    splits: dict[str, list[int]] = {"train": [], "query": [], "gallery": []}
    for i in range(samples):
        splits["train"].append(len(items))
        items.append((i, synth.label(i), {"identity": synth.label(i), "camera": synth.camera(i), "split": "train"}))
    for i in range(samples, samples + test):
        identity, camera = classes + synth.label(i), synth.camera(i)
        split = "query" if (i - samples) < classes * CAMERAS else "gallery"
        splits[split].append(len(items))
        items.append((i, identity, {"identity": identity, "camera": camera, "split": split}))

    def load(item: tuple[int, int, dict]) -> RawSample:
        index, identity, meta = item
        return RawSample(encode_png(synth.image(index, identity)), "png", identity, meta)

    return Source(f"{spec} ({classes} + {classes} identities, {CAMERAS} cameras, difficulty {synth.difficulty:g}, "
                  f"{synth.size}px, seed {seed})", "retrieval", [f"person_{c}" for c in range(classes)], items,
                  [identity for _, identity, _ in items], load, splits, "reid")


# re-identification datasets as they ship: split folders of `PID_cCAM...` images
REID_LAYOUTS = {
    "market1501": {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"},
    "dukemtmc": {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"},
    "veri776": {"train": "image_train", "query": "image_query", "gallery": "image_test"},
}
_REID_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def reid_folders(root: Path, kind: str) -> Source:
    """Market-1501, DukeMTMC-reID or VeRi-776 in their shipped layout: identity and camera from each file's
    name (`0001_c1s1_001051_00.jpg`, `0001_c001_00016450_0.jpg`); identity -1 (junk) dropped, 0
    (distractors) kept in the gallery, as the benchmark's protocol does. Training identities become
    labels 0..C-1; query and gallery keep the dataset's identity as label (the protocol compares them)."""
    layout = REID_LAYOUTS[kind]
    if not root.is_dir():
        raise DataError(f"--from {kind}:{root}: no such directory")
    for folder in layout.values():
        if not (root / folder).is_dir():
            raise DataError(f"--from {kind}:{root}: not the {kind} layout: no folder {root / folder}")
    items, labels, splits, train_ids = [], [], {}, {}
    for split, folder in layout.items():
        indices = []
        for file in sorted((root / folder).iterdir()):
            if file.suffix.lower() not in IMAGE_EXTS:
                continue
            match = _REID_NAME.match(file.name)
            if match is None:
                raise DataError(f"{file}: not a {kind} image name (PID_cCAM...{file.suffix})")
            pid, cam = int(match.group(1)), int(match.group(2))
            if pid < 0 or (pid == 0 and split != "gallery"):
                continue  # junk, and distractors outside the gallery
            label = train_ids.setdefault(pid, len(train_ids)) if split == "train" else pid
            indices.append(len(items))
            items.append((file, label, {"identity": pid, "camera": cam, "split": split,
                                        "file": str(file.relative_to(root))}))
            labels.append(label)
        if not indices:
            raise DataError(f"--from {kind}:{root}: {root / folder} holds no images")
        splits[split] = indices

    def load(item: tuple[Path, int, dict]) -> RawSample:
        file, label, meta = item
        return RawSample(file.read_bytes(), IMAGE_EXTS[file.suffix.lower()], label, meta)

    counts = ", ".join(f"{split} {len(ix)}" for split, ix in splits.items())
    return Source(f"{kind} {root} ({counts} images; {len(train_ids)} training identities)", "retrieval",
                  [str(pid) for pid in train_ids], items, labels, load, splits, "reid")


def _lines(file: Path, kind: str, root: Path, skip: int = 0) -> list[list[str]]:
    if not file.is_file():
        raise DataError(f"--from {kind}:{root}: not the {kind} layout: no file {file}")
    return [line.split() for line in file.read_text().splitlines()[skip:] if line.strip()]


def _listed_source(root: Path, kind: str, splits: dict[str, list[tuple[Path, int, dict]]], protocol: str,
                   train_ids: dict) -> Source:
    items, labels, indices = [], [], {}
    for split, entries in splits.items():
        indices[split] = list(range(len(items), len(items) + len(entries)))
        for file, label, meta in entries:
            if not file.is_file():
                raise DataError(f"{file}: listed in {kind}'s split files but missing")
            items.append((file, label, meta))
            labels.append(label)

    def load(item: tuple[Path, int, dict]) -> RawSample:
        file, label, meta = item
        return RawSample(file.read_bytes(), IMAGE_EXTS.get(file.suffix.lower(), "jpg"), label, meta)

    counts = ", ".join(f"{split} {len(ix)}" for split, ix in indices.items())
    return Source(f"{kind} {root} ({counts} images; {len(train_ids)} training classes)", "retrieval",
                  [str(c) for c in train_ids], items, labels, load, indices, protocol)


def msmt17(root: Path) -> Source:
    """MSMT17 as it ships: `train/`, `test/` and `list_{train,val,query,gallery}.txt` of `relpath pid`
    lines (the lists' paths are relative to `train/` or `test/`); the camera is the name's second
    field (`0000_011_01_0303morning_0015_0.jpg`). Train and val are training data (the usual
    protocol), query and gallery the evaluation."""
    kind = "msmt17"
    if not root.is_dir():
        raise DataError(f"--from {kind}:{root}: no such directory")
    for folder in ("train", "test"):
        if not (root / folder).is_dir():
            raise DataError(f"--from {kind}:{root}: not the {kind} layout: no folder {root / folder}")
    train_ids: dict[int, int] = {}
    splits: dict[str, list] = {"train": [], "query": [], "gallery": []}
    for listing, split, folder in (("list_train.txt", "train", "train"), ("list_val.txt", "train", "train"),
                                   ("list_query.txt", "query", "test"), ("list_gallery.txt", "gallery", "test")):
        for row in _lines(root / listing, kind, root):
            if len(row) != 2 or not row[1].lstrip("-").isdigit():
                raise DataError(f"{root / listing}: line {' '.join(row)!r} is not `relpath pid`")
            rel, pid = row[0], int(row[1])
            parts = Path(rel).name.split("_")
            if len(parts) < 2 or not parts[1].isdigit():
                raise DataError(f"{root / listing}: {rel}: no camera field in the name (PID_CAM_...)")
            label = train_ids.setdefault(pid, len(train_ids)) if split == "train" else pid
            splits[split].append((root / folder / rel, label, {"identity": pid, "camera": int(parts[1]),
                                                               "split": split, "file": f"{folder}/{rel}"}))
    return _listed_source(root, kind, splits, "reid", train_ids)


def stanford_online_products(root: Path) -> Source:
    """Stanford Online Products as it ships: `Ebay_train.txt` and `Ebay_test.txt` (a header, then
    `image_id class_id super_class_id path` lines, paths relative to the root). Train classes become
    labels 0..C-1; the test split keeps its class ids, evaluated leave-one-out (`retrieval`)."""
    kind = "sop"
    if not root.is_dir():
        raise DataError(f"--from {kind}:{root}: no such directory")
    train_ids: dict[int, int] = {}
    splits: dict[str, list] = {}
    for listing, split in (("Ebay_train.txt", "train"), ("Ebay_test.txt", "test")):
        splits[split] = []
        for row in _lines(root / listing, kind, root, skip=1):
            if len(row) != 4 or not all(v.isdigit() for v in row[:3]):
                raise DataError(f"{root / listing}: line {' '.join(row)!r} is not `image_id class_id super_class_id "
                                "path`")
            cls, sup = int(row[1]), int(row[2])
            label = train_ids.setdefault(cls, len(train_ids)) if split == "train" else cls
            splits[split].append((root / row[3], label, {"class": cls, "super_class": sup, "split": split,
                                                         "file": row[3]}))
    return _listed_source(root, kind, splits, "retrieval", train_ids)


def insightface(root: Path) -> Source:
    """An InsightFace face pack: `train.rec` + `train.idx` (MXNet RecordIO, read by `ufo.data.recordio`)
    and `property` (`num_classes,height,width`) as the training split; every verification set beside
    them (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...) as a split of its own, two samples a pair
    (label: the pair's index; json: pair, member, same)."""
    from ufo.data.recordio import face_pack, verification_pairs

    kind = "insightface"
    if not root.is_dir():
        raise DataError(f"--from {kind}:{root}: no such directory")
    for name in ("train.rec", "train.idx", "property"):
        if not (root / name).is_file():
            raise DataError(f"--from {kind}:{root}: not an InsightFace pack: no file {root / name}")
    try:
        num_classes = int((root / "property").read_text().split(",")[0])
    except ValueError:
        raise DataError(f"{root / 'property'}: not `num_classes,height,width`") from None
    items: list = []
    labels: list[int] = []
    splits: dict[str, list[int]] = {"train": []}
    protocol: dict[str, str] = {}
    for key, identity, image in face_pack(root / "train.rec", root / "train.idx"):
        if not 0 <= identity < num_classes:
            raise DataError(f"{root / 'train.rec'}: record {key} has identity {identity}, outside the "
                            f"{num_classes} classes of {root / 'property'}")
        splits["train"].append(len(items))
        items.append((image, identity, {"identity": identity, "record": key, "split": "train"}))
        labels.append(identity)
    for bin_file in sorted(root.glob("*.bin")):
        images, same = verification_pairs(bin_file)
        split = bin_file.stem
        splits[split], protocol[split] = [], "verification"
        for n, image in enumerate(images):
            splits[split].append(len(items))
            items.append((image, n // 2, {"pair": n // 2, "member": n % 2, "same": same[n // 2], "split": split}))
            labels.append(n // 2)

    def load(item: tuple[bytes, int, dict]) -> RawSample:
        image, label, meta = item
        return RawSample(image, "png" if image[:4] == b"\x89PNG" else "jpg", label, meta)

    counts = ", ".join(f"{split} {len(ix)}" for split, ix in splits.items())
    return Source(f"{kind} {root} ({counts} images; {num_classes} identities)", "retrieval",
                  [str(c) for c in range(num_classes)], items, labels, load, splits, protocol)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _digits(size: int) -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 images with values 0..16, ink bright on black
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)

    def load(i: int) -> RawSample:
        img = Image.fromarray(images[i]).resize((size, size), Image.BILINEAR).convert("RGB")
        return RawSample(encode_png(np.asarray(img)), "png", int(digits.target[i]), {"index": i})

    return Source(f"scikit-learn handwritten digits ({len(images)} images, upscaled to {size}px)",
                  None, [str(c) for c in digits.target_names], list(range(len(images))),
                  [int(t) for t in digits.target], load)


def _npz(path: Path) -> Source:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read .npz ({type(e).__name__}: {e})") from None
    missing = [name for name in ("images", "labels") if name not in data.files]
    if missing:
        raise DataError(f"{path}: no array {missing[0]!r}; a .npz source needs 'images' and 'labels'")
    images, labels = data["images"], data["labels"]
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8:
        scale = 255.0 if images.max() <= 1.0 else 1.0
        images = (images * scale).clip(0, 255).astype(np.uint8)
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, found {labels.min()}")
    names = [str(n) for n in data["class_names"]] if "class_names" in data else \
        [str(c) for c in range(int(labels.max()) + 1)]
    return Source(f"{path} ({len(images)} images)", None, names, list(range(len(images))),
                  [int(v) for v in labels],
                  lambda i: RawSample(encode_png(images[i]), "png", int(labels[i]), {"index": i}))


def _image_folder(root: Path) -> Source:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (ImageFolder layout: {root}/CLASS/IMAGE.jpg)")
    items = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in IMAGE_EXTS and file.is_file():
                items.append((file, label))
    if not items:
        raise DataError(f"{root}: class folders hold no images ({', '.join(IMAGE_EXTS)})")

    def load(item: tuple[Path, int]) -> RawSample:
        file, label = item
        return RawSample(file.read_bytes(), IMAGE_EXTS[file.suffix.lower()], label,
                         {"file": str(file.relative_to(root))})

    return Source(f"{root} ({len(items)} images in {len(classes)} classes)", None, classes, items,
                  [label for _, label in items], load)
