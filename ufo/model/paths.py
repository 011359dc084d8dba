"""Path policies: which path each task takes at a training step.

`fixed`: each task's configured path. `sample`: every step each task draws its path, each
block task-specific with probability p, from a generator seeded by (seed, step, task); every
rank draws the same paths, and a resumed run draws what the uninterrupted run would have.
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
