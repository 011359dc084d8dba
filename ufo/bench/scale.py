"""`ufo bench scale`: per-rank weights, optimizer state and bytes sent per step as tasks grow,
replicated vs task_sharded vs a plain ViT of the subnet's size, measured on CPU ranks; then the
same arithmetic projected to ViT-B, ViT-L and ViT-H (26 tasks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

from ufo.bench.harness import CollectiveCounter, join_rank, rank_done, spawn_ranks
from ufo.config import UfoConfig, config_from_dict, load_config
from ufo.engine import build_engine, deepspeed_config
from ufo.layout import import_deepspeed, init_distributed, leave_distributed, make_layout
from ufo.memory import memory_plan, rank_bytes
from ufo.model import SupernetViT, TaskSlice, count_params, subnet_args
from ufo.train import micro_step
from ufo.weighting import Static


def _optimizer_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors and, under ZeRO, its fp32 partitions (masters)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    total = sum(v.numel() * v.element_size() for state in inner.state.values() for v in state.values()
                if torch.is_tensor(v) and v.ndim > 0)
    for flat in getattr(optimizer, "single_partition_of_fp32_groups", None) or []:
        total += flat.numel() * flat.element_size()
    return total


def _scale_rank(rank: int, world: int, port: int, raw: dict, placement: str, steps: int, out: str) -> None:
    counter = CollectiveCounter()  # before the engine (deepspeed, imported when it is built) binds torch.distributed's functions
    join_rank(rank, world, port)

    init_distributed()
    torch.set_num_threads(1)
    cfg = config_from_dict(raw, "bench")
    layout = make_layout(cfg, world)
    tasks, m, b = list(cfg.tasks), cfg.model, cfg.train.micro_batch_size
    (own,) = layout.tasks_of(rank)
    images = torch.randn(b, m.in_chans, m.img_size, m.img_size)
    labels = torch.randint(cfg.tasks[own].num_classes, (b,))
    if placement == "plain":  # the floor: a timm ViT of the subnet's size, data parallel over the world
        deepspeed = import_deepspeed()
        torch.manual_seed(0)
        model = VisionTransformer(**subnet_args(cfg, own))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))

        def step() -> None:
            engine.backward(torch.nn.functional.cross_entropy(engine(images), labels))
            engine.step()
    else:
        engine, _, clip, _ = build_engine(cfg, layout, rank, say=lambda _: None, pretrained=False)
        weighting = Static(tasks, [cfg.tasks[t].weight for t in tasks])
        slices = [TaskSlice(t, cfg.path_of(t), b if t == own else 0) for t in layout.held(rank)]

        def step() -> None:
            micro_step(engine, images, labels, slices, weighting, world, None, tasks, clip)
    for i in range(steps):
        counter.on = i == steps - 1  # the last optimizer step (state exists by then)
        step()
    counter.on = False
    result = {"rank": rank, "task": own, "sent_bytes": counter.sent, "collectives": counter.calls,
              "param_bytes": sum(p.numel() * p.element_size() for p in engine.module.parameters()),
              "params": sum(p.numel() for p in engine.module.parameters()),
              "optimizer_bytes": _optimizer_bytes(engine.optimizer)}
    rank_done(out, rank, result)
    leave_distributed()


def _head_rank(rank: int, world: int, port: int, raw: dict, steps: int, out: str) -> None:
    """One face rank of `_head_config`: the bytes of its margin head's centres and of their optimizer
    state (fp32 master and Adam's moments) after `steps` optimizer steps, and its step time."""
    import time

    join_rank(rank, world, port)
    init_distributed()
    torch.set_num_threads(1)
    cfg = config_from_dict(raw, "bench")
    layout = make_layout(cfg, world)
    m, b = cfg.model, cfg.train.micro_batch_size
    engine, _, clip, _ = build_engine(cfg, layout, rank, say=lambda _: None, pretrained=False)
    images = torch.randn(b, m.in_chans, m.img_size, m.img_size)
    labels = torch.randint(cfg.tasks["face"].num_classes, (b,), generator=torch.Generator().manual_seed(rank))
    slices = [TaskSlice("face", cfg.path_of("face"), b)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        micro_step(engine, images, labels, slices, Static(["face"], [1.0]), world, None, ["face"], clip)
        times.append(time.perf_counter() - start)
    (centres,) = [p for n, p in engine.module.named_parameters() if n.endswith("margin.weight")]
    # the rank's part of the centres in the optimizer (ZeRO 1/2: its partition of a dense head's, all of a
    # Partial FC shard): fp32 master, Adam's two moments
    mapping = getattr(centres, "_hp_mapping", None)
    moments = (mapping.lp_fragment_address.numel if mapping is not None else 0) * 4 * 3
    rank_done(out, rank, {"rank": rank, "centres": centres.numel(), "weight_bytes": centres.numel() * centres.element_size(),
                          "optimizer_bytes": moments, "step_s": min(times[1:] or times)})
    leave_distributed()


def _head_config(cfg: UfoConfig, classes: int, ranks: int, partial_fc: bool, zero: int) -> dict:
    """One retrieval task of `classes` identities on the config's model, over `ranks` ranks, fp32 AdamW."""
    raw = cfg.to_dict()
    width = min(128, cfg.model.embed_dim)
    raw["tasks"] = {"face": {"kind": "retrieval", "num_classes": classes, "embedding_dim": width, "margin": "arcface",
                             "margin_scale": 64.0, "margin_value": 0.5, "ranks": ranks,
                             "partial_fc": {"sample_rate": 1.0} if partial_fc else None}}
    raw["train"].update(layout="task_parallel", placement="task_sharded", micro_batch_size=4, optimizer="adamw",
                        gradient_accumulation_steps=1, gradient_clipping=0.0, activation_checkpointing=0)
    raw["model"]["pretrained"] = None
    raw["deepspeed"] = {"zero_stage": zero, "precision": "fp32", "overrides": {}}
    raw["tracking"]["enabled"] = False
    return raw


def bench_partial_fc(cfg: UfoConfig, classes: int = 1_000_000, ranks: Sequence[int] = (1, 2, 4), zero: int = 1,
                     steps: int = 2, heads: Sequence[str] = ("dense", "partial_fc")) -> dict[str, Any]:
    """Per-rank bytes of a `classes`-identity margin head (centres, their fp32 masters and Adam moments)
    on k ranks of one task, dense (every rank holds every centre and its gradient; ZeRO partitions the
    optimizer state) vs Partial FC (each rank its 1/k of the centres), measured on CPU ranks after
    `steps` optimizer steps."""
    rows = []
    for k in ranks:
        for partial in [h == "partial_fc" for h in heads]:
            measured = spawn_ranks(_head_rank, (_head_config(cfg, classes, k, partial, zero), steps), k)
            rows.append({"ranks": k, "head": "partial_fc" if partial else "dense",
                         **{key: max(r[key] for r in measured) for key in ("centres", "weight_bytes",
                                                                          "optimizer_bytes", "step_s")}})
    return {"classes": classes, "embedding_dim": min(128, cfg.model.embed_dim), "zero_stage": zero, "rows": rows}


def format_partial_fc_bench(r: dict[str, Any]) -> str:
    mb = 2 ** 20
    lines = [f"ufo bench scale --partial-fc: a {r['classes']:,}-identity margin head ({r['embedding_dim']}-d), "
             f"ZeRO {r['zero_stage']}, fp32 AdamW, CPU ranks of one task; per rank (largest)",
             f"  {'ranks':>5} {'head':<11} {'centres':>11} {'weights':>11} {'optimizer':>11} {'step':>9}"]
    for row in r["rows"]:
        lines.append(f"  {row['ranks']:>5} {row['head']:<11} {row['centres']:>11,} {row['weight_bytes'] / mb:>8.1f} MB "
                     f"{row['optimizer_bytes'] / mb:>8.1f} MB {row['step_s'] * 1e3:>6.0f} ms")
    return "\n".join(lines)


def _scale_config(cfg: UfoConfig, tasks: int, per_task: int, zero: int) -> dict:
    """`tasks` classification tasks of 10 classes on the config's model, `per_task` ranks each, fp32."""
    raw = cfg.to_dict()
    raw["tasks"] = {f"t{i}": {"kind": "classification", "num_classes": 10, "ranks": per_task} for i in range(tasks)}
    raw["train"].update(layout="task_parallel", micro_batch_size=4, optimizer="adamw", gradient_accumulation_steps=1)
    raw["deepspeed"] = {"zero_stage": zero, "precision": "fp32", "overrides": {}}
    raw["tracking"]["enabled"] = False
    return raw


def _projection(cfg: UfoConfig, per_task: int) -> dict[str, Any]:
    """Per-rank memory (ufo.memory's plan) and bytes sent per step (ring model: shared gradients over
    the world, a task's over its ranks) of a config at `per_task` ranks per task, against a plain ViT
    that trains one task alone (its subnet and training head) over the same ranks; the worst task's ratio."""
    world = per_task * len(cfg.tasks)
    raw = cfg.to_dict()
    raw["tasks"] = {t: {**tc, "ranks": per_task} for t, tc in raw["tasks"].items()}
    cfg = config_from_dict(raw, "projection")
    with torch.device("meta"):
        counts = count_params(SupernetViT.from_config(cfg), {t: cfg.path_of(t) for t in cfg.tasks})
    plans = memory_plan(cfg, world)
    w, k = (world - 1) / world, (per_task - 1) / per_task
    b = 4 if cfg.deepspeed.precision == "fp32" else 2
    memory_ratio: dict[str, float] = {}
    sent_ratio: dict[str, float] = {}
    for t in counts.tasks:
        tc = cfg.tasks[t.task]
        active = t.subnet + (tc.num_classes * (tc.embedding_dim or cfg.model.embed_dim)
                             if tc.kind == "retrieval" else 0)  # + the margin softmax's class centers
        plain_memory = sum(rank_bytes(cfg, [(active, world)], cfg.deepspeed.zero_stage))
        plain_sent = 2 * b * active * w
        mine = {"replicated": 2 * b * counts.total * w, "task_sharded": 2 * b * (counts.shared * w + t.own * k)}
        for placement, rows in plans.items():
            if isinstance(rows, str):
                continue
            row = next(r for r in rows if r.task in (t.task, "all"))
            memory_ratio[placement] = max(memory_ratio.get(placement, 0.0), row.total / plain_memory)
            sent_ratio[placement] = max(sent_ratio.get(placement, 0.0), mine[placement] / plain_sent)
    return {"world": world, "per_task": per_task, "tasks": len(cfg.tasks), "params": counts.total,
            "active": max(t.subnet for t in counts.tasks), "memory_ratio": memory_ratio, "sent_ratio": sent_ratio}


def vit_h_config(tasks: int = 26, overrides: Sequence[str] = ()) -> UfoConfig:
    """ViT-H/14 at 224 px with `tasks` retrieval tasks (the ViT-B config's four heads, cycled): UFO's scale."""
    base = load_config(Path(__file__).resolve().parents[2] / "configs" / "ufo_vit_b.yaml").to_dict()
    heads = list(base["tasks"].values())
    base["model"].update(embed_dim=1280, depth=32, num_heads=16, patch_size=14)
    if base["model"].get("pretrained"):  # the ViT-B config's start, at ViT-H's size
        base["model"]["pretrained"] = "vit_huge_patch14_224.mae"
    # at 224 px (the ViT-B tasks' own sizes are not multiples of 14 px patches)
    base["tasks"] = {f"task{i:02d}": {**heads[i % len(heads)], "path": "S" * 16 + "T" * 16, "img_size": None}
                     for i in range(tasks)}
    return config_from_dict(base, "vit-h", overrides)


def bench_scale(cfg: UfoConfig, task_counts: Sequence[int] = (2, 4, 8), zero: int = 1, steps: int = 2,
                projections: dict[str, UfoConfig] | None = None, per_task_projected: int = 8,
                ranks_per_task: int | None = None) -> dict[str, Any]:
    """Per-rank parameter and optimizer bytes and bytes sent per optimizer step, measured on CPU ranks
    for T tasks (2 ranks per task up to 8 ranks, else 1), replicated vs task_sharded vs a plain timm
    ViT of the subnet's size under the same DeepSpeed config; then the same arithmetic projected."""
    rows = []
    for T in task_counts:
        per_task = ranks_per_task or (2 if 2 * T <= 8 else 1)
        raw = _scale_config(cfg, T, per_task, zero)
        for placement in ("replicated", "task_sharded", "plain"):
            raw["train"]["placement"] = "replicated" if placement == "plain" else placement
            ranks = spawn_ranks(_scale_rank, (raw, placement, steps), T * per_task)
            rows.append({"tasks": T, "per_task": per_task, "world": T * per_task, "placement": placement,
                         **{k: max(r[k] for r in ranks) for k in ("params", "param_bytes", "optimizer_bytes",
                                                                  "sent_bytes")}})
    for row in rows:
        floor = next(r for r in rows if r["tasks"] == row["tasks"] and r["placement"] == "plain")
        row["ratio"] = {k: row[k] / floor[k] for k in ("param_bytes", "optimizer_bytes", "sent_bytes")}
    projected = {name: _projection(c, per_task_projected) for name, c in (projections or {}).items()}
    return {"zero_stage": zero, "model": {"depth": cfg.model.depth, "embed_dim": cfg.model.embed_dim},
            "rows": rows, "projected": projected, "target": 1.1}


def format_scale_bench(r: dict[str, Any]) -> str:
    mb = 2 ** 20
    lines = [f"ufo bench scale: ViT depth {r['model']['depth']}, width {r['model']['embed_dim']}, ZeRO "
             f"{r['zero_stage']}, fp32, CPU ranks; per rank (largest), ratio to the plain ViT of the subnet's size",
             f"  {'tasks':>5} {'ranks':>5} {'placement':<13} {'params':>10} {'weights':>16} {'optimizer':>16} "
             f"{'sent/step':>16}"]
    for row in r["rows"]:
        q = row["ratio"]
        lines.append(f"  {row['tasks']:>5} {row['world']:>5} {row['placement']:<13} {row['params']:>10,} "
                     f"{row['param_bytes'] / mb:>7.2f} MB {q['param_bytes']:>5.2f}x "
                     f"{row['optimizer_bytes'] / mb:>7.2f} MB {q['optimizer_bytes']:>5.2f}x "
                     f"{row['sent_bytes'] / mb:>7.2f} MB {q['sent_bytes']:>5.2f}x")
    if r["projected"]:
        lines.append("  projected, ZeRO 2 bf16 AdamW, worst task, against a plain ViT training that task alone "
                     "(subnet + margin centers) on the same ranks; memory = weights + gradients + optimizer "
                     "state with masters:")
        for name, p in r["projected"].items():
            mr, sr = p["memory_ratio"], p["sent_ratio"]
            shard = (f"task_sharded {mr['task_sharded']:.2f}x memory {sr['task_sharded']:.2f}x sent"
                     if "task_sharded" in mr else "task_sharded not possible")
            lines.append(f"    {name:<16} {p['tasks']:>2} tasks x {p['per_task']} ranks: {p['params'] / 1e9:6.2f} B "
                         f"params, subnet {p['active'] / 1e6:6.1f} M; replicated {mr['replicated']:5.2f}x memory "
                         f"{sr['replicated']:5.2f}x sent; {shard}")
    return "\n".join(lines)
