"""The per-rank memory plan of a run before it is launched: weights, gradients and optimizer state
of every rank, for each placement, from the config's parameter counts, the layout of N ranks and
the ZeRO stage. Activations, buffers and the engine's own workspace are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ufo.config import UfoConfig, config_from_dict
from ufo.errors import ConfigError
from ufo.layout import Layout, make_layout
from ufo.model import SupernetViT, count_params


@dataclass(frozen=True)
class RankMemory:
    task: str  # the task of the rank's parameters (task_sharded); "all" where every rank holds every task
    ranks: int  # how many ranks share this plan
    params: int  # parameters the rank holds
    weights: float  # bytes
    gradients: float
    optimizer: float  # optimizer state, with the fp32 master weights of bf16/fp16

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def memory_plan(cfg: UfoConfig, world: int, zero: int | None = None) -> dict[str, list[RankMemory] | str]:
    """For `replicated` and `task_sharded`: one row per task's ranks (or the reason a placement is not possible)."""
    zero = cfg.deepspeed.zero_stage if zero is None else zero
    with torch.device("meta"):
        counts = count_params(SupernetViT.from_config(cfg), {t: cfg.path_of(t) for t in cfg.tasks})
    own = {t.task: t.own for t in counts.tasks}
    plans: dict[str, list[RankMemory] | str] = {}
    for placement in ("replicated", "task_sharded"):
        raw = cfg.to_dict()
        raw["deepspeed"]["zero_stage"] = zero
        raw["train"]["placement"] = placement
        try:
            probe = config_from_dict(raw, "plan")
            layout = make_layout(probe, world)
        except ConfigError as e:  # the reason this placement cannot run here
            plans[placement] = (str(e).removeprefix("plan: ").removeprefix("train.placement: ")
                                .removeprefix("task_sharded is not possible here: "))
            continue
        plans[placement] = _rows(probe, layout, counts.shared, own, zero)
    return plans


def _rows(cfg: UfoConfig, layout: Layout, shared: int, own: dict[str, int], zero: int) -> list[RankMemory]:
    """Bytes per rank as DeepSpeed keeps them, each part partitioned over the ranks that hold it."""
    sharded = layout.placement == "task_sharded"
    tasks = list(layout.groups) if sharded else ["all"]  # replicated: every rank alike
    rows = []
    for task in tasks:
        # (parameters, ranks they are partitioned over) for the shared part and each task part held
        if sharded:
            parts = [(shared, layout.world_size), (own[task], layout.group_size(task))]
        else:
            parts = [(shared, layout.world_size)] + [(n, layout.world_size) for n in own.values()]
        weights, grads, optimizer = rank_bytes(cfg, parts, zero)
        ranks = layout.group_size(task) if task != "all" else layout.world_size
        rows.append(RankMemory(task, ranks, sum(n for n, _ in parts), weights, grads, optimizer))
    return rows


def rank_bytes(cfg: UfoConfig, parts: list[tuple[int, int]], zero: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes of a rank holding `parts`: (parameters, ranks they
    are partitioned over). ZeRO-1 partitions optimizer state and fp32 masters, ZeRO-2 gradients
    too, ZeRO-3 weights too."""
    precision = cfg.deepspeed.precision
    low = 4 if precision == "fp32" else 2  # bytes of a weight and of a gradient
    master = 0 if precision == "fp32" else 4
    state = {"adamw": 8, "sgd": 4 if cfg.train.momentum else 0}[cfg.train.optimizer]
    weights = sum(n * low / (k if zero >= 3 else 1) for n, k in parts)
    grads = sum(n * low / (k if zero >= 2 else 1) for n, k in parts)
    if precision == "bf16" and zero == 0:
        grads += sum(n * 4 for n, _ in parts)  # BF16_Optimizer accumulates in fp32
    optimizer = sum(n * (state + master) / (k if zero >= 1 else 1) for n, k in parts)
    return weights, grads, optimizer


def format_plan(cfg: UfoConfig, world: int, zero: int | None, plans: dict) -> str:
    zero = cfg.deepspeed.zero_stage if zero is None else zero
    gib = 2 ** 30
    lines = [f"memory plan per rank: {world} ranks, ZeRO {zero}, {cfg.deepspeed.precision}, {cfg.train.optimizer} "
             "(weights, gradients, optimizer state with fp32 masters; activations not counted)",
             f"  {'placement':<13} {'task':<12} {'ranks':>5} {'params':>14} {'weights':>10} {'grads':>10} "
             f"{'optimizer':>10} {'total':>10}"]
    for placement, rows in plans.items():
        if isinstance(rows, str):
            lines.append(f"  {placement:<13} not possible: {rows}")
            continue
        for r in rows:
            lines.append(f"  {placement:<13} {r.task:<12} {r.ranks:>5} {r.params:>14,} {r.weights / gib:>8.2f} G "
                         f"{r.gradients / gib:>8.2f} G {r.optimizer / gib:>8.2f} G {r.total / gib:>8.2f} G")
    worst = {p: max(r.total for r in rows) for p, rows in plans.items() if not isinstance(rows, str)}
    if len(worst) == 2:
        lines.append(f"  largest rank: replicated {worst['replicated'] / gib:.2f} GiB, task_sharded "
                     f"{worst['task_sharded'] / gib:.2f} GiB ({worst['replicated'] / worst['task_sharded']:.2f}x less)")
    return "\n".join(lines)
