"""`ufo bench train`: supernet vs plain ViT throughput under the same DeepSpeed config on real
ranks, and each ZeRO stage's peak memory per rank.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Sequence

import torch

from ufo.bench.harness import PlainWithHeads, join_rank, rank_done, spawn_ranks
from ufo.config import UfoConfig, config_from_dict
from ufo.engine import build_engine, deepspeed_config
from ufo.layout import import_deepspeed, init_distributed, leave_distributed, make_layout
from ufo.model import TaskSlice
from ufo.model.heads import build_head
from ufo.train import micro_step
from ufo.weighting import Static


def _train_bench_rank(rank: int, world: int, port: int, raw: dict, steps: int, plain: bool, out: str) -> None:
    join_rank(rank, world, port)

    init_distributed()
    deepspeed = import_deepspeed()
    cfg = config_from_dict(raw, "bench")
    layout = make_layout(cfg, world)
    tasks, m, b = list(cfg.tasks), cfg.model, cfg.train.micro_batch_size
    held = layout.held(rank)  # the rank's tasks under its placement (and ZeRO-3 under zero.Init), as in training
    sizes = {t: (b if t in layout.tasks_of(rank) else 0) for t in held}
    slices = [TaskSlice(t, cfg.path_of(t), sizes[t]) for t in held]
    images = torch.randn(sum(sizes.values()), m.in_chans, m.img_size, m.img_size)
    labels = torch.cat([torch.randint(cfg.tasks[t].num_classes, (sizes[t],)) for t in held])
    weighting = Static(tasks, [cfg.tasks[t].weight for t in tasks])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    cuda = torch.cuda.is_available()

    def peak_now() -> int:
        return torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    result = {}
    for name in (["supernet", "plain"] if plain else ["supernet"]):
        torch.manual_seed(0)
        clip = None
        if name == "supernet":
            engine, _, clip, _ = build_engine(cfg, layout, rank, say=lambda _: None)
        else:
            heads = torch.nn.ModuleDict({t: build_head(cfg.tasks[t], m.embed_dim) for t in held})
            model = PlainWithHeads(cfg, heads)
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
        result.setdefault("built_bytes", peak_now())  # the supernet's engine built, before any step
        x, y = images.to(engine.device, dtype=dtype), labels.to(engine.device)
        micro_step(engine, x, y, slices, weighting, world, None, tasks, clip)  # warm-up
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            micro_step(engine, x, y, slices, weighting, world, None, tasks, clip)
        torch.distributed.barrier()
        seconds = (time.perf_counter() - start) / steps
        result[name] = {"s_per_step": seconds, "samples_per_s": world * len(y) / seconds,
                        "params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())}
        del engine
    result["peak_bytes"] = peak_now()
    result["peak_kind"] = "cuda max allocated" if cuda else "process peak RSS"
    rank_done(out, rank, result)
    leave_distributed()


def _spawn_bench(raw: dict, steps: int, plain: bool, world: int) -> list[dict]:
    # random weights: a pretrained start changes neither speed nor memory, and needs its files
    raw = {**raw, "model": {**raw["model"], "pretrained": None, "pretrained_file": None, "norm_eps": 1e-6}}
    return spawn_ranks(_train_bench_rank, (raw, steps, plain), world)


def bench_train(cfg: UfoConfig, steps: int = 5, world: int = 2, memory_config: UfoConfig | None = None,
                stages: Sequence[int] = (0, 1, 2, 3), memory_batch: int = 1,
                checkpointing: Sequence[int] = (0,)) -> dict[str, Any]:
    """Training throughput, supernet vs plain ViT under the same DeepSpeed config (one run), and
    peak memory per rank for each ZeRO stage on `memory_config` with a synthetic batch, for each
    train.activation_checkpointing in `checkpointing` (0: off)."""
    ranks = _spawn_bench(cfg.to_dict(), steps, plain=True, world=world)
    sup, plain = ranks[0]["supernet"], ranks[0]["plain"]
    result: dict[str, Any] = {
        "world": world, "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
        "micro_batch_size": cfg.train.micro_batch_size, "supernet": sup, "plain": plain,
        "ratio": sup["samples_per_s"] / plain["samples_per_s"], "target": 0.95, "memory": {},
    }
    if memory_config is not None:
        for stage in stages:
            for k in checkpointing:
                raw = memory_config.to_dict()
                raw["deepspeed"]["zero_stage"] = stage
                raw["train"].update(micro_batch_size=memory_batch, activation_checkpointing=k)
                for task in raw["tasks"].values():
                    task["micro_batch_size"] = None  # every task at the one measured batch
                    if world < len(raw["tasks"]):  # a mixed run: dense heads (Partial FC needs a rank per task)
                        task["partial_fc"] = None
                ranks = _spawn_bench(raw, 1, plain=False, world=world)
                result["memory"][f"{stage}" if not k else f"{stage}, checkpointing {k}"] = {
                    "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
                    "built_bytes_per_rank": [r["built_bytes"] for r in ranks], "kind": ranks[0]["peak_kind"],
                    "supernet_params": ranks[0]["supernet"]["params"]}
        result["memory_batch"] = memory_batch
    return result


def format_train_bench(r: dict[str, Any]) -> str:
    verdict = "meets" if r["ratio"] >= r["target"] else "MISSES"
    lines = [f"ufo bench train: {r['world']} ranks, ZeRO {r['zero_stage']}, {r['precision']}, "
             f"micro-batch {r['micro_batch_size']} per task",
             f"  supernet      {r['supernet']['samples_per_s']:9.1f} samples/s  "
             f"({r['supernet']['params'] / 1e6:.2f} M parameters)",
             f"  plain ViT     {r['plain']['samples_per_s']:9.1f} samples/s  "
             f"({r['plain']['params'] / 1e6:.2f} M parameters, same heads)",
             f"  ratio         {r['ratio']:9.3f}   ({verdict} the target >= {r['target']})"]
    for stage, mem in r["memory"].items():
        gib = ", ".join(f"{b / 2**30:.2f}" for b in mem["peak_bytes_per_rank"])
        built = ", ".join(f"{b / 2**30:.2f}" for b in mem["built_bytes_per_rank"])
        lines.append(f"  ZeRO {stage}: peak {mem['kind']} per rank {gib} GiB, {built} GiB once built "
                     f"(supernet {mem['supernet_params'] / 1e6:.0f} M parameters)")
    return "\n".join(lines)
