"""Path policies: which path each task takes at a training step, and at which elastic size.

`fixed`: each task's configured path. `sample`: every step each task draws its path, each
block task-specific with probability p, from a generator seeded by (seed, step, task); every
rank draws the same paths, and a resumed run draws what the uninterrupted run would have.
`ElasticPolicy` picks each task's size the same way, by the sandwich rule.
"""

from __future__ import annotations

import random
import zlib
from typing import Mapping


class PathPolicy:
    def __init__(self, name: str, paths: Mapping[str, str], seed: int = 0, p_task: float = 0.5):
        if name not in ("fixed", "sample"):
            raise ValueError(f"unknown path policy {name!r}")
        self.name, self.paths, self.seed, self.p_task = name, dict(paths), seed, p_task

    def paths_at(self, step: int) -> dict[str, str]:
        """Each task's path at optimizer step `step`."""
        if self.name == "fixed":
            return dict(self.paths)
        out = {}
        for task, path in self.paths.items():
            rng = random.Random(f"{self.seed}:{step}:{zlib.crc32(task.encode())}")
            out[task] = "".join("T" if rng.random() < self.p_task else "S" for _ in path)
        return out

    def state_dict(self) -> dict:
        return {"name": self.name, "paths": self.paths, "seed": self.seed, "p_task": self.p_task}


class ElasticPolicy:
    """Each task's elastic size at a step: (depth, FFN hidden units), None meaning the full one.

    The sandwich rule, in turn: the largest size, the smallest, and one drawn at random from a
    generator seeded by (seed, step, task), so every rank and a resumed run agree.
    """

    def __init__(self, sizes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], depth: int, hidden: int,
                 seed: int = 0):
        # sizes: task -> (depths, hidden widths) it trains besides the full size
        self.full = (depth, hidden)
        self.sizes = {task: (sorted(set(ds) | {depth}), sorted(set(hs) | {hidden}))
                      for task, (ds, hs) in sizes.items() if ds or hs}
        self.seed = seed

    def sizes_at(self, step: int) -> dict[str, tuple[int | None, int | None]]:
        out = {}
        for task, (depths, widths) in self.sizes.items():
            turn = step % 3
            if turn == 0:
                d, h = depths[-1], widths[-1]
            elif turn == 1:
                d, h = depths[0], widths[0]
            else:
                rng = random.Random(f"elastic:{self.seed}:{step}:{zlib.crc32(task.encode())}")
                d, h = rng.choice(depths), rng.choice(widths)
            out[task] = (None if d == self.full[0] else d, None if h == self.full[1] else h)
        return out
