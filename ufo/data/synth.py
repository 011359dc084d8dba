"""Synthetic tasks for tests and demos: learnable, of a chosen kind and difficulty, and distinct
between tasks (a task's name seeds its palette and prototypes).

`shapes` (classification): each class is a shape in a color, drawn at a random place and size
over noise and distractors. `instances` (retrieval): each class is one random "product", seen
under random rotation, scale, shift, lighting and noise. `persons` (re-identification): each
identity is a figure (head, upper and lower clothing with their colors and patterns, a bag on
one side) seen by one of `CAMERAS` cameras, each with its own color cast, brightness, viewpoint
(the back view hides the bag and mirrors the figure), distance and background; a query matches
its identity only through another camera's view.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hbar", "vbar")
KINDS = {"shapes": "classification", "instances": "retrieval", "persons": "retrieval"}
CAMERAS = 4  # of the `persons` generator


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

    def camera(self, index: int) -> int:
        """The camera of sample `index` (`persons`): every identity is seen by every camera in turn."""
        return (index // self.num_classes) % CAMERAS

    def image(self, index: int, label: int | None = None) -> np.ndarray:
        """(size, size, 3) uint8; `label` overrides the class of `index` (a re-identification test
        split's identities are not the training ones)."""
        rng = np.random.default_rng([self.seed, index])
        label = self.label(index) if label is None else label
        if self.generator == "shapes":
            return self._shape(label, rng)
        if self.generator == "persons":
            return self._person(label, self.camera(index), rng)
        return self._instance(label, rng)

    def _person(self, identity: int, camera: int, rng: np.random.Generator) -> np.ndarray:
        s, d = self.size, self.difficulty
        look = np.random.default_rng([self.seed, 2_000_003, identity])
        view = np.random.default_rng([self.seed, 3_000_017, camera])
        colors = look.integers(30, 226, (4, 3))  # upper, lower, head, bag
        patterns = look.integers(0, 3, 2)  # plain, stripes, checks: upper and lower clothing
        bag_left = bool(look.integers(0, 2))
        back = camera % 2 == 1  # cameras 1 and 3 see the back: no bag, the figure mirrored
        cast = 1 + (view.random(3) - 0.5) * 1.2 * d  # the camera's color balance
        bright = 1 + (view.random() - 0.5) * 0.8 * d
        scale = 0.8 + 0.3 * view.random()  # distance
        background = view.integers(40, 200, 3)
        canvas = np.clip(background + rng.normal(0, 12 + 20 * d, (s, s, 3)), 0, 255)
        h, w = s * scale * rng.uniform(0.92, 1.05), s * scale * 0.45 * rng.uniform(0.9, 1.1)
        top = (s - h) / 2 + rng.uniform(-0.06, 0.06) * s * d
        left = (s - w) / 2 + rng.uniform(-0.1, 0.1) * s * d
        img = Image.fromarray(canvas.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        head = h * 0.18
        draw.ellipse([left + w * 0.3, top, left + w * 0.7, top + head], fill=tuple(int(v) for v in colors[2]))
        for part, (y0, y1) in enumerate(((0.2, 0.58), (0.58, 1.0))):
            box = [left, top + h * y0, left + w, top + h * y1]
            color = tuple(int(v) for v in colors[part])
            draw.rectangle(box, fill=color)
            dark = tuple(int(v * 0.45) for v in color)
            if patterns[part] == 1:  # stripes
                for y in np.arange(box[1], box[3], max(2.0, h * 0.08))[::2]:
                    draw.rectangle([box[0], y, box[2], y + max(1.0, h * 0.04)], fill=dark)
            elif patterns[part] == 2:  # checks
                step = max(2.0, w / 3)
                for i, x in enumerate(np.arange(box[0], box[2], step)):
                    draw.rectangle([x, box[1] + (i % 2) * (box[3] - box[1]) / 2, x + step / 2,
                                    box[1] + (i % 2 + 1) * (box[3] - box[1]) / 2], fill=dark)
        if not back:
            bx = left - w * 0.25 if bag_left else left + w * 0.95
            draw.rectangle([bx, top + h * 0.35, bx + w * 0.3, top + h * 0.6], fill=tuple(int(v) for v in colors[3]))
        out = np.asarray(img).astype(np.float64)
        if back:
            out = out[:, ::-1]
        out = out * cast * bright * (1 + rng.uniform(-0.15, 0.15) * d)
        return _add_noise(np.clip(out, 0, 255).astype(np.uint8), rng, 18 * d)

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
