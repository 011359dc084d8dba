"""Path policies: which path each task takes at a training step, and at which elastic size.

`fixed`: each task's configured path. `sample`: every step each task draws its path, each
block task-specific with probability p, from a generator seeded by (seed, step, task); every
rank draws the same paths, and a resumed run draws what the uninterrupted run would have.
`learned`: UFO's learned paths. Each task has a pair of logits [FFN-shared, FFN-task] per block
(`PathLogits`, trained with the network); while a block is open the step samples it with Gumbel
noise (seeded as `sample` draws) and the forward takes the hard choice while the gradient flows
through the softmax (straight-through), so both FFNs run for that task's rows; once the run is
past `decide_after` steps and a choice's probability reaches `confidence` the block is decided:
from then on only the chosen FFN runs, as on a fixed path.
`ElasticPolicy` picks each task's size the same way, by the sandwich rule.
"""

from __future__ import annotations

import random
import zlib
from typing import Mapping

import torch
from torch import nn

OPEN = "?"  # a path letter: the learned choice of this block is still open (both FFNs run)


class PathLogits(nn.Module):
    """One task's learned path: logits for [FFN-shared, FFN-task] in each block, equal at the start."""

    def __init__(self, depth: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(depth, 2))

    def forward(self, noise: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Straight-through Gumbel-softmax gates (depth, 2): forward, the one-hot of
        argmax(logits + noise); backward, the gradient of softmax((logits + noise) / temperature).
        And the choice's probabilities softmax(logits) (depth, 2), with their gradient."""
        logits = self.logits.float()
        soft = torch.softmax((logits + noise.to(logits.device)) / temperature, dim=-1)
        hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
        return (hard - soft.detach() + soft).to(self.logits.dtype), torch.softmax(logits, dim=-1)


class PathPolicy:
    def __init__(self, name: str, paths: Mapping[str, str], seed: int = 0, p_task: float = 0.5, *,
                 steps: int = 1, temperature: tuple[float, float] = (5.0, 1.0), decide_after: int = 0,
                 confidence: float = 0.9):
        if name not in ("fixed", "sample", "learned"):
            raise ValueError(f"unknown path policy {name!r}")
        self.name, self.paths, self.seed, self.p_task = name, dict(paths), seed, p_task
        self.steps, self.temperature, self.decide_after, self.confidence = steps, temperature, decide_after, confidence
        # learned: each task's decided letter per block (OPEN while open), and the latest probabilities
        # of FFN-task per block, the same on every rank (`observe`)
        self.decided = {task: OPEN * len(path) for task, path in self.paths.items()}
        self.probs = {task: [0.5] * len(path) for task, path in self.paths.items()}

    def paths_at(self, step: int) -> dict[str, str]:
        """Each task's path at optimizer step `step` (learned: OPEN where a block is still open)."""
        if self.name == "fixed":
            return dict(self.paths)
        if self.name == "learned":
            return dict(self.decided)
        out = {}
        for task, path in self.paths.items():
            rng = random.Random(f"{self.seed}:{step}:{zlib.crc32(task.encode())}")
            out[task] = "".join("T" if rng.random() < self.p_task else "S" for _ in path)
        return out

    def gates_at(self, step: int) -> dict[str, tuple[torch.Tensor, float]]:
        """learned: each task with an open block -> (Gumbel noise (depth, 2), temperature) of the step,
        seeded by (seed, step, task): every rank samples alike, and a resumed run as the straight one."""
        if self.name != "learned":
            return {}
        start, end = self.temperature
        temperature = start * (end / start) ** min(1.0, step / max(1, self.steps))
        out = {}
        for task, path in self.decided.items():
            if OPEN in path:
                g = torch.Generator().manual_seed(zlib.crc32(f"gumbel:{self.seed}:{step}:{task}".encode()))
                u = torch.rand(len(path), 2, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
                out[task] = ((-torch.log(-torch.log(u))).float(), temperature)
        return out

    def observe(self, step: int, probs: Mapping[str, list[float]]) -> list[tuple[str, int, str, float]]:
        """learned: take every task's probabilities of FFN-task per block after `step` steps, and decide
        the open blocks past `decide_after` whose choice is confident. Returns what was decided."""
        decided = []
        for task, p in probs.items():
            self.probs[task] = [float(v) for v in p]
            if step < self.decide_after:
                continue
            letters = list(self.decided[task])
            for i, v in enumerate(self.probs[task]):
                if letters[i] == OPEN and max(v, 1 - v) >= self.confidence:
                    letters[i] = "T" if v > 0.5 else "S"
                    decided.append((task, i, letters[i], max(v, 1 - v)))
            self.decided[task] = "".join(letters)
        return decided

    def best_paths(self) -> dict[str, str]:
        """The path each task takes now: learned, its decided blocks and the likelier choice of the
        open ones (what evaluation and export take); else `paths_at`'s of a fixed run."""
        if self.name != "learned":
            return dict(self.paths)
        return {task: "".join(letter if letter != OPEN else ("T" if p > 0.5 else "S")
                              for letter, p in zip(self.decided[task], self.probs[task]))
                for task in self.decided}

    def record(self, step: int, paths: Mapping[str, str], logged: bool) -> dict:
        """What the policy adds to a step's history record: `sample`, the path each task trained on;
        `learned`, on logged steps, each task's likelier path, its open blocks and P(FFN-task) per block."""
        if self.name == "sample":
            return {"path": dict(paths), "task_blocks": {task: path.count("T") for task, path in paths.items()}}
        if self.name == "learned" and logged:
            return {"path": self.best_paths(),
                    "path_open": {task: path.count(OPEN) for task, path in self.decided.items()},
                    "path_prob": {f"{task}/block{i}": p for task, probs in self.probs.items()
                                  for i, p in enumerate(probs)}}
        return {}

    def shown(self, paths: Mapping[str, str]) -> dict[str, str]:
        """The paths a progress line shows: learned, each task's likelier choice, lower-case while open."""
        if self.name != "learned":
            return dict(paths)
        return {task: "".join(b if d != OPEN else b.lower() for b, d in zip(best, self.decided[task]))
                for task, best in self.best_paths().items()}

    def eval_paths(self, step: int) -> dict[str, str]:
        """The paths a task is evaluated on: a learned task's likelier choice per block, else the step's."""
        return self.best_paths() if self.name == "learned" else self.paths_at(step)

    def state_dict(self) -> dict:
        state = {"name": self.name, "paths": self.paths, "seed": self.seed, "p_task": self.p_task}
        if self.name == "learned":
            state.update(decided=dict(self.decided), probs={t: list(p) for t, p in self.probs.items()},
                         best=self.best_paths())
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """A resumed learned run's decided blocks and probabilities (an older run's are kept as they are)."""
        if self.name == "learned" and state.get("name") == "learned":
            for task in self.decided:
                if task in state.get("decided", {}):
                    self.decided[task] = state["decided"][task]
                    self.probs[task] = [float(v) for v in state["probs"][task]]


class ElasticPolicy:
    """Each task's elastic size at a step: (depth, FFN hidden units, attention heads), None meaning
    the full one.

    The sandwich rule, in turn: the largest size, the smallest, and one drawn at random from a
    generator seeded by (seed, step, task), so every rank and a resumed run agree.
    """

    def __init__(self, sizes: Mapping[str, tuple[tuple[int, ...], ...]], depth: int, hidden: int,
                 seed: int = 0, heads: int | None = None):
        # sizes: task -> (depths, hidden widths[, head counts]) it trains besides the full size
        self.full = (depth, hidden, heads)
        self.sizes = {task: tuple(sorted(set(choices) | {whole}) for choices, whole in zip(size, self.full))
                      for task, size in sizes.items() if any(size)}
        self.seed = seed

    def sizes_at(self, step: int) -> dict[str, tuple[int | None, int | None, int | None]]:
        out = {}
        for task, choices in self.sizes.items():
            turn = step % 3
            if turn == 0:
                size = [c[-1] for c in choices]
            elif turn == 1:
                size = [c[0] for c in choices]
            else:
                rng = random.Random(f"elastic:{self.seed}:{step}:{zlib.crc32(task.encode())}")
                size = [rng.choice(c) for c in choices]
            size += [None] * (3 - len(size))
            out[task] = tuple(None if s == whole else s for s, whole in zip(size, self.full))
        return out

    def record(self, sizes: Mapping[str, tuple[int | None, ...]]) -> dict:
        """What a step's history record says of the elastic size each task trained at."""
        if not sizes:
            return {}
        record = {"elastic_depth": {task: s[0] or self.full[0] for task, s in sizes.items()},
                  "elastic_hidden": {task: s[1] or self.full[1] for task, s in sizes.items()}}
        if self.full[2] is not None and any(len(c) > 2 and len(c[2]) > 1 for c in self.sizes.values()):
            record["elastic_heads"] = {task: s[2] or self.full[2] for task, s in sizes.items()}
        return record
