"""`ufo bench model`: forward+backward of the supernet on a task-grouped micro-batch against a
plain timm ViT of the same active size on the same total batch, timed in one run, interleaved.
Both end in identical copies of the task heads (margin softmax over every class included), so the
ratio measures what the multi-path FFNs cost, not what the tasks' heads cost.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ufo.bench.harness import PlainWithHeads
from ufo.config import UfoConfig
from ufo.model import SupernetViT, TaskSlice


def bench_model(cfg: UfoConfig, batch_per_task: int = 16, steps: int = 10, warmup: int = 3,
                threads: int | None = None, compile: bool = False) -> dict[str, Any]:
    """Median fwd+bwd seconds per step of both models and their ratio (supernet / plain); with
    `compile`, also of both compiled alike (every block's attention and MLPs by torch.compile)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    supernet = SupernetViT.from_config(cfg).train()
    plain = PlainWithHeads(cfg, supernet.heads).train()
    result = _time(cfg, supernet, plain, batch_per_task, steps, warmup)
    if compile:
        supernet.compile_blocks()
        for block in plain.vit.blocks:  # the same parts of the plain ViT
            block.attn.compile(dynamic=True)
            block.mlp.compile(dynamic=True)
        compiled = _time(cfg, supernet, plain, batch_per_task, steps, warmup)
        result["compiled"] = {k: compiled[k] for k in ("supernet_s_per_step", "plain_s_per_step",
                                                       "supernet_samples_per_s", "plain_samples_per_s", "ratio")}
        result["compile_speedup"] = result["supernet_s_per_step"] / compiled["supernet_s_per_step"]
    return result


def _time(cfg: UfoConfig, supernet: SupernetViT, plain: PlainWithHeads, batch_per_task: int, steps: int,
          warmup: int) -> dict[str, Any]:
    slices = [TaskSlice(name, cfg.path_of(name), batch_per_task) for name in cfg.tasks]
    batch = batch_per_task * len(slices)
    m = cfg.model
    images = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
    labels = torch.cat([torch.randint(cfg.tasks[s.task].num_classes, (s.size,)) for s in slices])
    weights = [cfg.tasks[s.task].weight for s in slices]

    def supernet_step() -> None:
        losses = supernet(images, slices, labels)
        sum(w * loss for w, loss in zip(weights, losses)).backward()
        supernet.zero_grad(set_to_none=True)

    def plain_step() -> None:
        losses = plain(images, slices, labels)
        sum(w * loss for w, loss in zip(weights, losses)).backward()
        plain.zero_grad(set_to_none=True)

    for _ in range(warmup):
        supernet_step()
        plain_step()
    times: dict[str, list[float]] = {"supernet": [], "plain": []}
    for _ in range(steps):  # interleaved, so drift in machine load hits both alike
        for name, step in (("supernet", supernet_step), ("plain", plain_step)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "config": {"depth": m.depth, "embed_dim": m.embed_dim, "img_size": m.img_size,
                   "patch_size": m.patch_size, "tasks": len(slices)},
        "paths": {s.task: s.path for s in slices},
        "batch": batch,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "plain_body_params": sum(p.numel() for n, p in plain.named_parameters() if not n.startswith("heads.")),
        "supernet_s_per_step": median["supernet"],
        "plain_s_per_step": median["plain"],
        "supernet_samples_per_s": batch / median["supernet"],
        "plain_samples_per_s": batch / median["plain"],
        "ratio": median["supernet"] / median["plain"],
        "target": 1.05,
    }


def format_model_bench(r: dict[str, Any]) -> str:
    c = r["config"]
    verdict = "meets" if r["ratio"] <= r["target"] else "MISSES"
    return "\n".join([
        f"ufo bench model: ViT depth {c['depth']}, width {c['embed_dim']}, {c['img_size']}px/patch {c['patch_size']}, "
        f"{c['tasks']} tasks x {r['batch'] // c['tasks']} rows = batch {r['batch']}, {r['threads']} threads, "
        f"median of {r['steps']} steps",
        f"  supernet (task-grouped)    {1000 * r['supernet_s_per_step']:9.1f} ms/step  "
        f"{r['supernet_samples_per_s']:8.1f} samples/s",
        f"  plain timm ViT, same heads {1000 * r['plain_s_per_step']:9.1f} ms/step  "
        f"{r['plain_samples_per_s']:8.1f} samples/s",
        f"  ratio supernet/plain       {r['ratio']:9.3f}   ({verdict} the target <= {r['target']})",
    ] + ([f"  compiled (train.compile): supernet {1000 * r['compiled']['supernet_s_per_step']:.1f} ms/step "
          f"({r['compile_speedup']:.2f}x eager), plain {1000 * r['compiled']['plain_s_per_step']:.1f} ms/step, "
          f"ratio {r['compiled']['ratio']:.3f}"] if "compiled" in r else []))
