"""Resuming a run on another number of ranks, layout split or placement.

A DeepSpeed checkpoint is laid out for the ranks that wrote it (ZeRO partitions, expert files of
task-sharded ranks). To continue elsewhere, ufo reads it as *portable state*: every supernet
parameter by its name, with its fp32 value and its optimizer state (Adam's moments, SGD's
momentum), plus the optimizer's step count, and puts that into the new engine by name.

Reading, by the checkpoint's ZeRO stage: 0, the torch optimizer's state dicts (rank 0's, or
under task_sharded each task's lead rank's, `expp_rank_T`), matched to names by the optimizer
groups each rank recorded in its state file; 1 and 2, the ZeRO partitions of every rank,
assembled through DeepSpeed's own fragment maps (replicated or task-sharded alike); 3,
DeepSpeed's universal checkpoint (`deepspeed.checkpoint.ds_to_universal`), written to a
temporary directory. Every file is opened weights-only first (`ufo.checkpoint.check_step_files`).

Writing: DeepSpeed's tensor-fragment API (`safe_set_full_fp32_param`,
`safe_set_full_optimizer_state`) under ZeRO 1-3, whose optimizer states exist only after a first
step: the new engine first takes one step at lr 0 on zero gradients. Under ZeRO 0 (fp32) the
torch optimizer's state is set directly. DeepSpeed internals used here (the base optimizer's
per-group `step`, the engine's step counters) are read off deepspeed 0.19.8, as in
`ufo/placement.py`.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ufo.checkpoint import (
    _load,
    _only,
    canonical_name,
    read_centres,
    read_checkpoint,
    read_rank_state,
    safe_load,
    set_rng_state,
    task_of,
    zero_fragments,
)
from ufo.config import UfoConfig
from ufo.ds_masters import link_optimizer_states
from ufo.errors import CheckpointError
from ufo.layout import Layout, import_deepspeed
from ufo.model import TaskSlice


def read_portable(tag_dir: Path, marker: dict, cfg: UfoConfig, tasks: list[str]) -> tuple[dict, int]:
    """{name: {"param": fp32 value, state key: tensor}} of the shared parts and `tasks`, and the
    optimizer's step count (0 where the checkpoint does not say: DeepSpeed's universal files)."""
    zero = marker.get("zero_stage", 0)
    if zero == 3:
        return _read_universal(tag_dir, cfg, tasks)
    weights = read_checkpoint(tag_dir, tasks=tasks).state_dict
    if zero == 0:
        if marker.get("precision", "fp32") != "fp32":
            raise CheckpointError(f"{tag_dir}: a ZeRO 0 {marker['precision']} checkpoint resumes on another world "
                                  "size with the same placement only (its optimizer keeps no names)")
        states, step = _read_torch_optimizers(tag_dir, marker, cfg, tasks)
    else:
        states, step = _read_zero_partitions(tag_dir, marker, cfg, weights)
    if marker.get("placement") == "task_sharded":  # Partial FC centres: their ranks' own files, whole
        states.update({name: {k: v for k, v in entry.items() if k != "param"}
                       for name, entry in read_centres(tag_dir, cfg, tasks).items() if len(entry) > 1})
    return {name: {"param": value, **states.get(name, {})} for name, value in weights.items()}, step


def _group_names(tag_dir: Path, rank: int) -> list[list[str]]:
    names = read_rank_state(tag_dir, rank).get("param_groups")
    if not names:
        raise CheckpointError(f"{tag_dir}: its rank files do not name the optimizer's parameters (written by an "
                              "older ufo); resume it on the same ranks")
    return names


def _read_torch_optimizers(tag_dir: Path, marker: dict, cfg: UfoConfig, tasks: list[str]) -> tuple[dict, int]:
    """ZeRO 0: the torch optimizer state dict of rank 0 (replicated) or of each task's lead rank."""
    if marker.get("placement") == "task_sharded":
        names = list(cfg.tasks)
        owners = [(tag_dir / f"expp_rank_{names.index(t)}_mp_rank_00_optim_states.pt", marker["layout_groups"][t][0])
                  for t in tasks]
    else:
        owners = [(tag_dir / "mp_rank_00_model_states.pt", 0)]
    states: dict[str, dict] = {}
    step = 0
    for file, rank in owners:
        optimizer = _load(file)["optimizer"]
        for names, group in zip(_group_names(tag_dir, rank), optimizer["param_groups"]):
            if len(names) != len(group["params"]):
                raise CheckpointError(f"{file}: its optimizer groups do not match the names rank {rank} recorded")
            for name, index in zip(names, group["params"]):
                state = optimizer["state"].get(index, {})
                states[name] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
                if "step" in state:
                    step = max(step, int(state["step"]))
    return states, step


def _read_zero_partitions(tag_dir: Path, marker: dict, cfg: UfoConfig, weights: dict) -> tuple[dict, int]:
    """ZeRO 1/2: each parameter's optimizer state assembled from the ranks' partitions (as the fp32
    masters are in `ufo.checkpoint._read_module_files`)."""
    pieces: dict[tuple[str, str], list[torch.Tensor]] = {}
    step = 0
    for key, shard, group, fragment in zero_fragments(tag_dir, marker, weights):
        base = shard["base_optimizer_state"]["state"].get(group, {})
        if "step" in base:
            step = max(step, int(base["step"]))
        for state, flat in base.items():
            if isinstance(flat, torch.Tensor) and flat.dim() > 0:
                pieces.setdefault((key, state), []).append(flat.narrow(0, fragment.start, fragment.numel))
    states: dict[str, dict] = {}
    for (key, state), parts in pieces.items():
        flat = torch.cat(parts)
        if flat.numel() != weights[key].numel():
            raise CheckpointError(f"{tag_dir}: the ZeRO shards hold {flat.numel()} of the {weights[key].numel()} "
                                  f"values of {key}'s {state}")
        states.setdefault(key, {})[state] = flat.view(weights[key].shape).clone()
    return states, step


def _read_universal(tag_dir: Path, cfg: UfoConfig, tasks: list[str]) -> tuple[dict, int]:
    """ZeRO 3: DeepSpeed's universal checkpoint of the step, made in a temporary directory (rank 0
    converts, in a directory every rank of this host sees; the others wait). The converter unpickles
    anything: the caller has checked the step's files (`ufo.train._resume`)."""
    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    holder: list = [None]
    if dist.get_rank() == 0:
        holder[0] = tempfile.mkdtemp(prefix="ufo-universal-", dir=tag_dir.parent)
        out = Path(holder[0]) / "universal"
        ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True))
    dist.broadcast_object_list(holder, src=0)
    root = Path(holder[0]) / "universal" / "zero"
    try:
        portable, step = {}, 0
        for param_dir in sorted(root.iterdir()):
            name = param_dir.name
            if task_of(name) not in (None, *tasks):
                continue
            entry = {}
            for file in param_dir.glob("*.pt"):
                value = safe_load(file)
                value = value.get("param", value) if isinstance(value, dict) else value
                if file.stem == "step":
                    step = max(step, int(value))
                else:
                    entry["param" if file.stem == "fp32" else file.stem] = value.detach().float()
            portable[name] = entry
        portable = _only(portable, cfg, tasks)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(holder[0], ignore_errors=True)
    return portable, step


def load_portable(engine, portable: dict, step: int, cfg: UfoConfig, layout: Layout, rank: int) -> None:
    """Put portable state into a freshly built engine, by parameter name."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from ufo.placement import check_engine_version  # imports DeepSpeed's MoE modules: only when resharding

    check_engine_version()  # the relinking in `_warm_up` and the step counters are 0.19.8's
    zero = cfg.deepspeed.zero_stage
    if zero > 0 or cfg.deepspeed.precision != "fp32":
        _warm_up(engine, cfg, layout, rank)
    module = engine.module
    missing = []
    for name, buffer in module.named_buffers():  # a BNNeck's running statistics
        entry = portable.get(canonical_name(name))
        if entry is not None:
            buffer.copy_(entry["param"].view(buffer.shape).to(buffer.dtype))
    for name, param in module.named_parameters():
        key = canonical_name(name)
        entry = portable.get(key)
        if entry is None:
            missing.append(key)
            continue
        if hasattr(param, "ufo_rows"):  # a Partial FC rank's centres: its rows of the whole
            start, count = param.ufo_rows
            entry = {k: v[start:start + count] for k, v in entry.items()}
        value = entry["param"]
        if not param.requires_grad:  # frozen: no master weights, no optimizer state
            with torch.no_grad():
                param.copy_(value.view(param.shape).to(param.dtype))
            continue
        if zero == 0 and cfg.deepspeed.precision == "fp32":
            with torch.no_grad():
                param.copy_(value.view(param.shape))
            state = engine.optimizer.state[param]
            for k, v in entry.items():
                if k != "param":
                    state[k] = v.clone().view(param.shape)
            if len(entry) > 1:
                state["step"] = torch.tensor(float(step))
            continue
        if zero == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
                param.copy_(value.view(param.shape).to(param.dtype))
        else:
            with torch.no_grad():
                param.copy_(value.view(param.shape).to(param.dtype))
        safe_set_full_fp32_param(param, value.view(getattr(param, "ds_shape", param.shape)).float())
        for k, v in entry.items():
            if k != "param":
                safe_set_full_optimizer_state(param, v.view(getattr(param, "ds_shape", param.shape)).float(), k)
    if missing:
        raise CheckpointError(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) that this run's "
                              "model holds: resume with the config it was trained with")
    if zero > 0 or cfg.deepspeed.precision != "fp32":
        base = engine.optimizer.optimizer
        for state in base.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step)) if isinstance(state["step"], torch.Tensor) else step
    if engine.lr_scheduler is not None:  # the schedule at `step` (its groups may differ from the checkpoint's)
        engine.lr_scheduler.last_epoch = step - 1
        engine.lr_scheduler.step()
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()


def _warm_up(engine, cfg: UfoConfig, layout: Layout, rank: int) -> None:
    """One optimizer step at lr 0 on zero gradients: ZeRO's optimizer states exist after a first step."""
    lrs = [group["lr"] for group in engine.optimizer.param_groups]
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    m = cfg.model
    held = layout.held(rank)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    images = [torch.zeros(1, m.in_chans, *cfg.size_of(task), device=engine.device, dtype=dtype) for task in held]
    labels = torch.zeros(len(held), dtype=torch.long, device=engine.device)
    slices = [TaskSlice(task, cfg.path_of(task), 1) for task in held]
    scheduler, engine.lr_scheduler = engine.lr_scheduler, None  # the schedule is the checkpoint's
    try:
        for _ in range(cfg.train.gradient_accumulation_steps):
            losses = engine(images, slices, labels, reduction="sum")
            engine.backward(sum(loss.float() for loss in losses) * 0.0)
            engine.step()
    finally:
        engine.lr_scheduler = scheduler
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    link_optimizer_states(engine)


def portable_rank_state(tag_dir: Path, marker: dict, layout: Layout, rank: int, tasks: list[str]) -> dict[str, Any]:
    """What a rank of the new layout takes from the ranks that wrote the checkpoint: each of its tasks'
    data position with the old task group's size, and the weighting (the same on every old rank)."""
    old_groups = {t: list(r) for t, r in marker["layout_groups"].items()}
    data = {}
    for task in tasks:
        lead = old_groups[task][0]
        state = read_rank_state(tag_dir, lead)["data"]
        data[task] = (state["tasks"][task] if "tasks" in state else state, len(old_groups[task]))
    first = read_rank_state(tag_dir, 0)
    return {"data": data, "weighting": first.get("weighting"), "step": int(first["step"])}


def layout_of(marker: dict) -> str:
    """A checkpoint's (or a run's) ranks, placement and task groups, in a few words."""
    groups = marker.get("layout_groups", {})
    return (f"{marker['world_size']} rank{'s' if marker['world_size'] > 1 else ''}, placement "
            f"{marker.get('placement', 'replicated')}, " + " ".join(f"{t}:{','.join(map(str, r))}"
                                                                   for t, r in groups.items()))


def resume_elsewhere(engine, tag_dir: Path, marker: dict, cfg: UfoConfig, layout: Layout, rank: int,
                     say) -> dict[str, Any]:
    """Load a checkpoint written by another number of ranks, layout split or placement into `engine`:
    weights, optimizer state, step and lr schedule by parameter name. A rank that existed keeps its
    RNG state, a new rank's is seeded from (seed, step, rank). Returns this rank's share of the
    state (`portable_rank_state`): each task's data position, to be re-split over its new ranks
    (`TaskLoader.load_state_dict`), and the weighting as it was."""
    d = cfg.deepspeed
    if (marker.get("zero_stage", 0), marker.get("precision", "fp32")) != (d.zero_stage, d.precision):
        raise CheckpointError(f"{tag_dir}: was written under ZeRO {marker.get('zero_stage', 0)} "
                              f"{marker.get('precision')}, this run is ZeRO {d.zero_stage} {d.precision}: resume with "
                              "the same deepspeed section")
    now = {"world_size": layout.world_size, "placement": layout.placement, "layout_groups": layout.groups}
    say(f"resuming {tag_dir.name} of {layout_of(marker)} on {layout_of(now)}: weights and "
        "optimizer state by name, data re-split")
    state = portable_rank_state(tag_dir, marker, layout, rank, layout.tasks_of(rank))
    if d.zero_stage == 0 and marker.get("placement", "replicated") == layout.placement == "replicated":
        # ZeRO 0 replicated: rank 0's files hold the whole model and optimizer, whatever the world size
        engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True)
    else:
        portable, optimizer_step = read_portable(tag_dir, marker, cfg, layout.held(rank))
        # Adam's count is the run's step (bf16 and fp32 skip no step)
        load_portable(engine, portable, optimizer_step or state["step"], cfg, layout, rank)
    if rank < marker["world_size"]:  # a rank that was there before keeps its generators
        set_rng_state(read_rank_state(tag_dir, rank)["rng"])
    else:
        fresh = int(np.random.SeedSequence([cfg.train.seed, state["step"], rank]).generate_state(1)[0])
        random.seed(fresh)
        np.random.seed(fresh)
        torch.manual_seed(fresh)
    return state
