"""The DeepSpeed engine of a run: the DeepSpeed config ufo builds, the lr schedule, the optimizer's
parameter groups, and this rank's supernet, optimizer and engine built from them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ufo.checkpoint import canonical_name, init_supernet, load_pretrained, load_supernet, read_checkpoint
from ufo.config import UfoConfig
from ufo.distill import build_student
from ufo.errors import ConfigError
from ufo.layout import Layout, centres_of, import_deepspeed, own_group
from ufo.model import SupernetViT
from ufo.model.student import Student

Log = Callable[[str], None]


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


def param_groups(model: SupernetViT | Student, cfg: UfoConfig) -> list[dict]:
    """Optimizer groups: no weight decay on norms, biases and embeddings; optional layer-wise lr decay;
    FFN-shared at `train.shared_ffn_lr_scale` and each task's FFN-task at its `ffn_lr_scale` of the
    lr; learned path logits at `train.path.lr` and `train.path.weight_decay`. A student: weight decay
    but on norms, biases and what its timm model names (`no_weight_decay`), at the run's lr."""
    if isinstance(model, Student):
        return _student_groups(model, cfg)
    t, depth = cfg.train, len(model.blocks)
    groups: dict[tuple, dict] = {}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:  # frozen (a BNNeck's bias): no optimizer state, no update
            continue
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


def _student_groups(model: Student, cfg: UfoConfig) -> list[dict]:
    t = cfg.train
    skip = {f"backbone.{n}" for n in getattr(model.backbone, "no_weight_decay", set)()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [g for g in ({"params": decay, "lr": t.lr, "weight_decay": t.weight_decay},
                        {"params": no_decay, "lr": t.lr, "weight_decay": 0.0}) if g["params"]]


def build_engine(cfg: UfoConfig, layout: Layout, rank: int, say: Log = print,
                 pretrained: bool = True) -> tuple[Any, Any, Any, list]:
    """This rank's supernet (the tasks it holds), optimizer, lr schedule and DeepSpeed engine.

    Returns (engine, scheduler, clip, group_names): `clip` is ufo's own gradient clipping for the
    loop to call between backward and step where the engine's is wrong (task_sharded under
    ZeRO-0), else None; `group_names` the supernet names of each optimizer group's parameters, in
    order (checkpoints record them: DeepSpeed's bf16 ZeRO-0 masters are stored by position only).
    `pretrained` False skips `model.pretrained`'s weights: a resumed run takes the checkpoint's, and
    a benchmark needs none.
    """
    deepspeed = import_deepspeed()
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    held = layout.held(rank)
    ds_config = deepspeed_config(cfg)
    if cfg.distill is not None:  # built whole on every rank (ZeRO-3 partitions it at initialize); its
        # teacher is no part of it, so is never partitioned, trained or saved
        model = build_student(cfg, say, pretrained=pretrained)
    elif t.init:
        model = load_supernet(read_checkpoint(t.init, tasks=held), held, config=cfg)
    elif cfg.deepspeed.zero_stage == 3:  # each module partitioned as it is built: no rank ever holds it all
        def gather(params):
            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = init_supernet(cfg, held=held, gather=gather, pretrained=False)
        if pretrained:
            load_pretrained(model, cfg, gather, say)  # the pretrained ViT is read whole, outside zero.Init
    else:  # a Partial FC task's centres: only this rank's rows are ever made
        model = init_supernet(cfg, held=held, say=say, pretrained=pretrained,
                              centres=centres_of(cfg, layout, rank) if layout.placement == "task_sharded" else None)
    if t.compile:
        model.compile_blocks()
        say("train.compile: every block's attention and FFNs compiled by torch.compile (dynamic shapes; the "
            "first steps compile)")
    clip = None
    if layout.placement == "task_sharded":
        from ufo import placement  # imports DeepSpeed's MoE modules: only runs that shard pay for it

        if any(task.partial_fc is not None for task in cfg.tasks.values()):
            # every rank makes its group of one at the same point (each creation advances torch's
            # group counter, which names the groups made after it)
            own_group()
        model = placement.shard_model(model, layout)
    groups = param_groups(model, cfg)
    if layout.placement == "task_sharded":
        groups = placement.optimizer_groups(groups)
        ds_config, clip = placement.engine_config(ds_config, model, layout, t.gradient_clipping)
        say(f"task_sharded: rank {rank} holds {sum(p.numel() for p in model.parameters()):,} parameters "
            f"(shared + {', '.join(held)})")
        for name, param in placement.sharded_centres(model).items():
            start, count = param.ufo_rows
            task = name.split(".")[1]
            say(f"partial_fc: rank {rank} holds centres {start:,}-{start + count - 1:,} of {cfg.tasks[task].num_classes:,} "
                f"of {task} ({count * param.shape[1] * 4 / 2**20:,.1f} MiB fp32), sample_rate "
                f"{cfg.tasks[task].partial_fc.sample_rate:g}")
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    name_of = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    group_names = [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    if layout.placement == "task_sharded":
        placement.fix_zero_norm(engine)
    return engine, scheduler, clip, group_names
