"""Benchmarks (`ufo bench ...`): speed and memory figures live here, never in tests.

`bench_model`: forward+backward of the supernet on a task-grouped micro-batch against a plain
timm ViT of the same active size on the same total batch, timed in one run, interleaved. Both
end in identical copies of the task heads (margin softmax over every class included), so the
ratio measures what the multi-path FFNs cost, not what the tasks' heads cost.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

from ufo.config import UfoConfig
from ufo.errors import ConfigError
from ufo.evaluate import primary_key
from ufo.model import SupernetViT, TaskSlice, vit_args
from ufo.model.supernet import apply_heads
from ufo.plots import plot_strategies, plot_ufo


def bench_model(cfg: UfoConfig, batch_per_task: int = 16, steps: int = 10, warmup: int = 3,
                threads: int | None = None) -> dict[str, Any]:
    """Median fwd+bwd seconds per step of both models and their ratio (supernet / plain)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    supernet = SupernetViT.from_config(cfg).train()
    plain = VisionTransformer(**vit_args(cfg.model), num_classes=0).train()
    plain.heads = copy.deepcopy(supernet.heads)
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
        features = plain.forward_head(plain.forward_features(images), pre_logits=True)
        losses = apply_heads(plain.heads, features, slices, labels)
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
    ])


def bench_data(cfg: UfoConfig, workers: Sequence[int] = (0, 1, 2), batches: int = 20) -> dict[str, Any]:
    """Decoded samples/s of each task's train loader per worker count, against what one training
    step of the supernet (fwd+bwd+AdamW on one task's micro-batch, as a task-parallel rank runs)
    consumes per second."""
    from ufo.data import endless, task_loader

    batch = cfg.train.micro_batch_size
    result: dict[str, Any] = {"micro_batch_size": batch, "configured_workers": cfg.data.num_workers, "tasks": {},
                              "without_shards": [t for t, c in cfg.tasks.items() if c.shards is None]}
    with_shards = [t for t, c in cfg.tasks.items() if c.shards is not None]
    if not with_shards or not workers:
        return result
    torch.manual_seed(cfg.train.seed)
    model = SupernetViT.from_config(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    m = cfg.model
    for task in with_shards:
        images = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
        labels = torch.randint(cfg.tasks[task].num_classes, (batch,))
        slices = [TaskSlice(task, cfg.path_of(task), batch)]

        def train_step() -> None:
            model(images, slices, labels)[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(2):
            train_step()
        start = time.perf_counter()
        for _ in range(5):
            train_step()
        consume = 5 * batch / (time.perf_counter() - start)
        rates = {}
        for w in workers:
            loader = task_loader(cfg, task, num_workers=w, log=lambda _: None)
            stream = endless(loader)
            next(stream)  # worker start-up is not throughput
            start, samples = time.perf_counter(), 0
            for _ in range(batches):
                samples += len(next(stream)["labels"])
            rates[w] = samples / (time.perf_counter() - start)
            del stream
        result["tasks"][task] = {"train_step_samples_per_s": consume,
                                 "loader_samples_per_s": rates,
                                 "ratio": {w: r / consume for w, r in rates.items()}}
    result["target"] = 3.0
    return result


# what one GPU's training step of ViT-B/16 at 224 px takes in, from the literature: DeiT-B trained
# 300 ImageNet epochs (1.28 M images) in 53 h on 8 V100s (Touvron et al. 2021, sec. 5.2 and table 1):
# 300 * 1.28e6 / (53 * 3600) / 8 = 252 images/s per V100; a newer GPU in bf16 takes several times that
VIT_B_V100_SAMPLES_PER_S = 252


def photo(rng, width: int, height: int):
    """A photo-like RGB image: smooth regions and edges (low-frequency noise upsampled) with fine
    grain, which JPEG compresses about as it does a photograph (a pure-noise image would decode far
    slower, a flat one far faster)."""
    import numpy as np
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def bench_jpeg(cfg: UfoConfig, work: Path, side: int = 224, samples: int = 128,
               photo_size: tuple[int, int] = (1024, 768), task: str | None = None) -> dict[str, Any]:
    """One core's samples/s on JPEG shards: photos as a dataset ships them (`photo_size`, quality 90)
    written as they are and with `--max-side side`; per sample, the decode (PIL) and the augmentation
    (the task's timm train transform) timed apart, and the loader end to end."""
    import io

    import numpy as np
    from PIL import Image

    from ufo.data import task_loader, write_task_shards
    from ufo.data.loader import build_transform
    from ufo.data.sources import RawSample, Source

    task = task or next(iter(cfg.tasks))
    rng = np.random.default_rng(cfg.train.seed)
    photos = []
    for _ in range(16):  # 16 distinct photos, reused: the encoder sees what it would, the bench stays quick
        out = io.BytesIO()
        photo(rng, *photo_size).save(out, format="JPEG", quality=90)
        photos.append(out.getvalue())
    source = Source(f"{samples} photo-like {photo_size[0]}x{photo_size[1]} JPEGs", None, ["a", "b"],
                    list(range(samples)), [i % 2 for i in range(samples)],
                    lambda i: RawSample(photos[i % len(photos)], "jpg", i % 2, {"index": i}))
    transform = build_transform(cfg, task, train=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core
    result: dict[str, Any] = {"task": task, "samples": samples, "photo_size": list(photo_size),
                              "img_size": cfg.model.img_size, "sets": {}}
    try:
        for name, max_side in (("as shipped", None), (f"max-side {side}", side)):
            directory = work / name.replace(" ", "-")
            write_task_shards(source, task, directory, kind="classification", maxcount=samples, overwrite=True,
                              max_side=max_side, log=lambda _: None)
            import tarfile

            with tarfile.open(next(directory.glob("*.tar"))) as tar:
                blobs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
            start = time.perf_counter()
            decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
            decode = (time.perf_counter() - start) / len(blobs)
            start = time.perf_counter()
            for img in decoded:
                transform(img)
            augment = (time.perf_counter() - start) / len(blobs)
            raw = cfg.to_dict()
            raw["tasks"][task]["shards"] = str(directory)
            from ufo.config import config_from_dict

            loader = task_loader(config_from_dict(raw, "bench"), task, num_workers=0, log=lambda _: None)
            start, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch["labels"])
            end_to_end = n / (time.perf_counter() - start)
            result["sets"][name] = {"image_size": list(decoded[0].size), "bytes_per_image": sum(map(len, blobs)) / len(blobs),
                                    "decode_ms": decode * 1e3, "augment_ms": augment * 1e3,
                                    "loader_samples_per_s_per_core": end_to_end}
    finally:
        torch.set_num_threads(threads)
    per_core = result["sets"][f"max-side {side}"]["loader_samples_per_s_per_core"]
    result["vit_b_v100_samples_per_s"] = VIT_B_V100_SAMPLES_PER_S
    result["cores_per_v100"] = VIT_B_V100_SAMPLES_PER_S / per_core
    return result


def format_jpeg_bench(r: dict[str, Any]) -> str:
    lines = [f"ufo bench data: JPEG shards, one core ({r['samples']} samples of task {r['task']}; photos "
             f"{r['photo_size'][0]}x{r['photo_size'][1]}, trained at {r['img_size']} px)",
             f"  {'shards':<16}{'stored as':>12}{'KB/image':>10}{'decode ms':>11}{'augment ms':>12}{'samples/s':>11}"]
    for name, s in r["sets"].items():
        size = f"{s['image_size'][0]}x{s['image_size'][1]}"
        lines.append(f"  {name:<16}{size:>12}{s['bytes_per_image'] / 1024:>10.1f}{s['decode_ms']:>11.2f}"
                     f"{s['augment_ms']:>12.2f}{s['loader_samples_per_s_per_core']:>11.0f}")
    lines.append(f"  one V100 trains ViT-B/16 at 224 px on ~{r['vit_b_v100_samples_per_s']} images/s (DeiT, Touvron "
                 f"et al. 2021): {r['cores_per_v100']:.1f} cores per V100 keep it fed from max-side shards")
    return "\n".join(lines)


def format_data_bench(r: dict[str, Any]) -> str:
    if not r["tasks"]:
        return (f"ufo bench data: no task has shards ({', '.join(r['without_shards'])}): loader throughput "
                "per worker count skipped")
    workers = list(next(iter(r["tasks"].values()))["loader_samples_per_s"])
    head = "".join(f"{f'{w} workers':>22}" for w in workers)
    lines = [f"ufo bench data: micro-batch {r['micro_batch_size']}, decoded samples/s (ratio to the training "
             f"step's consumption; target >= {r['target']:g})",
             f"  {'task':<12}{'train step':>12}{head}"]
    for task, t in r["tasks"].items():
        cells = "".join(f"{t['loader_samples_per_s'][w]:>13.0f} ({t['ratio'][w]:5.1f}x)" for w in workers)
        lines.append(f"  {task:<12}{t['train_step_samples_per_s']:>12.0f}{cells}")
    w = r["configured_workers"]
    if w in workers:
        worst = min(t["ratio"][w] for t in r["tasks"].values())
        verdict = "meets" if worst >= r["target"] else "MISSES"
        lines.append(f"  with data.num_workers = {w}: worst ratio {worst:.1f}x ({verdict} the target)")
    return "\n".join(lines)


class _PlainWithHeads(torch.nn.Module):
    """A plain timm ViT (one FFN per block) ending in the supernet's task heads, with its forward."""

    def __init__(self, cfg: UfoConfig, heads: torch.nn.ModuleDict):
        super().__init__()
        self.vit = VisionTransformer(**vit_args(cfg.model), num_classes=0)
        self.heads = copy.deepcopy(heads)

    def forward(self, images, slices, labels=None, reduction="mean", hits=False):
        features = self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)
        return apply_heads(self.heads, features, slices, labels, reduction, hits)


def _join(rank: int, world: int, port: int) -> None:
    """The launcher variables of one of the benchmark's spawned ranks."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _train_bench_rank(rank: int, world: int, port: int, raw: dict, steps: int, plain: bool, out: str) -> None:
    import json
    import resource

    _join(rank, world, port)
    from ufo.config import config_from_dict
    from ufo.layout import import_deepspeed, init_distributed, leave_distributed, make_layout
    from ufo.model.heads import build_head
    from ufo.train import build_engine, deepspeed_config, micro_step
    from ufo.weighting import Static

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
            model = _PlainWithHeads(cfg, heads)
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
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    leave_distributed()


def _spawn_bench(raw: dict, steps: int, plain: bool, world: int) -> list[dict]:
    return _spawn(_train_bench_rank, (raw, steps, plain), world)


def bench_train(cfg: UfoConfig, steps: int = 5, world: int = 2, memory_config: UfoConfig | None = None,
                stages: Sequence[int] = (0, 1, 2, 3), memory_batch: int = 1) -> dict[str, Any]:
    """Training throughput, supernet vs plain ViT under the same DeepSpeed config (one run), and
    peak memory per rank for each ZeRO stage on `memory_config` with a synthetic batch."""
    ranks = _spawn_bench(cfg.to_dict(), steps, plain=True, world=world)
    sup, plain = ranks[0]["supernet"], ranks[0]["plain"]
    result: dict[str, Any] = {
        "world": world, "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
        "micro_batch_size": cfg.train.micro_batch_size, "supernet": sup, "plain": plain,
        "ratio": sup["samples_per_s"] / plain["samples_per_s"], "target": 0.95, "memory": {},
    }
    if memory_config is not None:
        for stage in stages:
            raw = memory_config.to_dict()
            raw["deepspeed"]["zero_stage"] = stage
            raw["train"]["micro_batch_size"] = memory_batch
            ranks = _spawn_bench(raw, 1, plain=False, world=world)
            result["memory"][stage] = {"peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
                                       "built_bytes_per_rank": [r["built_bytes"] for r in ranks],
                                       "kind": ranks[0]["peak_kind"],
                                       "supernet_params": ranks[0]["supernet"]["params"]}
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


def bench_weighting(cfg: UfoConfig, strategies: Sequence[str], steps: int, out: Path, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the config once per weighting strategy (one process, `mixed` layout, same seed and data)
    and compare: each task's eval metric, seconds per step, weights and losses over time
    (`OUT/<strategy>/history.jsonl`, one figure `OUT/weighting.png`)."""
    from ufo.config import config_from_dict
    from ufo.train import train
    from ufo.weighting import STRATEGIES

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"--strategies: unknown {', '.join(unknown)} (known: {', '.join(STRATEGIES)})")
    _fresh_runs(out, strategies, overwrite)
    result: dict[str, Any] = {"steps": steps, "tasks": {t: c.kind for t, c in cfg.tasks.items()},
                              "metrics": {t: primary_key(cfg, t) for t in cfg.tasks}, "strategies": {}}
    for name in strategies:
        raw = cfg.to_dict()
        raw["train"].update(steps=steps, out_dir=str(out / name), layout="mixed", eval_every=0, checkpoint_every=0,
                            warmup_steps=min(raw["train"]["warmup_steps"], steps // 2),
                            weighting={"name": name})
        raw["tracking"]["enabled"] = False
        log(f"== {name}")
        start = time.perf_counter()
        run = train(config_from_dict(raw, f"bench weighting ({name})"),
                    log=lambda line: log("   " + line) if line.startswith(("step", "eval")) else None)
        seconds = time.perf_counter() - start
        result["strategies"][name] = {
            "s_per_step": seconds / steps, "eval": run.metrics,
            "final_weight": run.history[-1]["weight"], "final_loss": run.history[-1]["loss"]}
    plot_strategies(out, list(strategies), out / "weighting.png")
    (out / "weighting.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fresh_runs(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """A run directory left from before would be resumed, not benchmarked: refuse it, or remove it."""
    for name in names:
        if (out / name).exists():
            if not overwrite:
                raise ConfigError(f"{out / name}: exists; pass --overwrite to replace it or choose another --out")
            shutil.rmtree(out / name)


def format_weighting_bench(r: dict[str, Any]) -> str:
    tasks = list(r["tasks"])
    key = r["metrics"]
    head = f"{'strategy':<16} {'s/step':>7}  " + "  ".join(f"{t + ' ' + key[t]:>18}" for t in tasks) + "  final weights"
    lines = [f"ufo bench weighting: {r['steps']} steps per strategy, one process, mixed layout", head]
    for name, s in r["strategies"].items():
        metrics = "  ".join(f"{s['eval'].get(t, {}).get(key[t], float('nan')):>18.4f}" for t in tasks)
        weights = " ".join(f"{t}={s['final_weight'][t]:.3g}" for t in tasks)
        lines.append(f"{name:<16} {s['s_per_step']:>7.3f}  {metrics}  {weights}")
    return "\n".join(lines)


def bench_elastic(cfg: UfoConfig, steps: int, out: Path, fractions: Sequence[float] = (0.25, 0.5, 1.0),
                  overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Each task's metric at about 25 %, 50 % and 100 % of its full subnet's parameters: inherited from
    one elastic supernet (sandwich training, no retraining) against the same size trained from scratch
    for the same steps (one process, `mixed` layout, same seed and data)."""
    from ufo.checkpoint import load_supernet, read_checkpoint
    from ufo.config import config_from_dict
    from ufo.search import PathEvaluator, subnet_params
    from ufo.train import train

    m = cfg.model
    task0 = next(iter(cfg.tasks))
    grid = sorted({(d, r) for d in range(1, m.depth + 1) for r in (m.mlp_ratio / 4, m.mlp_ratio / 2, m.mlp_ratio)},
                  key=lambda z: subnet_params(cfg, task0, *z))
    full = subnet_params(cfg, task0, m.depth, m.mlp_ratio)
    sizes = []
    for f in fractions:  # the grid size whose parameters come closest to the fraction (ties: deeper)
        d, r = min(grid, key=lambda z: (abs(subnet_params(cfg, task0, *z) / full - f), -z[0]))
        sizes.append({"fraction": f, "depth": d, "mlp_ratio": r})
    _fresh_runs(out, ["elastic"] + [f"scratch-{s['depth']}-{s['mlp_ratio']:g}" for s in sizes], overwrite)

    def run(raw: dict, name: str) -> Path:
        raw["train"].update(steps=steps, out_dir=str(out / name), layout="mixed", eval_every=0, checkpoint_every=0,
                            warmup_steps=min(raw["train"]["warmup_steps"], steps // 2))
        raw["tracking"]["enabled"] = False
        raw["model"]["ffns"] = "all"  # every FFN, as before model.ffns: the elastic run is what `ufo search` takes
        log(f"== {name}")
        train(config_from_dict(raw, f"bench elastic ({name})"),
              log=lambda line: log("   " + line) if line.startswith(("step", "eval")) else None)
        return out / name

    raw = cfg.to_dict()
    for task in raw["tasks"].values():
        task["elastic"] = {"depths": sorted({s["depth"] for s in sizes}),
                           "mlp_ratios": sorted({s["mlp_ratio"] for s in sizes})}
    elastic = read_checkpoint(run(raw, "elastic"))
    supernet = load_supernet(elastic)
    result: dict[str, Any] = {"steps": steps, "sizes": sizes, "tasks": {}}
    for s in sizes:
        d, r = s["depth"], s["mlp_ratio"]
        raw = cfg.to_dict()
        raw["model"].update(depth=d, mlp_ratio=r)
        for task in raw["tasks"].values():
            task["path"] = task["path"][:d]
        scratch = read_checkpoint(run(raw, f"scratch-{d}-{r:g}"))
        small = load_supernet(scratch)
        hidden = int(m.embed_dim * r)
        for task in cfg.tasks:
            inherited = PathEvaluator(supernet, elastic.config, task)
            row = result["tasks"].setdefault(task, {"metric": inherited.metric, "sizes": []})
            row["sizes"].append({
                **s, "params": subnet_params(cfg, task, d, r),
                "elastic": inherited(cfg.path_of(task), None if d == m.depth else d,
                                     None if r == m.mlp_ratio else hidden),
                "scratch": PathEvaluator(small, scratch.config, task)(scratch.config.path_of(task))})
    (out / "elastic.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_elastic_bench(r: dict[str, Any]) -> str:
    lines = [f"ufo bench elastic: {r['steps']} steps each; inherited from the elastic supernet vs trained "
             "from scratch at that size",
             f"{'task':<12} {'size':>6} {'depth':>5} {'mlp_ratio':>9} {'params (M)':>10} {'metric':>9} "
             f"{'elastic':>8} {'scratch':>8}"]
    for task, t in r["tasks"].items():
        for s in t["sizes"]:
            lines.append(f"{task:<12} {s['fraction']:>6.0%} {s['depth']:>5} {s['mlp_ratio']:>9g} "
                         f"{s['params'] / 1e6:>10.3f} {t['metric']:>9} {s['elastic']:>8.4f} {s['scratch']:>8.4f}")
    return "\n".join(lines)


class _Collectives:
    """Counts what this rank sends in torch.distributed's collectives (a ring model per op), by
    wrapping them before the engine binds them; `on` selects the window that counts."""

    OPS = ("all_reduce", "reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather",
           "reduce_scatter", "_all_gather_base", "_reduce_scatter_base")

    def __init__(self):
        import inspect

        import torch.distributed as dist

        self.on, self.sent, self.calls = False, 0.0, 0
        for name in self.OPS:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn, inspect.signature(fn)))

    def _wrap(self, name, fn, signature):
        import torch.distributed as dist

        def counted(*args, **kwargs):
            if self.on:
                bound = list(signature.bind(*args, **kwargs).arguments.items())
                group = dict(bound).get("group")
                n = dist.get_world_size(group) if group is not None else dist.get_world_size()
                # the whole buffer: the input of a reduce-scatter, else the first argument (output of a gather)
                data = bound[1][1] if name in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter") \
                    else bound[0][1]
                parts = data if isinstance(data, (list, tuple)) else [data]
                nbytes = sum(t.numel() * t.element_size() for t in parts)
                factor = 2 * (n - 1) / n if name == "all_reduce" else (n - 1) / n
                self.sent += factor * nbytes if n > 1 else 0.0
                self.calls += 1
            return fn(*args, **kwargs)

        return counted


def _optimizer_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors and, under ZeRO, its fp32 partitions (masters)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    total = sum(v.numel() * v.element_size() for state in inner.state.values() for v in state.values()
                if torch.is_tensor(v) and v.ndim > 0)
    for flat in getattr(optimizer, "single_partition_of_fp32_groups", None) or []:
        total += flat.numel() * flat.element_size()
    return total


def _scale_rank(rank: int, world: int, port: int, raw: dict, placement: str, steps: int, out: str) -> None:
    import json

    counter = _Collectives()  # before the engine binds torch.distributed's functions
    _join(rank, world, port)
    from ufo.config import config_from_dict
    from ufo.layout import import_deepspeed, init_distributed, leave_distributed, make_layout
    from ufo.model import subnet_args
    from ufo.train import build_engine, deepspeed_config, micro_step
    from ufo.weighting import Static

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
        engine, _, clip, _ = build_engine(cfg, layout, rank, say=lambda _: None)
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
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    leave_distributed()


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
    from ufo.config import config_from_dict
    from ufo.memory import memory_plan, rank_bytes
    from ufo.model import count_params

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
    from ufo.config import config_from_dict, load_config

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "ufo_vit_b.yaml").to_dict()
    heads = list(base["tasks"].values())
    base["model"].update(embed_dim=1280, depth=32, num_heads=16, patch_size=14)
    base["tasks"] = {f"task{i:02d}": {**heads[i % len(heads)], "path": "S" * 16 + "T" * 16} for i in range(tasks)}
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
            ranks = _spawn(_scale_rank, (raw, placement, steps), T * per_task)
            rows.append({"tasks": T, "per_task": per_task, "world": T * per_task, "placement": placement,
                         **{k: max(r[k] for r in ranks) for k in ("params", "param_bytes", "optimizer_bytes",
                                                                  "sent_bytes")}})
    for row in rows:
        floor = next(r for r in rows if r["tasks"] == row["tasks"] and r["placement"] == "plain")
        row["ratio"] = {k: row[k] / floor[k] for k in ("param_bytes", "optimizer_bytes", "sent_bytes")}
    projected = {name: _projection(c, per_task_projected) for name, c in (projections or {}).items()}
    return {"zero_stage": zero, "model": {"depth": cfg.model.depth, "embed_dim": cfg.model.embed_dim},
            "rows": rows, "projected": projected, "target": 1.1}


def _spawn(fn, args: tuple, world: int) -> list[dict]:
    import json
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        port = 29300 + os.getpid() % 300
        mp.start_processes(fn, args=(world, port, *args, out), nprocs=world, start_method="spawn")
        return [json.loads(open(f"{out}/rank{r}.json").read()) for r in range(world)]


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


def _checkpoint_rank(rank: int, world: int, port: int, raw: dict, directory: str, out: str) -> None:
    """Write a real training checkpoint of a freshly built engine (no data, no step)."""

    _join(rank, world, port)
    from ufo.checkpoint import save_training_checkpoint
    from ufo.config import config_from_dict
    from ufo.layout import init_distributed, leave_distributed, make_layout
    from ufo.train import build_engine, checkpoint_meta

    init_distributed()
    cfg = config_from_dict(raw, "bench")
    layout = make_layout(cfg, world)
    engine, _, _, names = build_engine(cfg, layout, rank, say=lambda _: None)
    save_training_checkpoint(engine, Path(directory), 0, checkpoint_meta(cfg, layout, names), {}, rank, keep=1)
    with open(f"{out}/rank{rank}.json", "w") as f:
        f.write("{}")
    leave_distributed()


_EXPORT_PEAK = """
import json, resource, sys
import ufo.export, ufo.checkpoint, ufo.layout
ufo.layout.import_deepspeed()
import deepspeed.runtime.fp16.loss_scaler, deepspeed.runtime.zero.config, deepspeed.utils.tensor_fragment
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
base = rss()
r = ufo.export.export_subnet(sys.argv[1], sys.argv[2], sys.argv[3], formats=["safetensors"], log=lambda _: None)
print(json.dumps({"baseline": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "subnet_params": r.param_count, "diff": r.max_abs_diff["safetensors"]}))
"""


def bench_export(cfg: UfoConfig, task: str | None = None, world: int | None = None, zero: int = 1) -> dict[str, Any]:
    """Peak RSS of exporting one task (safetensors, verified) from a task-sharded and from a
    replicated checkpoint of the same config (fp32, ZeRO `zero`, one rank per task by default),
    above the interpreter's baseline with ufo, torch, timm and deepspeed imported."""
    import json
    import subprocess
    import sys
    import tempfile

    task = task or next(iter(cfg.tasks))
    world = world or len(cfg.tasks)
    result: dict[str, Any] = {"task": task, "world": world, "zero_stage": zero, "placements": {}, "target": 2.0}
    with tempfile.TemporaryDirectory() as tmp:
        for placement in ("task_sharded", "replicated"):
            raw = cfg.to_dict()
            raw["train"].update(layout="task_parallel", placement=placement)
            raw["deepspeed"].update(zero_stage=zero, precision="fp32")
            directory = Path(tmp) / placement
            _spawn(_checkpoint_rank, (raw, str(directory)), world)
            files = sum(f.stat().st_size for f in next(directory.glob("step*")).iterdir())
            run = subprocess.run([sys.executable, "-c", _EXPORT_PEAK, str(directory), task,
                                  str(Path(tmp) / f"{placement}-subnet")], capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"export from the {placement} checkpoint failed: {run.stderr.strip()[-2000:]}")
            got = json.loads(run.stdout.strip().splitlines()[-1])
            subnet = 4 * got["subnet_params"]
            result["placements"][placement] = {**got, "checkpoint_bytes": files, "subnet_bytes": subnet,
                                               "above_baseline": got["peak"] - got["baseline"],
                                               "ratio": (got["peak"] - got["baseline"]) / subnet}
    return result


def format_export_bench(r: dict[str, Any]) -> str:
    gib = 2 ** 30
    lines = [f"ufo bench export: task {r['task']}, checkpoints of {r['world']} ranks, ZeRO {r['zero_stage']}, fp32; "
             f"peak RSS above the interpreter's baseline, against the subnet's fp32 size (target <= "
             f"{r['target']:g}x)"]
    for placement, p in r["placements"].items():
        verdict = "meets" if p["ratio"] <= r["target"] else "MISSES"
        lines.append(f"  {placement:<13} checkpoint {p['checkpoint_bytes'] / gib:6.2f} GiB  subnet "
                     f"{p['subnet_bytes'] / gib:5.2f} GiB  baseline {p['baseline'] / gib:5.2f} GiB  peak "
                     f"{p['peak'] / gib:5.2f} GiB  above {p['above_baseline'] / gib:5.2f} GiB = {p['ratio']:.2f}x "
                     f"({verdict})")
    return "\n".join(lines)


UFO_SETTINGS = ("alone", "hard", "fixed", "sample", "learned", "learned_both")
UFO_LABELS = {"alone": "task alone (plain ViT)", "hard": "hard sharing (all S)", "fixed": "UFO, fixed paths",
              "sample": "UFO, sample (one-shot)", "learned": "UFO, learned paths",
              "learned_both": "learned, both FFNs always"}


def ufo_settings(cfg: UfoConfig, steps: int, out: Path, settings: Sequence[str] = UFO_SETTINGS,
                 uri: str | None = None) -> dict[str, dict]:
    """The runs of `ufo bench ufo`: run name -> a plain ufo config (same data, steps, model, seed).
    `alone-<task>`: the task by itself on a path of FFN-shared only (a plain ViT of its subnet's
    size); `hard`: every task on the all-shared path; `fixed`: the configured paths; `sample`:
    one-shot paths, evaluated on the configured ones; `learned`: `train.path_policy: learned`;
    `learned_both`: the same, never deciding (both FFNs of every block always run, as VIMER-UFO)."""
    base = cfg.to_dict()
    depth = cfg.model.depth
    base["train"].update(steps=steps, warmup_steps=min(base["train"]["warmup_steps"], steps // 2), eval_every=0,
                         checkpoint_every=0)
    runs: dict[str, dict] = {}

    def run(name: str, change) -> None:
        raw = copy.deepcopy(base)
        raw["train"]["out_dir"] = str(out / name)
        raw["tracking"].update(enabled=True, run_name=name, experiment=f"ufo-bench-{out.name}",
                               **({"uri": uri} if uri else {}))
        change(raw)
        runs[name] = raw

    for name in settings:
        if name == "alone":
            for task in cfg.tasks:
                def alone(raw, task=task):
                    raw["tasks"] = {task: {**raw["tasks"][task], "path": "S" * depth, "ranks": None}}
                    raw["model"]["ffns"] = "auto"
                run(f"alone-{task}", alone)
        elif name == "hard":
            def hard(raw):
                for tc in raw["tasks"].values():
                    tc["path"] = "S" * depth
                raw["train"]["path_policy"], raw["model"]["ffns"] = "fixed", "auto"
            run(name, hard)
        elif name == "fixed":
            run(name, lambda raw: raw["train"].update(path_policy="fixed"))
        elif name == "sample":
            run(name, lambda raw: raw["train"].update(path_policy="sample"))
        elif name == "learned":
            run(name, lambda raw: raw["train"].update(path_policy="learned"))
        elif name == "learned_both":
            def both(raw):
                raw["train"]["path_policy"] = "learned"
                raw["train"]["path"]["decide_after"] = steps + 1
            run(name, both)
        else:
            raise ConfigError(f"--settings: unknown {name} (known: {', '.join(UFO_SETTINGS)})")
    return runs


def bench_ufo(cfg: UfoConfig, steps: int, out: Path, settings: Sequence[str] = UFO_SETTINGS,
              launcher: str | None = None, overwrite: bool = False, log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """UFO's headline comparison on any config: every task trained alone, with hard sharing, with
    fixed, sampled and learned paths (and learned with both FFNs always, for the cost), each a plain
    `ufo train` run (in this process, or under `launcher`, e.g. "torchrun --nproc_per_node 8"),
    each task then measured by its protocol on the path the run trained toward (`ufo eval`'s code).
    Writes OUT/ufo.json, OUT/ufo.png and one MLflow run per setting plus a summary run."""
    import subprocess
    import sys

    import yaml

    from ufo.config import config_from_dict
    from ufo.evaluate import eval_target
    from ufo.tracking import tracking_uri

    out = out.resolve()
    uri = tracking_uri(cfg, out)  # the config's store, else MLFLOW_TRACKING_URI, else OUT/mlflow.db
    runs = ufo_settings(cfg, steps, out, settings, uri=uri)
    _fresh_runs(out, list(runs), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"steps": steps, "tasks": list(cfg.tasks), "settings": {}, "launcher": launcher,
                              "metrics": {t: primary_key(cfg, t) for t in cfg.tasks}}
    for name, raw in runs.items():
        run_cfg = config_from_dict(raw, f"bench ufo ({name})")
        log(f"== {name}: " + ", ".join(f"{t} {run_cfg.train.path_policy if run_cfg.train.path_policy != 'fixed' else p}"
                                       for t, p in ((t, run_cfg.path_of(t)) for t in run_cfg.tasks)))
        start = time.perf_counter()
        if launcher:
            config = out / f"{name}.yaml"
            config.write_text(yaml.safe_dump(raw, sort_keys=False))
            args = launcher.split() + ["-m", "ufo.cli", "train", str(config)]
            if args[0] in ("torchrun", "deepspeed"):
                args[0] = str(Path(sys.executable).with_name(args[0]))
            done = subprocess.run(args, capture_output=True, text=True)
            if done.returncode != 0:
                raise ConfigError(f"bench ufo: the {name} run failed ({' '.join(args)}): "
                                  + (done.stderr.strip().splitlines() or ["no output"])[-1])
        else:
            from ufo.train import train

            train(run_cfg, log=lambda line: log("   " + line) if line.startswith(("step", "path:", "learned")) else None)
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in (out / name / "history.jsonl").read_text().splitlines() if line]
        rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
        late = rates[len(rates) * 3 // 4:] or rates
        entry: dict[str, Any] = {"s_per_step": seconds / steps, "late_samples_per_s": statistics.mean(late)
                                 if late else None, "tasks": {}}
        for task in run_cfg.tasks:
            report = eval_target(out / name, task, log=lambda _: None)
            entry["tasks"][task] = {"primary": report["primary"], "path": report["path"], "metrics": report["metrics"]}
        if run_cfg.train.path_policy == "learned":
            marker = json.loads(next(iter(sorted((out / name / "checkpoints").glob("step*/ufo.json")))).read_text())
            entry["open_blocks"] = {t: p.count("?") for t, p in marker["path_policy"]["decided"].items()}
        log("   " + "  ".join(f"{t} {v['primary']:.4f} ({v['path']})" for t, v in entry["tasks"].items()))
        result["settings"][name] = entry
    result["table"] = _ufo_table(result)
    (out / "ufo.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_ufo(result, UFO_LABELS, out / "ufo.png")
    _log_ufo(cfg, result, out, uri)
    return result


def _ufo_table(r: dict[str, Any]) -> dict[str, dict[str, float]]:
    """setting -> task -> the task's headline metric (the `alone` column from each task's own run)."""
    table: dict[str, dict[str, float]] = {}
    for name, entry in r["settings"].items():
        setting = "alone" if name.startswith("alone-") else name
        for task, v in entry["tasks"].items():
            table.setdefault(setting, {})[task] = v["primary"]
    return table


def _log_ufo(cfg: UfoConfig, r: dict[str, Any], out: Path, uri: str) -> None:
    """The comparison as one MLflow run beside the settings' runs: each cell a metric, the JSON and PNG."""
    from ufo.tracking import Tracker, metric_name

    tracking = cfg.tracking.model_copy(update={"enabled": True, "uri": uri, "run_name": "bench-ufo",
                                               "experiment": f"ufo-bench-{out.name}", "system_metrics_every": 0})
    tracker = Tracker(cfg.model_copy(update={"tracking": tracking}), out, say=lambda _: None,
                      params={"steps": r["steps"], "settings": ",".join(r["settings"])})
    tracker.log_metrics(r["steps"], {metric_name(f"{s}/{t}/{r['metrics'][t]}"): v
                                     for s, row in r["table"].items() for t, v in row.items()}
                        | {f"{name}/s_per_step": e["s_per_step"] for name, e in r["settings"].items()})
    for file in ("ufo.json", "ufo.png"):
        tracker.log_artifact(out / file)
    tracker.close()


def format_ufo_bench(r: dict[str, Any]) -> str:
    tasks, table = r["tasks"], r["table"]
    settings = [s for s in UFO_SETTINGS if s in table]
    lines = [f"ufo bench ufo: {r['steps']} steps per run; each task by its protocol's headline metric",
             f"  {'setting':<28}" + "".join(f"{t + ' ' + r['metrics'][t]:>20}" for t in tasks) + f"{'s/step':>9}"]
    for s in settings:
        runs = [e for n, e in r["settings"].items() if n == s or (s == "alone" and n.startswith("alone-"))]
        seconds = statistics.mean(e["s_per_step"] for e in runs)
        lines.append(f"  {UFO_LABELS[s]:<28}" + "".join(f"{table[s].get(t, float('nan')):>20.4f}" for t in tasks)
                     + f"{seconds:>9.3f}")
    for name in ("learned", "learned_both"):
        e = r["settings"].get(name)
        if e:
            paths = " ".join(f"{t}={v['path']}" for t, v in e["tasks"].items())
            lines.append(f"  {name}: paths {paths}; open blocks at the end {e.get('open_blocks')}; "
                         f"late samples/s {e['late_samples_per_s']:.0f}")
    if "learned" in r["settings"] and "learned_both" in r["settings"]:
        a, b = r["settings"]["learned"]["late_samples_per_s"], r["settings"]["learned_both"]["late_samples_per_s"]
        lines.append(f"  once settled, a learned step runs at {a / b:.2f}x the samples/s of both FFNs always")
    return "\n".join(lines)
