"""The DeepSpeed training loop of the supernet: `train(cfg)`.

Built in order: process group and layout, data, model, engine, weighting. Then one loop: batch ->
forward -> per-task losses -> weights -> backward -> step -> log -> maybe eval -> maybe checkpoint.

Gradient semantics (DESIGN.md): under replicated placement every rank passes a slice of every
task to the model, empty for the tasks it does not serve, so every rank calls the same modules in
the same order (what ZeRO-3 requires) and every parameter gets a gradient, zero where unused;
under task_sharded a rank holds and calls its own task only, whose gradients DeepSpeed reduces
among that task's ranks (`ufo/placement.py`). Rank r's loss is
`W * sum_t w_t * (sum of task t's sample losses on r) / N_t`, N_t the step's task t samples over
all ranks: DeepSpeed's average over the W ranks then gives every parameter the gradient of
`sum_t w_t * mean_t loss` over the global batch, exactly what one process would compute. The
weights w_t come from `ufo.weighting`, fed with every task's mean loss over all ranks (one
all-reduce of a few scalars per micro-step), so every rank uses the same weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import ufo
from ufo.atomic import atomic_file
from ufo.checkpoint import (
    canonical_name,
    _marker,
    check_step_files,
    clean_checkpoints,
    find_training_checkpoint,
    init_supernet,
    load_supernet,
    read_checkpoint,
    read_rank_state,
    save_training_checkpoint,
)
from ufo.config import UfoConfig
from ufo.data import MixedLoader, endless, label_counts, task_loader
from ufo.data.shards import check_task_data
from ufo.errors import ConfigError, UfoError
from ufo.evaluate import evaluate_task
from ufo.layout import Layout, import_deepspeed, init_distributed, make_layout, task_groups
from ufo.model import SupernetViT, TaskSlice
from ufo.model.supernet import apply_heads
from ufo.model.paths import OPEN, ElasticPolicy, PathPolicy
from ufo.plots import plot_history, plot_paths
from ufo.supervise import Stop, report_stopped
from ufo.tracking import Tracker, flatten
from ufo.weighting import Observation, Weighting, build_weighting, label_entropy

Log = Callable[[str], None]


@dataclass
class TrainResult:
    step: int
    stopped_by: str | None  # the signal that stopped the run early, after its checkpoint
    checkpoint: Path | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    engine: Any = None  # the DeepSpeed engine, for callers that go on with it (tests, notebooks)
    weighting: Weighting | None = None
    history: list[dict] = field(default_factory=list)  # this process's per-step records (history.jsonl)


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
    if d.zero_stage == 3:  # buckets sized to the model (the usual recipe), not DeepSpeed's 5e8-element defaults
        h = cfg.model.embed_dim
        # gathered parameters released after use (DeepSpeed's 1e9-element reuse distance and live limit
        # keep every gathered parameter until backward), and the optimizer stepped in sub-groups of
        # 16 width^2 elements: with the 1e9 default one rank's whole partition is one sub-group, and the
        # step's fp32 gradient copy and Adam's temporaries are each as large as the partition
        config["zero_optimization"].update(reduce_bucket_size=h * h, stage3_prefetch_bucket_size=int(0.9 * h * h),
                                           stage3_param_persistence_threshold=10 * h,
                                           stage3_max_live_parameters=16 * h * h, stage3_max_reuse_distance=h * h,
                                           sub_group_size=16 * h * h)
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
    """Optimizer groups: no weight decay on norms, biases and embeddings; optional layer-wise lr decay;
    FFN-shared at `train.shared_ffn_lr_scale` and each task's FFN-task at its `ffn_lr_scale` of the
    lr; learned path logits at `train.path.lr` and `train.path.weight_decay`."""
    t, depth = cfg.train, len(model.blocks)
    groups: dict[tuple, dict] = {}
    for raw_name, param in model.named_parameters():
        name = canonical_name(raw_name)
        ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition's own shape is flat
        if name.startswith("path_logits."):
            group = groups.setdefault(("path",), {"params": [], "lr": t.path.lr, "weight_decay": t.path.weight_decay})
            group["params"].append(param)
            continue
        no_decay = ndim <= 1 or name in ("pos_embed", "cls_token")
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        scale = t.layer_decay ** (depth + 1 - layer) if t.layer_decay else 1.0
        parts = name.split(".")
        if len(parts) > 3 and parts[2] == "mlp" and parts[3] == "shared":
            ffn = t.shared_ffn_lr_scale
        elif len(parts) > 4 and parts[2] == "mlp" and parts[3] == "task":
            ffn = cfg.tasks[parts[4]].ffn_lr_scale
        else:
            ffn = 1.0
        key = (layer if t.layer_decay else 0, no_decay, ffn)
        group = groups.setdefault(key, {"params": [], "lr": t.lr * scale * ffn,
                                        "weight_decay": 0.0 if no_decay else t.weight_decay})
        group["params"].append(param)
    return list(groups.values())


def build_engine(cfg: UfoConfig, layout: Layout, rank: int, say: Log = print) -> tuple[Any, Any, Any, list]:
    """This rank's supernet (the tasks it holds), optimizer, lr schedule and DeepSpeed engine.

    Returns (engine, scheduler, clip, group_names): `clip` is ufo's own gradient clipping for the
    loop to call between backward and step where the engine's is wrong (task_sharded under
    ZeRO-0), else None; `group_names` the supernet names of each optimizer group's parameters, in
    order (checkpoints record them: DeepSpeed's bf16 ZeRO-0 masters are stored by position only).
    """
    deepspeed = import_deepspeed()
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    held = layout.held(rank)
    ds_config = deepspeed_config(cfg)
    if t.init:
        model = load_supernet(read_checkpoint(t.init, tasks=held), held, config=cfg)
    elif cfg.deepspeed.zero_stage == 3:  # each module partitioned as it is built: no rank ever holds it all
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = init_supernet(cfg, held=held, gather=lambda params: deepspeed.zero.GatheredParameters(
                params, modifier_rank=0))
    else:
        model = init_supernet(cfg, held=held)
    clip = None
    if layout.placement == "task_sharded":
        from ufo import placement

        model = placement.shard_model(model, layout)
    groups = param_groups(model, cfg)
    if layout.placement == "task_sharded":
        groups = placement.optimizer_groups(groups)
        ds_config, clip = placement.engine_config(ds_config, model, layout, t.gradient_clipping)
        say(f"task_sharded: rank {rank} holds {sum(p.numel() for p in model.parameters()):,} parameters "
            f"(shared + {', '.join(held)})")
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    name_of = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    group_names = [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    return engine, scheduler, clip, group_names


def checkpoint_meta(cfg: UfoConfig, layout: Layout, group_names: list) -> dict:
    """What a checkpoint's marker says of the run that wrote it, for resuming and reading it."""
    d = cfg.deepspeed
    return {"config": cfg.to_dict(), "zero_stage": d.zero_stage, "precision": d.precision,
            "world_size": layout.world_size, "layout": layout.kind, "placement": layout.placement,
            "layout_groups": layout.groups,
            "param_group_names": group_names if d.zero_stage == 0 and d.precision != "fp32" else None}


def _rng_state() -> dict:
    """The generators' states as tensors and plain values (what a weights-only load reads back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def train(cfg: UfoConfig, log: Log = print) -> TrainResult:
    """Train the supernet of `cfg` on this process's rank; resume from `train.out_dir` if it holds a checkpoint."""
    first = os.environ.get("RANK", "0") == "0"
    # every shard pattern is checked before anything starts: not found at the first eval, hours later
    check_task_data(cfg, warn=(lambda line: log(f"warning: {line}")) if first else (lambda _: None))
    rank, world, _ = init_distributed(cfg.train.collective_timeout)
    say = log if rank == 0 else (lambda _: None)
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
    engine, scheduler, clip, group_names = build_engine(cfg, layout, rank, say)
    held = layout.held(rank)
    policy = PathPolicy(t.path_policy, {task: cfg.path_of(task) for task in tasks}, t.seed, t.path_sample_p,
                        steps=t.steps, temperature=(t.path.temperature.start, t.path.temperature.end),
                        decide_after=t.path.decide_after, confidence=t.path.confidence)
    elastic = _elastic_policy(cfg)
    weighting = _make_weighting(cfg, say)
    say(f"loss weighting: {weighting.name}")
    features = _capture_features(engine.module) if weighting.needs_grad_norms else None
    cost = t.path.task_block_cost if t.path_policy == "learned" else 0.0
    # a task's path cost, added on each rank that holds its logits: the ranks' gradients average to it
    path_cost = {task: cost * world / (layout.group_size(task) if layout.placement == "task_sharded" else world)
                 for task in held} if cost else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    device = engine.device

    step = 0
    torch.manual_seed(t.seed + 1 + rank)  # drop path and the like differ between ranks
    if rank == 0:  # what a save that died left behind
        clean_checkpoints(ckpt_dir, say)
    dist.barrier()
    resume = find_training_checkpoint(ckpt_dir, say=lambda line: say(f"warning: {line}"))
    if resume is not None:
        step = _resume(engine, loader, weighting, resume, cfg, layout, rank, say)
        policy.load_state_dict(_marker(resume).get("path_policy") or {})
        say(f"resumed from {resume} at step {step}")
    if step >= t.steps:
        say(f"already trained {step} of {t.steps} steps")

    m = cfg.model
    tokens = (m.img_size // m.patch_size) ** 2 + 1
    batches = endless(loader)
    history = _History(out / "history.jsonl", step, write=rank == 0)
    result = TrainResult(step, None, resume, engine=engine, weighting=weighting, history=history.records)
    tracker = _open_tracker(cfg, out, resume, layout, weighting, say) if rank == 0 and cfg.tracking.enabled else None
    meter = _Meter(tasks)
    skipped = Counter()  # micro-batches with no sample on any rank, skipped by every rank alike
    start_step, started = step, time.perf_counter()
    status = "FAILED"
    try:
        with Stop() as signals:
            while step < t.steps:
                paths, sizes, gates = policy.paths_at(step), elastic.sizes_at(step), policy.gates_at(step)
                seen = _StepMean(len(tasks))
                for _ in range(t.gradient_accumulation_steps):
                    batch, slices, counts = _next_batch(batches, held, paths, sizes, tasks, device, skipped, gates)
                    images = batch["images"]
                    if images.ndim != 4:  # every sample of this batch was bad
                        images = torch.zeros(0, m.in_chans, m.img_size, m.img_size)
                    images = images.to(device=device, dtype=dtype)
                    labels = batch["labels"].to(device)
                    obs, weights, counts = micro_step(engine, images, labels, slices, weighting, world, features,
                                                      tasks, clip, counts, path_cost)
                    seen.add(obs, counts)
                    meter.add(obs, counts)
                step_obs = seen.mean()
                weighting.step(step_obs)
                step += 1
                if policy.name == "learned":
                    for task, block, letter, p in policy.observe(step, path_probs(engine.module, layout, rank,
                                                                                   tasks, device)):
                        say(f"path: task {task} block {block} decided {letter} (p {p:.3f}) at step {step}: "
                            f"from now on only its {'FFN-task' if letter == 'T' else 'FFN-shared'} runs there")
                record = history.record(step, step_obs, weights, weighting, scheduler, tasks)
                if sizes:  # the elastic size each task trained at this step
                    record["elastic_depth"] = {task: d or m.depth for task, (d, _) in sizes.items()}
                    record["elastic_hidden"] = {task: h or elastic.full[1] for task, (_, h) in sizes.items()}
                if policy.name == "sample":  # the path each task trained on this step
                    record["path"] = dict(paths)
                    record["task_blocks"] = {task: path.count("T") for task, path in paths.items()}
                if policy.name == "learned" and (step % t.log_every == 0 or step == t.steps):
                    record["path"] = policy.best_paths()  # each task's likelier choice per block
                    record["path_open"] = {task: path.count(OPEN) for task, path in policy.decided.items()}
                    record["path_prob"] = {f"{task}/block{i}": p for task, probs in policy.probs.items()
                                           for i, p in enumerate(probs)}  # P(FFN-task)
                # any rank's signal stops every rank
                stop = all_ranks_sum(torch.tensor([signals.received or 0]), device, op=dist.ReduceOp.MAX)
                if step % t.log_every == 0 or step == t.steps:
                    losses = meter.take()
                    say(_progress(step, t.steps, losses, dict(zip(tasks, weights.tolist())), meter.rate, scheduler,
                                  _shown_paths(policy, paths), policy.name,
                                  eta=(time.perf_counter() - started) / (step - start_step) * (t.steps - step),
                                  tokens=tokens))
                    record["samples_per_s"] = meter.rate
                    record["tokens_per_s"] = meter.rate * tokens
                history.append(record)
                if tracker:
                    tracker.log_metrics(step, _metrics_of(record))
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    result.metrics = evaluate(engine, cfg, layout, rank, _eval_paths(policy, step), dtype, say)
                    if tracker:
                        tracker.log_metrics(step, _eval_metrics(result.metrics))
                final = step == t.steps or stop.item()
                if final or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    state = {"step": step, "data": loader.state_dict(), "rng": _rng_state(),
                             "weighting": {"name": weighting.name, "state": weighting.state_dict()},
                             "param_groups": group_names}  # what resuming on other ranks matches by name
                    meta = {**checkpoint_meta(cfg, layout, group_names),
                            "path_policy": policy.state_dict(), "weighting": weighting.name,
                            "mlflow_run_id": tracker.run_id if tracker else None,
                            "mlflow_uri": tracker.uri if tracker else None}
                    result.checkpoint = save_training_checkpoint(engine, ckpt_dir, step, meta, state, rank,
                                                                 t.keep_checkpoints)
                    say(f"checkpoint {result.checkpoint}")
                if stop.item():
                    name = signal.Signals(int(stop.item())).name
                    why = f" ({signals.reason})" if signals.reason and signals.reason != name else ""
                    say(f"stopped by {name}{why} at step {step}; rerun the same command to resume")
                    report_stopped()
                    result.step, result.stopped_by = step, name
                    status = "KILLED"
                    return result
        result.step = step
        history.close()
        if rank == 0 and history.path.is_file():
            plot_history(history.path, out / "weighting.png", title=f"{out.name}: {weighting.name} weighting")
        if policy.name == "learned":
            say("learned paths: " + " ".join(f"{task}={path}" for task, path in policy.best_paths().items()))
            if rank == 0:
                plot_paths(policy, out / "paths.png", title=f"{out.name}: learned paths at step {step}")
            if tracker:
                tracker.set_tags({f"ufo.learned_path.{task}": p for task, p in policy.best_paths().items()})
        bad = bad_data_summary(loader, layout, skipped["empty"], say)
        if t.steps > 0:
            result.metrics = evaluate(engine, cfg, layout, rank, _eval_paths(policy, max(step - 1, 0)), dtype, say)
            if rank == 0:
                (out / "metrics.json").write_text(json.dumps({"step": step, "eval": result.metrics, "bad_data": bad},
                                                             indent=2) + "\n")
            if tracker:
                tracker.log_metrics(step, _eval_metrics(result.metrics))
        if tracker:
            tracker.log_metrics(step, {f"data/bad/{task}/{reason.replace(' ', '_')}": n
                                       for task, reasons in bad["samples"].items() for reason, n in reasons.items()}
                                | {"data/empty_micro_batches": bad["empty_micro_batches"]})
        status = "FINISHED"
        return result
    finally:
        history.close()
        if tracker:
            for name in ("history.jsonl", "weighting.png", "paths.png", "metrics.json"):
                if (out / name).is_file():
                    tracker.log_artifact(out / name)
            tracker.close(status)


def _open_tracker(cfg: UfoConfig, out: Path, resume: Path | None, layout: Layout, weighting: Weighting,
                  say: Log) -> Tracker:
    """Rank 0's MLflow run: a resumed training run continues the run its checkpoint names."""
    run_id = json.loads((resume / "ufo.json").read_text()).get("mlflow_run_id") if resume else None
    tracker = Tracker(cfg, out, run_id=run_id, say=say, params=flatten(cfg.to_dict()),
                      artifacts=[out / "config.yaml"])
    tracker.set_tags({"ufo.version": ufo.__version__, "ufo.layout": layout.kind, "ufo.world_size": layout.world_size,
                      "ufo.weighting": weighting.name, "ufo.out_dir": str(out.resolve()),
                      "ufo.path_policy": cfg.train.path_policy,
                      **{f"ufo.path.{task}": cfg.path_of(task) for task in cfg.tasks},
                      **{f"ufo.ranks.{task}": ",".join(map(str, ranks)) for task, ranks in layout.groups.items()}})
    return tracker


def _metrics_of(record: dict) -> dict[str, float | None]:
    """A history record as MLflow metrics: `loss/face`, `weight/face`, `lr`, ..."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{task}": v for task, v in value.items() if not isinstance(v, str)})
        elif key != "step":
            flat[key] = value
    return flat


def _eval_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{k}": float(v) for task, r in results.items() for k, v in r.items()}


def micro_step(engine, images: torch.Tensor, labels: torch.Tensor, slices: list[TaskSlice], weighting: Weighting,
               world: int, features: list | None = None, tasks: list[str] | None = None,
               clip: Callable[[], object] | None = None, counts: torch.Tensor | None = None,
               path_cost: dict[str, float] | None = None) -> tuple[Observation, torch.Tensor, torch.Tensor]:
    """Forward, per-task losses over all ranks, weights, weighted backward and (at the accumulation
    boundary) step.

    `slices` are the tasks this rank holds (all of them, or its own under task_sharded); `tasks`
    all of the run's, in config order (default: the slices'). Returns what the weighting observed
    (identical on every rank), the weights used, and each task's sample count over all ranks.
    `features` collects the pooled features (see `_capture_features`) when the weighting needs
    gradient norms; `clip` clips the reduced gradients before the step (ufo's own clipping).
    `path_cost` (learned paths, `train.path.task_block_cost`): per task, what this rank adds to its
    loss per expected task-specific open block, so that the ranks' gradients average to the cost.
    """
    tasks = tasks or [s.task for s in slices]
    T, device = len(tasks), images.device
    at = torch.tensor([tasks.index(s.task) for s in slices], dtype=torch.long)

    def per_task(values: list) -> torch.Tensor:  # this rank's values of its slices, at their tasks' places
        out = torch.zeros(T, dtype=torch.float64, device=device)
        return out.index_copy(0, at.to(device), torch.stack(values).double().to(device)) if values else out

    # N_t: task t's samples in this micro-step, all ranks (the loop's, where it counted them already)
    if counts is None:
        counts = all_ranks_sum(per_task([torch.tensor(float(s.size)) for s in slices]), device)
    outputs = engine(images, slices, labels, reduction="sum", hits=weighting.needs_accuracy)
    sums = [o[0] for o in outputs] if weighting.needs_accuracy else outputs
    zeros = torch.zeros(T, dtype=torch.float64, device=device)
    hits = per_task([o[1].to(device) for o in outputs]) if weighting.needs_accuracy else zeros
    per_sample = torch.where(counts > 0, 1.0 / counts.clamp_min(1), 0.0)
    grad_sq = per_task(list(_feature_grad_sq(engine.module, features[0], slices, labels, per_sample[at]))) \
        if weighting.needs_grad_norms else zeros
    # one all-reduce of every task's loss sum, hits and squared gradient norm
    seen = all_ranks_sum(torch.cat([per_task([s.detach().to(device) for s in sums]), hits, grad_sq]), device)
    known = counts > 0
    nan = torch.full((T,), math.nan, dtype=torch.float64)
    obs = Observation(
        losses=torch.where(known, seen[:T] * per_sample, nan),
        grad_norms=torch.where(known, seen[2 * T:].sqrt(), nan) if weighting.needs_grad_norms else None,
        accuracies=torch.where(known, seen[T:2 * T] * per_sample, nan) if weighting.needs_accuracy else None)
    weights = weighting.weights(obs)
    scale = torch.where(known, world * weights * per_sample, 0.0)[at]
    loss = sum(float(c) * s.float() for c, s in zip(scale, sums))
    for s in slices if path_cost else ():  # the expected task-specific blocks among the open ones
        if s.gate is not None:
            is_open = torch.tensor([letter == OPEN for letter in s.path], device=device)
            loss = loss + path_cost[s.task] * engine.module.path_probs[s.task][:, 1].masked_select(is_open).sum()
    engine.backward(loss)
    if clip is not None and engine.is_gradient_accumulation_boundary():
        clip()
    engine.step()
    return obs, weights, counts


def _feature_grad_sq(module: SupernetViT, z: torch.Tensor, slices: list[TaskSlice], labels: torch.Tensor,
                     per_sample: torch.Tensor) -> torch.Tensor:
    """This rank's share of ||d L_t / d z||^2 for every task, L_t its mean loss over all ranks.

    The rows of the pooled features z are the samples, so the ranks' squared row gradients add up
    to the global one. The heads run again on a detached z: a backward through them alone, apart
    from the engine's graph (DeepSpeed allows no second backward through its outputs).
    """
    z = z.detach().requires_grad_()
    losses = apply_heads(module.heads, z, slices, labels, reduction="sum")
    local = sum(float(c) * loss.float() for c, loss in zip(per_sample, losses))
    (grad,) = torch.autograd.grad(local, z, allow_unused=True)
    if grad is None:
        return torch.zeros(len(slices), dtype=torch.float64, device=z.device)
    return torch.stack([rows.double().pow(2).sum() for rows in grad.split([s.size for s in slices])])


def all_ranks_sum(values: torch.Tensor, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A small tensor reduced over all ranks on the engine's device (NCCL reduces no CPU tensors), back on the CPU."""
    values = values.to(device)
    dist.all_reduce(values, op=op)
    return values.cpu()


def _capture_features(module: SupernetViT) -> list:
    """Holds the pooled features every head reads (timm's `head_drop` output) of the latest forward."""
    captured: list = [None]
    module.head_drop.register_forward_hook(lambda _, __, out: captured.__setitem__(0, out))
    return captured


def _make_weighting(cfg: UfoConfig, say: Log) -> Weighting:
    entropies = None
    if cfg.train.weighting.name == "prior":
        entropies = {}
        for task, tc in cfg.tasks.items():
            counts = label_counts(tc.shards, task)
            if len(counts) < 2:
                raise UfoError(f"task {task}: its shards hold {len(counts)} label(s); prior weighting needs a "
                               "label distribution with some entropy (use another train.weighting.name)")
            entropies[task] = label_entropy(counts)
        say("prior weighting: label entropy " + " ".join(f"{t} {h:.3f}" for t, h in entropies.items()))
    return build_weighting(cfg, entropies)


class _StepMean:
    """The observations of one optimizer step's micro-steps, averaged (losses and accuracies per sample)."""

    def __init__(self, tasks: int):
        self.loss = torch.zeros(tasks, dtype=torch.float64)
        self.hits = torch.zeros(tasks, dtype=torch.float64)
        self.norms = torch.zeros(tasks, dtype=torch.float64)
        self.counts = torch.zeros(tasks, dtype=torch.float64)
        self.micro = torch.zeros(tasks, dtype=torch.float64)
        self.last: Observation | None = None

    def add(self, obs: Observation, counts: torch.Tensor) -> None:
        known = counts > 0
        self.loss += torch.where(known, obs.losses * counts, 0.0)
        if obs.accuracies is not None:
            self.hits += torch.where(known, obs.accuracies * counts, 0.0)
        if obs.grad_norms is not None:
            self.norms += torch.where(known, obs.grad_norms, 0.0)
        self.counts += counts
        self.micro += known.double()
        self.last = obs

    def mean(self) -> Observation:
        known = self.counts > 0
        nan = torch.full_like(self.counts, math.nan)
        per_sample = torch.where(known, 1.0 / self.counts.clamp_min(1), nan)
        return Observation(
            losses=self.loss * per_sample,
            grad_norms=None if self.last.grad_norms is None else self.norms / self.micro.where(known, nan),
            accuracies=None if self.last.accuracies is None else self.hits * per_sample)


class _History:
    """Per-step records (losses, weights, learned weighting values, lr): kept in memory on every rank,
    appended to `history.jsonl` by rank 0; a resumed run first drops the records after its checkpoint."""

    def __init__(self, path: Path, step: int, write: bool):
        self.path, self.records = path, []
        self.file = None
        if write:
            kept = []
            if step > 0 and path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] <= step:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        break  # a torn last line of a killed run
            with atomic_file(path) as tmp:  # a crash here keeps the old history whole
                tmp.write_text("".join(line + "\n" for line in kept))
            self.file = open(path, "a")

    def record(self, step: int, obs: Observation, weights: torch.Tensor, weighting: Weighting, scheduler,
               tasks: list[str]) -> dict:
        """A step's record; the loop adds what else it knows, then `append`s it."""
        record = {"step": step, "lr": scheduler.get_last_lr()[0],
                  "loss": _by_task(tasks, obs.losses), "weight": _by_task(tasks, weights)}
        if obs.accuracies is not None:
            record["accuracy"] = _by_task(tasks, obs.accuracies)
        if obs.grad_norms is not None:
            record["grad_norm"] = _by_task(tasks, obs.grad_norms)
        for name, values in weighting.values().items():
            record[name] = _by_task(tasks, values)
        return record

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _by_task(tasks: list[str], values: torch.Tensor) -> dict[str, float | None]:
    return {t: (float(v) if math.isfinite(v) else None) for t, v in zip(tasks, values.tolist())}


def _make_loader(cfg: UfoConfig, layout: Layout, rank: int):
    if layout.kind == "mixed":
        return MixedLoader({task: task_loader(cfg, task, rank_in_group=rank, group_size=layout.world_size)
                            for task in cfg.tasks})
    (task,) = layout.tasks_of(rank)
    return task_loader(cfg, task, rank_in_group=layout.rank_in_group(task, rank),
                       group_size=layout.group_size(task))


def _next_batch(batches, held: list[str], paths: dict, sizes: dict, tasks: list[str], device, skipped: Counter,
                gates: dict | None = None, limit: int = 1000):
    """The next micro-batch with a sample on some rank, its slices and every task's count over all ranks.

    A micro-batch that is empty on every rank (all its samples bad, in every task's slice) is skipped
    by every rank alike (the counts are all-reduced) and counted."""
    for _ in range(limit):
        batch = next(batches)
        slices = _slices(batch, held, paths, sizes, gates or {})
        counts = torch.zeros(len(tasks), dtype=torch.float64)
        for s in slices:
            counts[tasks.index(s.task)] = float(s.size)
        counts = all_ranks_sum(counts, device)
        if counts.sum() > 0:
            return batch, slices, counts
        skipped["empty"] += 1
    raise UfoError(f"{limit} micro-batches in a row held no readable sample on any rank: check the shards "
                   "(`ufo data inspect`)")


def bad_data_summary(loader, layout: Layout, empty: int, say: Log) -> dict:
    """Bad samples per task and reason, summed over every rank (each rank reads its own part), and the
    empty micro-batches skipped; printed on rank 0."""
    loaders = loader.loaders if isinstance(loader, MixedLoader) else {loader.task: loader}
    mine = {task: dict(tl.bad_samples) for task, tl in loaders.items()}
    everyone: list = [None] * layout.world_size
    dist.all_gather_object(everyone, mine)
    samples: dict[str, Counter] = {}
    for part in everyone:
        for task, reasons in part.items():
            samples.setdefault(task, Counter()).update(reasons)
    samples = {task: dict(samples[task]) for task in layout.groups if task in samples and samples[task]}
    if samples or empty:
        say("bad data (all ranks): " + ("; ".join(f"{task}: " + ", ".join(f"{n} {reason}" for reason, n in
                                                                           sorted(r.items(), key=lambda x: -x[1]))
                                                  for task, r in samples.items()) or "no bad samples")
            + (f"; {empty} empty micro-batches skipped" if empty else ""))
    return {"samples": samples, "empty_micro_batches": empty}


def _slices(batch: dict, tasks: list[str], paths: dict[str, str],
            elastic: dict[str, tuple[int | None, int | None]], gates: dict | None = None) -> list[TaskSlice]:
    """A slice of every task, in config order; empty for the tasks this batch does not hold."""
    rows = dict(batch["slices"]) if "slices" in batch else {batch["task"]: len(batch["labels"])}
    gates = gates or {}
    return [TaskSlice(task, paths[task], rows.get(task, 0), *elastic.get(task, (None, None)), gates.get(task))
            for task in tasks]


@torch.no_grad()
def path_probs(module: SupernetViT, layout: Layout, rank: int, tasks: list[str], device) -> dict[str, list[float]]:
    """Every task's probability of FFN-task per block, softmax of its path logits, the same on every
    rank: each task's logits are read on one rank that holds them (the first of its group under
    task_sharded, rank 0 when replicated), and one all-reduce shares them."""
    depth = len(module.blocks)
    mine = torch.zeros(len(tasks), depth, dtype=torch.float64)
    for i, task in enumerate(tasks):
        reader = layout.groups[task][0] if layout.placement == "task_sharded" else 0
        if task in module.path_logits:
            param = module.path_logits[task].logits
            if hasattr(param, "ds_id"):  # ZeRO-3: every rank takes part in the gather
                import deepspeed

                with deepspeed.zero.GatheredParameters([param]):
                    value = param.detach().double().cpu().clone()
            else:
                value = param.detach().double().cpu()
            if rank == reader:
                mine[i] = torch.softmax(value, dim=-1)[:, 1]
    everyone = all_ranks_sum(mine, device)
    return {task: everyone[i].tolist() for i, task in enumerate(tasks)}


def _shown_paths(policy: PathPolicy, paths: dict[str, str]) -> dict[str, str]:
    """The paths the progress line shows: learned, each task's likelier choice, lower-case while open."""
    if policy.name != "learned":
        return paths
    return {task: "".join(b if d != OPEN else b.lower() for b, d in zip(best, policy.decided[task]))
            for task, best in policy.best_paths().items()}


def _eval_paths(policy: PathPolicy, step: int) -> dict[str, str]:
    """The paths a task is evaluated on: a learned task's likelier choice per block, else the step's."""
    return policy.best_paths() if policy.name == "learned" else policy.paths_at(step)


def _elastic_policy(cfg: UfoConfig) -> ElasticPolicy:
    m = cfg.model
    widths = {task: (tc.elastic.depths, tuple(int(m.embed_dim * r) for r in tc.elastic.mlp_ratios))
              for task, tc in cfg.tasks.items() if tc.elastic is not None}
    return ElasticPolicy(widths, m.depth, int(m.embed_dim * m.mlp_ratio), cfg.train.seed)


def _resume(engine, loader, weighting: Weighting, tag_dir: Path, cfg: UfoConfig, layout: Layout, rank: int,
            say: Log) -> int:
    world = layout.world_size
    marker = _marker(tag_dir)
    # DeepSpeed's loader unpickles anything: its files are opened weights-only first, a share on each rank
    try:
        check_step_files(tag_dir, rank, world)
        refused = ""
    except UfoError as e:
        refused = str(e)
    verdicts: list = [None] * world
    dist.all_gather_object(verdicts, refused)
    if any(verdicts):
        raise UfoError(next(v for v in verdicts if v))
    saved = (marker["world_size"], marker.get("placement", "replicated"),
             {t: list(r) for t, r in marker.get("layout_groups", {}).items()})
    if saved != (world, layout.placement, {t: list(r) for t, r in layout.groups.items()}):
        return _resume_elsewhere(engine, loader, weighting, tag_dir, marker, cfg, layout, rank, say)
    engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True)
    state = read_rank_state(tag_dir, rank)
    loader.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    saved = state.get("weighting", {"name": "static", "state": {}})
    if saved["name"] == weighting.name:
        weighting.load_state_dict(saved["state"])
    else:
        say(f"warning: {tag_dir} was trained with {saved['name']} weighting, this run uses {weighting.name}: "
            "its weighting starts afresh")
    return int(state["step"])


def _resume_elsewhere(engine, loader, weighting: Weighting, tag_dir: Path, marker: dict, cfg: UfoConfig,
                      layout: Layout, rank: int, say: Log) -> int:
    """Resume a checkpoint written by another number of ranks, layout split or placement (`ufo/reshard.py`):
    weights, optimizer state, step and lr schedule by parameter name; each task's data position
    re-split over its new ranks (`TaskLoader.load_state_dict`); the weighting as it was; a rank that
    existed keeps its RNG state, a new rank's is seeded from (seed, step, rank)."""
    from ufo.reshard import load_portable, portable_rank_state, read_portable

    d = cfg.deepspeed
    if (marker.get("zero_stage", 0), marker.get("precision", "fp32")) != (d.zero_stage, d.precision):
        raise UfoError(f"{tag_dir}: was written under ZeRO {marker.get('zero_stage', 0)} {marker.get('precision')}, "
                       f"this run is ZeRO {d.zero_stage} {d.precision}: resume with the same deepspeed section")
    old = layout_of(marker)
    now = {"world_size": layout.world_size, "placement": layout.placement, "layout_groups": layout.groups}
    say(f"resuming {tag_dir.name} of {old} on {layout_of(now)}: weights and "
        "optimizer state by name, data re-split")
    state = portable_rank_state(tag_dir, marker, layout, rank, layout.tasks_of(rank))
    if d.zero_stage == 0 and marker.get("placement", "replicated") == layout.placement == "replicated":
        # ZeRO 0 replicated: rank 0's files hold the whole model and optimizer, whatever the world size
        engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True)
    else:
        portable, optimizer_step = read_portable(tag_dir, marker, cfg, layout.held(rank))
        # Adam's count is the run's step (bf16 and fp32 skip no step)
        load_portable(engine, portable, optimizer_step or state["step"], cfg, layout, rank)
    loaders = loader.loaders if isinstance(loader, MixedLoader) else {loader.task: loader}
    for task, task_loader_ in loaders.items():
        position, group_size = state["data"][task]
        task_loader_.load_state_dict(position, group_size=group_size)
    step = state["step"]
    if rank < marker["world_size"]:  # a rank that was there before keeps its generators
        _set_rng_state(read_rank_state(tag_dir, rank)["rng"])
    else:
        fresh = int(np.random.SeedSequence([cfg.train.seed, step, rank]).generate_state(1)[0])
        random.seed(fresh)
        np.random.seed(fresh)
        torch.manual_seed(fresh)
    saved = state.get("weighting") or {"name": "static", "state": {}}
    if saved["name"] == weighting.name:
        weighting.load_state_dict(saved["state"])
    return step


def layout_of(marker: dict) -> str:
    groups = marker.get("layout_groups", {})
    return (f"{marker['world_size']} rank{'s' if marker['world_size'] > 1 else ''}, placement "
            f"{marker.get('placement', 'replicated')}, " + " ".join(f"{t}:{','.join(map(str, r))}"
                                                                   for t, r in groups.items()))


class _Meter:
    """Per-task loss sums and counts since the last progress line (all ranks' totals)."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        self.sums = torch.zeros(len(tasks), dtype=torch.float64)
        self.counts = torch.zeros(len(tasks), dtype=torch.float64)
        self.since, self.rate = time.perf_counter(), 0.0

    def add(self, obs: Observation, counts: torch.Tensor) -> None:
        self.sums += torch.where(counts > 0, obs.losses * counts, 0.0)
        self.counts += counts

    def take(self) -> dict[str, float]:
        now = time.perf_counter()
        self.rate = float(self.counts.sum()) / max(now - self.since, 1e-9)
        losses = {t: float(s / c) for t, s, c in zip(self.tasks, self.sums, self.counts) if c > 0}
        self.sums.zero_()
        self.counts.zero_()
        self.since = now
        return losses


def _progress(step: int, steps: int, losses: dict[str, float], weights: dict[str, float], rate: float, scheduler,
              paths: dict[str, str], policy: str, eta: float, tokens: int) -> str:
    lr = scheduler.get_last_lr()[0] if scheduler is not None else float("nan")
    parts = [f"step {step}/{steps}",
             "loss (weight) " + " ".join(f"{t} {v:.3f} ({weights[t]:.3g})" for t, v in losses.items()),
             f"{rate:.0f} samples/s {rate * tokens / 1000:.0f}k tokens/s",
             f"lr {lr:.2e}", f"eta {_duration(eta)}"]
    if policy in ("sample", "learned"):  # learned: each task's likelier choice, lower-case while open
        parts.append("paths " + " ".join(f"{t}={p}" for t, p in paths.items()))
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@torch.no_grad()
def evaluate(engine, cfg: UfoConfig, layout: Layout, rank: int, paths: dict[str, str], dtype: torch.dtype,
             say: Log = print) -> dict[str, dict[str, float]]:
    """Each task on its eval sets and path, by its protocol (`ufo/evaluate.py`).

    Replicated: every rank reads its share of every task's eval set (the same number of batches on
    each) and calls the model with a slice of every task, as in training, so ZeRO-3 can gather
    parameters. Task-sharded: each rank evaluates its own task, its share of it among the task's
    ranks. The outputs are gathered on the task's first rank, which measures; every rank gets every
    task's metrics.
    """
    world, tasks = layout.world_size, list(cfg.tasks)
    sharded = layout.placement == "task_sharded"
    module = engine.module
    was_training = module.training
    module.eval()
    results = {}
    for task in layout.tasks_of(rank) if sharded else tasks:
        here = [task] if sharded else tasks
        group = task_groups(layout)[task] if sharded else None
        size = layout.group_size(task) if sharded else world
        first = layout.groups[task][0] if sharded else 0

        def forward(images: torch.Tensor) -> torch.Tensor:
            slices = [TaskSlice(t, paths[t], len(images) if t == task else 0) for t in here]
            return module(images.to(engine.device, dtype=dtype), slices)[here.index(task)]

        def gather(mine):
            everyone: list = [None] * size
            dist.all_gather_object(everyone, mine, group=group)
            return everyone if rank == first else None

        measured = evaluate_task(cfg, task, forward, rank=layout.rank_in_group(task, rank) if sharded else rank,
                                 group_size=size, gather=gather)
        if measured:
            results[task] = measured
    everyone: list = [None] * world  # every rank learns every task's metrics, in config order
    dist.all_gather_object(everyone, results)
    merged = {k: v for part in everyone for k, v in part.items()}
    results = {task: merged[task] for task in tasks if task in merged}
    module.train(was_training)
    if results:
        say("eval: " + " | ".join(f"{task} " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items()) for task, r in results.items()))
    return results
