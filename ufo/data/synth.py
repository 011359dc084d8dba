"""Synthetic tasks for tests and demos: learnable, of a chosen kind and difficulty, and distinct
between tasks (a task's name seeds its palette and prototypes).

`shapes` (classification): each class is a shape in a color, drawn at a random place and size
over noise and distractors. `instances` (retrieval): each class is one random "product", seen
under random rotation, scale, shift, lighting and noise.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hbar", "vbar")
KINDS = {"shapes": "classification", "instances": "retrieval"}


def task_seed(task: str, seed: int) -> int:
    return zlib.crc32(task.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


class SynthTask:
    """Sample `index` of a synthetic task is a pure function of (task, seed, index)."""

    def __init__(self, generator: str, task: str, num_classes: int, size: int = 32,
                 difficulty: float = 0.3, seed: int = 0):
        if generator not in KINDS:
            raise ValueError(f"unknown synthetic generator {generator!r}; choose from {', '.join(KINDS)}")
        self.generator, self.kind = generator, KINDS[generator]
        self.num_classes, self.size, self.difficulty = num_classes, size, difficulty
        self.seed = task_seed(task, seed)
        rng = np.random.default_rng(self.seed)
        per_shape = -(-num_classes // len(SHAPES))
        # well-separated hues in a task-specific order and offset
        hues = (rng.random() + np.arange(per_shape) / per_shape) % 1.0
        self.palette = [_hsv_to_rgb(h, 0.8, 0.95) for h in rng.permutation(hues)]
        self.shape_order = rng.permutation(len(SHAPES))

    def label(self, index: int) -> int:
        return index % self.num_classes

    def image(self, index: int) -> np.ndarray:
        """(size, size, 3) uint8."""
        rng = np.random.default_rng([self.seed, index])
        label = self.label(index)
        if self.generator == "shapes":
            return self._shape(label, rng)
        return self._instance(label, rng)

    def _shape(self, label: int, rng: np.random.Generator) -> np.ndarray:
        s, d = self.size, self.difficulty
        img = Image.fromarray(_noise_background(rng, s, 60 * d + 10))
        draw = ImageDraw.Draw(img)
        for _ in range(int(round(3 * d))):  # distractors: small blobs of random colors
            r = rng.uniform(0.05, 0.12) * s
            cx, cy = rng.uniform(0, s, 2)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        shape = SHAPES[self.shape_order[label % len(SHAPES)]]
        color = np.array(self.palette[label // len(SHAPES)]) * (1 - 0.3 * d * rng.random())
        r = rng.uniform(0.22, 0.36) * s
        cx, cy = rng.uniform(r, s - r, 2)
        _draw_shape(draw, shape, cx, cy, r, tuple(int(v) for v in color))
        return _add_noise(np.asarray(img), rng, 25 * d)

    def _instance(self, label: int, rng: np.random.Generator) -> np.ndarray:
        s, d = self.size, self.difficulty
        proto = np.random.default_rng([self.seed, 1_000_003, label])
        grid = proto.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        item = Image.fromarray(grid).resize((s, s), Image.NEAREST)
        draw = ImageDraw.Draw(item)
        k = int(proto.integers(0, len(SHAPES)))
        _draw_shape(draw, SHAPES[k], s / 2, s / 2, s / 4, tuple(int(v) for v in proto.integers(0, 256, 3)))
        angle = rng.uniform(-40, 40) * d
        scale = 1 + rng.uniform(-0.25, 0.25) * d
        item = item.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=(128, 128, 128))
        side = max(4, int(s * scale))
        item = item.resize((side, side), Image.BILINEAR)
        canvas = Image.fromarray(_noise_background(rng, s, 30 * d + 5))
        shift = rng.integers(-int(s * 0.15 * d) - 1, int(s * 0.15 * d) + 2, 2)
        canvas.paste(item, (int((s - side) / 2 + shift[0]), int((s - side) / 2 + shift[1])))
        light = 1 + rng.uniform(-0.3, 0.3) * d
        return _add_noise(np.clip(np.asarray(canvas) * light, 0, 255).astype(np.uint8), rng, 20 * d)


def _noise_background(rng: np.random.Generator, size: int, std: float) -> np.ndarray:
    base = rng.integers(60, 200)
    return np.clip(base + rng.normal(0, std, (size, size, 3)), 0, 255).astype(np.uint8)


def _add_noise(img: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    return np.clip(img + rng.normal(0, std, img.shape), 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(1, int(r / 3)))
    elif shape == "hbar":
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=color)
    else:  # vbar
        draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=color)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (255 * r, 255 * g, 255 * b)
