"""Where a task's samples come from before they become shards.

`open_source` understands an image folder in the ImageFolder layout (one sub-folder per class),
a `.npz` with `images` and `labels`, `sklearn:digits` (the handwritten digits that
scikit-learn ships: real data, no download), and `synth:shapes` / `synth:instances`.
A source is a list of cheap items and a `load(item)` that returns one encoded sample.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ufo.data.synth import KINDS, SynthTask
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


def open_source(spec: str, task: str, *, classes: int = 10, samples: int = 1000, difficulty: float = 0.3,
                image_size: int = 32, seed: int = 0) -> Source:
    """Resolve a SOURCE argument of `ufo data write`."""
    if spec.startswith("synth:"):
        generator = spec.split(":", 1)[1]
        if generator not in KINDS:
            raise DataError(f"--from {spec}: unknown generator; choose synth:{' or synth:'.join(KINDS)}")
        synth = SynthTask(generator, task, classes, image_size, difficulty, seed)
        items = list(range(samples))
        return Source(f"{spec} (classes {classes}, difficulty {difficulty:g}, {image_size}px, seed {seed})",
                      synth.kind, [f"{generator}_{c}" for c in range(classes)], items,
                      [synth.label(i) for i in items],
                      lambda i: RawSample(encode_png(synth.image(i)), "png", synth.label(i), {"index": i}))
    if spec == "sklearn:digits":
        return _digits(image_size)
    path = Path(spec)
    if path.suffix == ".npz":
        return _npz(path)
    if path.is_dir():
        return _image_folder(path)
    if not path.exists():
        raise DataError(f"--from {spec}: no such file or directory (or use sklearn:digits, synth:shapes, "
                        "synth:instances)")
    raise DataError(f"--from {spec}: not an image folder, a .npz file, sklearn:digits or synth:...")


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
