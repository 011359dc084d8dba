"""What a run records to tell the causes of negative transfer apart (the survey's three: conflicting
gradient directions, tasks converging at different speeds, losses of different magnitudes).

Every optimizer step: the global gradient norm (all parameters, after the ranks' reduction, before
clipping), which shows a loss spike as what it is. Every `train.diagnostics_every` steps, per task:
its loss against its loss at the run's first step (speed), the norm of its gradient on the shared
parameters (dominance: the task whose gradient moves the shared weights most), and the cosine
between every pair of tasks' gradients on the shared parameters (conflict: below 0, a step for one
is a step against the other). A task's gradient is that of its mean loss over the step's global
batch, unweighted, as one process would compute it on the union of the ranks' batches.

Cost, on diagnostic steps only: one extra forward and one extra backward pass per task a rank
serves (every task in `mixed`, its own in `task_parallel`: before the world's reduction a rank's
gradient is its task's share), a buffer of tasks x shared parameters in fp32 per rank, and one
all-reduce of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ufo.checkpoint import canonical_name, task_of


class Diagnostics:
    def __init__(self, module: torch.nn.Module, tasks: Sequence[str], every: int,
                 own_norm: Callable[[], float] | None = None):
        """`own_norm`: the global gradient norm where the engine computes none (fp32 without ZeRO),
        called between the last backward and the step."""
        self.tasks, self.every, self.own_norm = list(tasks), every, own_norm
        shared = [(n, p) for n, p in module.named_parameters()
                  if p.requires_grad and task_of(canonical_name(n)) is None]
        self.shared_names = [n for n, _ in shared]
        self.offsets = [0]
        for _, p in shared:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.buffer: torch.Tensor | None = None
        self.first: torch.Tensor | None = None  # each task's loss at the run's first step (NaN: not yet seen)
        self.norm: float | None = None

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) measures the tasks."""
        return bool(self.every) and step % self.every == 0

    def begin(self, device: torch.device) -> None:
        self.buffer = torch.zeros(len(self.tasks), self.offsets[-1], dtype=torch.float32, device=device)

    def measure(self, module: torch.nn.Module, images, slices: Sequence, labels: torch.Tensor,
                scales: Sequence[float]) -> None:
        """This rank's share of each slice's task gradient on the shared parameters: of `scale` times
        the slice's loss sum (its task's samples in the step, over all ranks, and the accumulation
        steps in `scale`). A forward and backward of their own, apart from the engine's: on stand-ins
        for the parameters (DeepSpeed's gradient hooks on the parameters must not see these
        gradients) and copies of the buffers (a BNNeck's running statistics move once a step), with
        the random state the training forward then starts from (the same drop-path masks)."""
        from torch.nn.utils.stateless import _reparametrize_module

        stand_ins = {n: p.detach().requires_grad_(p.requires_grad) for n, p in module.named_parameters()}
        state = {**stand_ins, **{n: b.detach().clone() for n, b in module.named_buffers()}}
        shared = [stand_ins[n] for n in self.shared_names]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), _reparametrize_module(module, state):
            losses = module.forward(images, slices, labels, reduction="sum")  # not __call__: no engine hooks
            for s, loss, scale in zip(slices, losses, scales):  # every slice, empty or not: the same collectives
                grads = torch.autograd.grad(loss * scale, shared, retain_graph=True, allow_unused=True)
                row = self.buffer[self.tasks.index(s.task)]
                for grad, start, end in zip(grads, self.offsets, self.offsets[1:]):
                    if grad is not None:
                        row[start:end] += grad.detach().reshape(-1).float()

    def before_step(self) -> None:
        self.norm = self.own_norm() if self.own_norm is not None else None

    def after_step(self, engine) -> float | None:
        """The step's global gradient norm (the engine's, else the one taken before the step)."""
        norm = engine.get_global_grad_norm()
        if norm is None:
            norm = self.norm
        self.norm = None
        return None if norm is None else float(norm)

    def observe(self, losses: torch.Tensor) -> None:
        """Every step's mean loss per task (all ranks): the first one seen of each task is its start."""
        if self.first is None:
            self.first = torch.full((len(self.tasks),), math.nan, dtype=torch.float64)
        self.first = torch.where(torch.isnan(self.first), losses.double(), self.first)

    def finish(self, losses: torch.Tensor) -> dict[str, dict[str, float | None]]:
        """The step's per-task measures from every rank's shares (one all-reduce); `losses` the step's
        mean loss per task (all ranks)."""
        self.observe(losses)
        out: dict[str, dict[str, float | None]] = {
            "loss_ratio": {t: _finite(v) for t, v in zip(self.tasks, (losses.double() / self.first).tolist())}}
        if self.buffer is None:
            return out
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.buffer)
        gram = torch.zeros(len(self.tasks), len(self.tasks), dtype=torch.float64)
        for chunk in self.buffer.split(1 << 22, dim=1):
            chunk = chunk.double()
            gram += (chunk @ chunk.T).cpu()
        self.buffer = None
        norms = gram.diagonal().clamp_min(0).sqrt()
        out["shared_grad_norm"] = {t: float(n) for t, n in zip(self.tasks, norms)}
        out["grad_cosine"] = {f"{a}-{b}": _finite(float(gram[i, j] / (norms[i] * norms[j])))
                              for i, a in enumerate(self.tasks) for j, b in enumerate(self.tasks) if i < j}
        return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def first_losses(history: Path, tasks: Sequence[str]) -> torch.Tensor | None:
    """Each task's loss at a run's first step, from its history (a resumed run's speeds stay relative
    to the start), NaN where it had none; None without a history."""
    try:
        with open(history) as f:
            first = json.loads(f.readline())["loss"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return torch.tensor([math.nan if first.get(t) is None else first[t] for t in tasks], dtype=torch.float64)


def summarize(records: Sequence[dict], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """A run's history (`history.jsonl` records) boiled down to the three causes, per task:
    `speed`: its mean loss over the last tenth of the steps against its loss at the first step;
    `share`: its weighted share of the tasks' gradients on the shared parameters, w_t |g_t| / sum_u
    w_u |g_u| with the step's loss weights, the mean over the diagnostic steps (1 / T is an even
    share); `cosine`: each pair of tasks' mean gradient cosine over the diagnostic steps. A measure
    the run has no readings for is left out."""
    out: dict[str, dict[str, float]] = {"speed": {}, "share": {}, "cosine": {}}
    stepped = [r for r in records if isinstance(r.get("loss"), dict)]
    tail = stepped[len(stepped) - max(1, len(stepped) // 10):]
    for task in tasks:
        first = next((r["loss"][task] for r in stepped if r["loss"].get(task) is not None), None)
        late = [r["loss"][task] for r in tail if r["loss"].get(task) is not None]
        if first and late:
            out["speed"][task] = sum(late) / len(late) / first
    measured = [r for r in records if isinstance(r.get("shared_grad_norm"), dict)]
    shares: dict[str, list[float]] = {}
    cosines: dict[str, list[float]] = {}
    for r in measured:
        weighted = {t: (r.get("weight") or {}).get(t, 1.0) * r["shared_grad_norm"][t] for t in tasks
                    if r["shared_grad_norm"].get(t) is not None}
        total = sum(weighted.values())
        for t, v in weighted.items():
            if total > 0:
                shares.setdefault(t, []).append(v / total)
        for pair, cos in (r.get("grad_cosine") or {}).items():
            if cos is not None:
                cosines.setdefault(pair, []).append(cos)
    out["share"] = {t: sum(v) / len(v) for t, v in shares.items()}
    out["cosine"] = {p: sum(v) / len(v) for p, v in cosines.items()}
    return out
