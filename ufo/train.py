"""The DeepSpeed training loop of the supernet: `train(cfg)`.

Built in order: process group and layout, data, model, engine. Then one loop: batch -> forward
-> per-task losses -> weights -> backward -> step -> log -> maybe eval -> maybe checkpoint.

Gradient semantics (DESIGN.md): every rank passes a slice of every task to the model, empty for
the tasks it does not serve, so every rank calls the same modules in the same order (what ZeRO-3
requires) and every parameter gets a gradient, zero where unused. Rank r's loss is
`W * sum_t w_t * (sum of task t's sample losses on r) / N_t`, N_t the step's task t samples over
all ranks: DeepSpeed's average over the W ranks then gives every parameter the gradient of
`sum_t w_t * mean_t loss` over the global batch, exactly what one process would compute.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import ufo
from ufo.checkpoint import (
    find_training_checkpoint,
    init_supernet,
    load_supernet,
    read_checkpoint,
    read_rank_state,
    save_training_checkpoint,
)
from ufo.config import UfoConfig
from ufo.data import MixedLoader, endless, task_loader
from ufo.errors import ConfigError, UfoError
from ufo.layout import Layout, import_deepspeed, init_distributed, make_layout
from ufo.metrics import retrieval, top1
from ufo.model import SupernetViT, TaskSlice
from ufo.model.paths import PathPolicy

Log = Callable[[str], None]


@dataclass
class TrainResult:
    step: int
    stopped_by: str | None  # the signal that stopped the run early, after its checkpoint
    checkpoint: Path | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    engine: Any = None  # the DeepSpeed engine, for callers that go on with it (tests, notebooks)


def deepspeed_config(cfg: UfoConfig) -> dict[str, Any]:
    """The DeepSpeed config ufo builds from the run's config; `deepspeed.overrides` merged last."""
    t, d = cfg.train, cfg.deepspeed
    if d.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("deepspeed.precision: fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16", "loss_scale": 0},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(config, d.overrides)


def lr_schedule(cfg: UfoConfig) -> Callable[[int], float]:
    """The lr factor at optimizer step s: linear warmup from lr/warmup_steps, then cosine to min_lr_ratio.

    (DeepSpeed's WarmupCosineLR spends the first step at lr 0; torch's LambdaLR with this does not.)
    """
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def param_groups(model: SupernetViT, cfg: UfoConfig) -> list[dict]:
    """Optimizer groups: no weight decay on norms, biases and embeddings; optional layer-wise lr decay."""
    t, depth = cfg.train, len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        no_decay = param.ndim <= 1 or name in ("pos_embed", "cls_token")
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        scale = t.layer_decay ** (depth + 1 - layer) if t.layer_decay else 1.0
        key = (layer if t.layer_decay else 0, no_decay)
        group = groups.setdefault(key, {"params": [], "lr": t.lr * scale,
                                        "weight_decay": 0.0 if no_decay else t.weight_decay})
        group["params"].append(param)
    return list(groups.values())


class _Signals:
    """SIGTERM and SIGUSR1 (Slurm's warning before preemption) ask for a checkpoint and a clean stop."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def train(cfg: UfoConfig, log: Log = print) -> TrainResult:
    """Train the supernet of `cfg` on this process's rank; resume from `train.out_dir` if it holds a checkpoint."""
    rank, world, _ = init_distributed()
    say = log if rank == 0 else (lambda _: None)
    deepspeed = import_deepspeed()
    t = cfg.train
    tasks = list(cfg.tasks)
    out = Path(t.out_dir)
    ckpt_dir = out / "checkpoints"

    layout = make_layout(cfg, world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    say(f"ufo {ufo.__version__} train: {world} rank{'s' if world > 1 else ''}, "
        f"ZeRO {cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}, out {out}")
    say(layout.describe())

    loader = _make_loader(cfg, layout, rank)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = load_supernet(read_checkpoint(t.init)) if t.init else init_supernet(cfg)
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups(model, cfg), lr=t.lr, momentum=t.momentum)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr, betas=t.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg))
    policy = PathPolicy(t.path_policy, {task: cfg.path_of(task) for task in tasks}, t.seed, t.path_sample_p)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    device = engine.device

    step = 0
    torch.manual_seed(t.seed + 1 + rank)  # drop path and the like differ between ranks
    resume = find_training_checkpoint(ckpt_dir)
    if resume is not None:
        step = _resume(engine, loader, resume, cfg, world, rank)
        say(f"resumed from {resume} at step {step}")
    if step >= t.steps:
        say(f"already trained {step} of {t.steps} steps")

    m = cfg.model
    weights = torch.tensor([cfg.tasks[task].weight for task in tasks], dtype=torch.float64)
    batches = endless(loader)
    meter = _Meter(tasks)
    result = TrainResult(step, None, resume, engine=engine)
    start_step, started = step, time.perf_counter()
    with _Signals() as signals:
        while step < t.steps:
            paths = policy.paths_at(step)
            for _ in range(t.gradient_accumulation_steps):
                batch = next(batches)
                slices = _slices(batch, tasks, paths, layout)
                images = batch["images"]
                if images.ndim != 4:  # every sample of this batch was bad
                    images = torch.zeros(0, m.in_chans, m.img_size, m.img_size)
                images = images.to(device=device, dtype=dtype)
                labels = batch["labels"].to(device)
                sums, counts = micro_step(engine, images, labels, slices, weights, world)
                meter.add(sums, counts)
            step += 1
            stop = torch.tensor([signals.received or 0])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # any rank's signal stops every rank
            if step % t.log_every == 0 or step == t.steps:
                losses = meter.take()
                say(_progress(step, t.steps, losses, meter.rate, scheduler, paths, policy.name,
                              eta=(time.perf_counter() - started) / (step - start_step) * (t.steps - step),
                              tokens=(m.img_size // m.patch_size) ** 2 + 1))
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                result.metrics = evaluate(engine, cfg, layout, rank, policy.paths_at(step), dtype, say)
            final = step == t.steps or stop.item()
            if final or (t.checkpoint_every and step % t.checkpoint_every == 0):
                state = {"step": step, "data": loader.state_dict(), "rng": _rng_state()}
                meta = {"config": cfg.to_dict(), "zero_stage": cfg.deepspeed.zero_stage,
                        "precision": cfg.deepspeed.precision, "world_size": world, "layout": layout.kind,
                        "path_policy": policy.state_dict()}
                result.checkpoint = save_training_checkpoint(engine, ckpt_dir, step, meta, state, rank,
                                                             t.keep_checkpoints)
                say(f"checkpoint {result.checkpoint}")
            if stop.item():
                name = signal.Signals(int(stop.item())).name
                say(f"stopped by {name} at step {step}; rerun the same command to resume")
                result.step, result.stopped_by = step, name
                return result
    result.step = step
    if t.steps > 0:
        result.metrics = evaluate(engine, cfg, layout, rank, policy.paths_at(max(step - 1, 0)), dtype, say)
        if rank == 0:
            (out / "metrics.json").write_text(json.dumps({"step": step, "eval": result.metrics}, indent=2) + "\n")
    return result


def micro_step(engine, images: torch.Tensor, labels: torch.Tensor, slices: list[TaskSlice],
               weights: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, task-weighted loss, backward and (at the accumulation boundary) step.

    Returns each task's summed sample loss on this rank and each task's sample count over all ranks.
    """
    counts = torch.tensor([s.size for s in slices], dtype=torch.float64)
    dist.all_reduce(counts)  # N_t: task t's samples in this micro-step, all ranks
    sums = engine(images, slices, labels, reduction="sum")
    scale = torch.where(counts > 0, world * weights / counts.clamp_min(1), 0.0)
    engine.backward(sum(float(c) * s.float() for c, s in zip(scale, sums)))
    engine.step()
    return torch.stack([s.detach().double().cpu() for s in sums]), counts


def _make_loader(cfg: UfoConfig, layout: Layout, rank: int):
    if layout.kind == "mixed":
        return MixedLoader({task: task_loader(cfg, task, rank_in_group=rank, group_size=layout.world_size)
                            for task in cfg.tasks})
    (task,) = layout.tasks_of(rank)
    return task_loader(cfg, task, rank_in_group=layout.rank_in_group(task, rank),
                       group_size=layout.group_size(task))


def _slices(batch: dict, tasks: list[str], paths: dict[str, str], layout: Layout) -> list[TaskSlice]:
    """A slice of every task, in config order; empty for the tasks this batch does not hold."""
    sizes = dict(batch["slices"]) if "slices" in batch else {batch["task"]: len(batch["labels"])}
    return [TaskSlice(task, paths[task], sizes.get(task, 0)) for task in tasks]


def _resume(engine, loader, tag_dir: Path, cfg: UfoConfig, world: int, rank: int) -> int:
    marker = json.loads((tag_dir / "ufo.json").read_text())
    if marker["world_size"] != world:
        raise UfoError(f"{tag_dir}: was written by {marker['world_size']} ranks, this run has {world}; "
                       "resume with the same number of ranks (or export it and start a new run from it)")
    engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True)
    state = read_rank_state(tag_dir, rank)
    loader.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    return int(state["step"])


class _Meter:
    """Per-task loss sums and counts since the last progress line (all ranks' totals)."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        self.sums = torch.zeros(len(tasks), dtype=torch.float64)
        self.counts = torch.zeros(len(tasks), dtype=torch.float64)
        self.since, self.rate = time.perf_counter(), 0.0

    def add(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.sums += sums
        self.counts += counts

    def take(self) -> dict[str, float]:
        dist.all_reduce(self.sums)
        now = time.perf_counter()
        self.rate = float(self.counts.sum()) / max(now - self.since, 1e-9)
        losses = {t: float(s / c) for t, s, c in zip(self.tasks, self.sums, self.counts) if c > 0}
        self.sums.zero_()
        self.counts.zero_()
        self.since = now
        return losses


def _progress(step: int, steps: int, losses: dict[str, float], rate: float, scheduler, paths: dict[str, str],
              policy: str, eta: float, tokens: int) -> str:
    lr = scheduler.get_last_lr()[0] if scheduler is not None else float("nan")
    parts = [f"step {step}/{steps}",
             "loss " + " ".join(f"{t} {v:.3f}" for t, v in losses.items()),
             f"{rate:.0f} samples/s {rate * tokens / 1000:.0f}k tokens/s",
             f"lr {lr:.2e}", f"eta {_duration(eta)}"]
    if policy == "sample":
        parts.append("paths " + " ".join(f"{t}={p}" for t, p in paths.items()))
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@torch.no_grad()
def evaluate(engine, cfg: UfoConfig, layout: Layout, rank: int, paths: dict[str, str], dtype: torch.dtype,
             say: Log = print) -> dict[str, dict[str, float]]:
    """Each task on its eval shards and path: top-1 (classification), Recall@1 and mAP (retrieval).

    Every rank reads its share of every task's eval set (the same number of batches on each) and
    calls the model with a slice of every task, as in training, so ZeRO-3 can gather parameters.
    """
    world, tasks, m = layout.world_size, list(cfg.tasks), cfg.model
    module = engine.module
    was_training = module.training
    module.eval()
    results = {}
    for task in tasks:
        if cfg.tasks[task].eval_shards is None:
            continue
        loader = task_loader(cfg, task, rank_in_group=rank, group_size=world, train=False,
                             batch_size=cfg.train.eval_batch_size)
        outputs, labels = [], []
        for batch in loader:
            images = batch["images"]
            if images.ndim != 4:
                images = torch.zeros(0, m.in_chans, m.img_size, m.img_size)
            slices = [TaskSlice(t, paths[t], len(batch["labels"]) if t == task else 0) for t in tasks]
            out = module(images.to(engine.device, dtype=dtype), slices)[tasks.index(task)]
            outputs.append(out.float().cpu())
            labels.append(batch["labels"])
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (torch.cat(outputs), torch.cat(labels)))
        out = torch.cat([o for o, _ in gathered])
        y = torch.cat([lab for _, lab in gathered])
        if cfg.tasks[task].kind == "classification":
            results[task] = {"top1": top1(out, y), "samples": len(y)}
        else:
            results[task] = {**retrieval(out, y), "samples": len(y)}
    module.train(was_training)
    if results:
        say("eval: " + " | ".join(f"{task} " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items()) for task, r in results.items()))
    return results
