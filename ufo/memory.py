"""The per-rank memory plan of a run before it is launched: weights, gradients and optimizer state
of every rank, for each placement, from the config's parameter counts, the layout of N ranks and
the ZeRO stage; and the activations a micro-step keeps for its backward, per task (its micro-batch
at its input size), with and without activation checkpointing. Buffers and the engine's own
workspace are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ufo.config import UfoConfig, config_from_dict
from ufo.errors import ConfigError
from ufo.layout import Layout, make_layout
from ufo.model import SupernetViT, TaskSlice, count_params


@dataclass(frozen=True)
class RankMemory:
    task: str  # the task of the rank's parameters (task_sharded); "all" where every rank holds every task
    ranks: int  # how many ranks share this plan
    params: int  # parameters the rank holds
    weights: float  # bytes
    gradients: float
    optimizer: float  # optimizer state, with the fp32 master weights of bf16/fp16
    centres: int = 0  # of `params`: the rank's shard of its task's Partial FC class centres
    all_centres: int = 0  # the task's whole centres (what a dense head holds on every rank)

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
        if placement == "replicated":  # Partial FC shards over a task's own ranks: replicated has dense heads
            for task in raw["tasks"].values():
                task["partial_fc"] = None
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
        centres = whole = 0
        if sharded:
            parts = [(shared, layout.world_size), (own[task], layout.group_size(task))]
            tc = cfg.tasks[task]
            if tc.partial_fc is not None:  # the largest shard, held by its rank alone
                width = tc.embedding_dim or cfg.model.embed_dim
                whole = tc.num_classes * width
                centres = -(-tc.num_classes // layout.group_size(task)) * width
                parts = [(shared, layout.world_size), (own[task] - whole, layout.group_size(task)), (centres, 1)]
        else:
            parts = [(shared, layout.world_size)] + [(n, layout.world_size) for n in own.values()]
        weights, grads, optimizer = rank_bytes(cfg, parts, zero)
        ranks = layout.group_size(task) if task != "all" else layout.world_size
        rows.append(RankMemory(task, ranks, sum(n for n, _ in parts), weights, grads, optimizer, centres, whole))
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
             "(weights, gradients, optimizer state with fp32 masters; activations below)",
             f"  {'placement':<13} {'task':<12} {'ranks':>5} {'params':>14} {'weights':>10} {'grads':>10} "
             f"{'optimizer':>10} {'total':>10}"]
    for placement, rows in plans.items():
        if isinstance(rows, str):
            lines.append(f"  {placement:<13} not possible: {rows}")
            continue
        for r in rows:
            lines.append(f"  {placement:<13} {r.task:<12} {r.ranks:>5} {r.params:>14,} {r.weights / gib:>8.2f} G "
                         f"{r.gradients / gib:>8.2f} G {r.optimizer / gib:>8.2f} G {r.total / gib:>8.2f} G")
    for r in plans.get("task_sharded") or []:
        if not isinstance(r, str) and r.centres:
            mine, dense = (sum(rank_bytes(cfg, [(n, 1)], zero)) for n in (r.centres, r.all_centres))
            lines.append(f"  partial_fc {r.task}: {r.all_centres:,} centre values over {r.ranks} ranks: "
                         f"{mine / gib:.3f} GiB per rank with their gradients and optimizer state, "
                         f"{dense / gib:.3f} GiB as a dense head")
    if any(not isinstance(rows, str) and any(cfg.tasks[t].partial_fc for t in cfg.tasks) for rows in plans.values()):
        lines.append("  (replicated: with dense heads; Partial FC needs task_sharded)")
    worst = {p: max(r.total for r in rows) for p, rows in plans.items() if not isinstance(rows, str)}
    if len(worst) == 2:
        lines.append(f"  largest rank: replicated {worst['replicated'] / gib:.2f} GiB, task_sharded "
                     f"{worst['task_sharded'] / gib:.2f} GiB ({worst['replicated'] / worst['task_sharded']:.2f}x less)")
    return "\n".join(lines)


def saved_activation_bytes(fn: Callable[[], Any], params: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """Bytes autograd keeps for the backward while `fn` runs (each storage once; `params`, which the
    backward reads but which exist anyway, left out), and fn's result: what activation
    checkpointing saves, counted on any device."""
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in params}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return sum(seen.values()), out


@dataclass(frozen=True)
class Activations:
    """Bytes one rank keeps for the backward of one task's micro-batch slice."""

    task: str
    size: tuple[int, int]
    batch: int
    full: float  # no checkpointing
    checkpointed: float  # with train.activation_checkpointing (its k; every block when it is 0), at its peak:
    recompute: float  # ... one block's activations, alive again while the backward recomputes it
    every: int  # that k


def activation_plan(cfg: UfoConfig) -> list[Activations]:
    """Per task: what autograd keeps for the backward of its micro-batch at its input size, measured
    on this machine by counting the tensors autograd saves (`saved_activation_bytes`) for models of
    the config's width with one and two blocks (the blocks add alike; a checkpointed block keeps its
    input only, and one block's activations live again during its recompute), scaled to the batch
    and the engine's precision (bf16/fp16: half of fp32's bytes)."""
    scale = 1.0 if cfg.deepspeed.precision == "fp32" else 0.5
    every = cfg.train.activation_checkpointing or 1
    depth = cfg.model.depth
    plans = []
    for task in cfg.tasks:
        probe = 2  # samples measured; the bytes scale with the batch
        base, block, block_input = _block_bytes(cfg, task, probe)
        batch = cfg.batch_of(task)
        per = batch / probe * scale
        kept = len(range(0, depth, every))  # checkpointed blocks: 0, k, 2k, ...
        full = (base + depth * block) * per
        checkpointed = (base + (depth - kept) * block + kept * block_input + block) * per
        plans.append(Activations(task, cfg.size_of(task), batch, full, checkpointed, block * per, every))
    return plans


def _block_bytes(cfg: UfoConfig, task: str, probe: int) -> tuple[float, float, float]:
    """(everything but the blocks, one block, one block's input) bytes for `probe` samples of `task`,
    from models of one and two blocks (the heads' few activations left out)."""
    m = cfg.model
    counted = []
    for depth in (1, 2):
        raw = cfg.to_dict()
        raw["model"].update(depth=depth, pretrained=None, pretrained_file=None, ffns="all")
        raw["train"].update(activation_checkpointing=0, path_policy="fixed")
        raw["tasks"] = {task: {**raw["tasks"][task], "path": "S" * depth, "num_classes": 2, "elastic": None}}
        torch.manual_seed(0)
        model = SupernetViT.from_config(config_from_dict(raw, "activation plan")).train()
        x = torch.randn(probe, m.in_chans, *cfg.size_of(task))
        n, _ = saved_activation_bytes(lambda: model.forward_features(x, [TaskSlice(task, "S" * depth, probe)]),
                                      model.parameters())
        counted.append(n)
    h, w = cfg.size_of(task)
    tokens = (h // m.patch_size) * (w // m.patch_size) + 1 + m.reg_tokens
    block = counted[1] - counted[0]
    return counted[0] - block, block, probe * tokens * m.embed_dim * 4


def _bytes(n: float) -> str:
    return f"{n / 2**30:8.2f} G" if n >= 2**28 else f"{n / 2**20:8.2f} M"


def format_activations(cfg: UfoConfig, plans: list[Activations]) -> str:
    k = cfg.train.activation_checkpointing
    every = "every block" if (k or 1) == 1 else f"every {k}th block"
    lines = [f"activations per rank per micro-step ({cfg.deepspeed.precision}; counted on this machine, heads "
             f"left out), without and with checkpointing {every}" + ("" if k else " (train.activation_checkpointing)")]
    for a in plans:
        lines.append(f"  {a.task:<12} {f'{a.size[0]}x{a.size[1]} px x {a.batch}':>17} {_bytes(a.full)} "
                     f"{_bytes(a.checkpointed)}")
    # mixed: a rank runs every task's slice (task_parallel: its task's line); at most the sum
    lines.append(f"  {'mixed rank':<12} {'every task':>17} {_bytes(sum(a.full for a in plans))} "
                 f"{_bytes(sum(a.checkpointed for a in plans))}")
    return "\n".join(lines)
