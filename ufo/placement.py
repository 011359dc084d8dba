"""Task-sharded placement on DeepSpeed's expert machinery: a rank holds the shared parts and only
the task it serves, whose FFN-task MLPs and head are DeepSpeed expert parameters reduced among
that task's ranks (shared parameters over the world), and saved in DeepSpeed's expert files.

Private engine API, read off deepspeed 0.19.8 (runtime/engine.py, moe/, utils/groups.py,
runtime/zero/stage_1_and_2.py) and kept in this module alone: `check_engine_version` refuses
another version, and tests/test_placement.py fails when the engine changes under it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ufo.errors import ConfigError
from ufo.layout import Layout, centre_rows, import_deepspeed, own_group, task_groups
from ufo.model.heads import PartialFC

DEEPSPEED_VERSION = "0.19.8"

deepspeed = import_deepspeed()
from deepspeed.moe.layer import MoE  # noqa: E402
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402
from deepspeed.utils import groups as ds_groups  # noqa: E402


def check_engine_version() -> None:
    if deepspeed.__version__ != DEEPSPEED_VERSION:
        raise ConfigError(f"train.placement: task_sharded relies on DeepSpeed {DEEPSPEED_VERSION} internals, "
                          f"this is {deepspeed.__version__}; install deepspeed=={DEEPSPEED_VERSION} or set "
                          "train.placement: replicated")


def group_name(layout: Layout) -> str:
    # DeepSpeed parses the size out of the name (utils/groups.py, _get_max_expert_size)
    return f"ep_size_{len(layout.groups)}"


def centres_group_name(layout: Layout) -> str:
    """The expert group of Partial FC's centre shards, each reduced with no other rank. DeepSpeed reads
    the size after `ep_size_`: the same as the tasks' group's, which stays the largest (the one whose
    ranks write the optimizer files of ZeRO-0)."""
    return f"{group_name(layout)}_partial_fc"


def _fill_centres_group(layout: Layout) -> None:
    """This rank alone as the centres' expert-data-parallel group (made by this rank only)."""
    name, group = centres_group_name(layout), own_group()
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = [dist.get_rank()]


def _fill_engine_groups(layout: Layout) -> None:
    """DeepSpeed's expert-data-parallel group of a rank is its task's ranks; its expert-parallel
    group is chosen so that the rank's place in it is its task's index, by which DeepSpeed names
    the expert checkpoint files (layer_L_expert_T_...)."""
    name, rank = group_name(layout), dist.get_rank()
    by_task = task_groups(layout)  # made anew after each leave_distributed()
    (own,) = layout.tasks_of(rank)
    if ds_groups._get_expert_data_parallel_group_dict().get(name) is by_task[own]:
        return  # this engine's groups are in place (the engine calls every TaskExpert)
    ranks = list(layout.groups.values())
    for task, members in layout.groups.items():
        if rank in members:
            ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = by_task[task]
            ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(members)
    leads = [members[0] for members in ranks]
    if len({len(members) for members in ranks}) == 1:  # equal counts: the j-th rank of every task
        sets = [[members[j] for members in ranks] for j in range(len(ranks[0]))]
    else:  # a rank's place is its task's index: the leads of the tasks before it, then itself
        sets = [leads] + [leads[:t] + [r] for t, members in enumerate(ranks) for r in members[1:]]
    for i, members in enumerate(sets):  # every rank makes every group, in the same order
        group = dist.new_group(members)
        if rank in members and (i == 0 or rank not in leads):
            ds_groups._EXPERT_PARALLEL_GROUP[name] = group
            ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = members


class TaskExpert(MoE):
    """One task's module held only by that task's ranks, as DeepSpeed expert parameters.

    A subclass of DeepSpeed's MoE only so that the engine sees expert layers (runtime/engine.py
    checks isinstance(module, MoE)); MoE.__init__ (gate, all-to-all) is skipped. The module sits
    where DeepSpeed's checkpoints expect an expert (`deepspeed_moe.experts.deepspeed_experts.0`);
    everything else (fc1, loss, deployed, ...) is the wrapped module's.
    """

    def __init__(self, module: nn.Module, layout: Layout):
        nn.Module.__init__(self)
        self.num_experts = self.ep_size = len(layout.groups)
        self.num_local_experts = 1
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.expert_group_name = group_name(layout)
        self._layout = layout
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList([module])
        for p in module.parameters():
            p.allreduce = False  # reduced among the task's ranks, not the world
            p.group_name = self.expert_group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        _fill_engine_groups(self._layout)  # called by the engine on every module that has it
        if any(isinstance(m, PartialFC) for m in self.inner.modules()):
            _fill_centres_group(self._layout)

    @property
    def inner(self) -> nn.Module:
        return self.deepspeed_moe.experts.deepspeed_experts[0]

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("deepspeed_moe", "_modules"):
                raise
            return getattr(self.inner, name)


def shard_model(model: nn.Module, layout: Layout) -> nn.Module:
    """Mark the held tasks' FFN-task MLPs, heads (and learned path logits) of a task-sharded rank's
    supernet as experts."""
    check_engine_version()
    for block in model.blocks:  # every rank reduces every shared gradient, whatever its task's path
        block.mlp.always_shared = True
    for task in model.held:
        for block in model.blocks:
            if task in block.mlp.task:  # (model.ffns: on_path builds it only where the task's path takes T)
                block.mlp.task[task] = TaskExpert(block.mlp.task[task], layout)
        margin = getattr(model.heads[task], "margin", None)
        model.heads[task] = TaskExpert(model.heads[task], layout)
        if isinstance(margin, PartialFC):
            shard_centres(margin, task, layout)
        if model.path_logits is not None:  # a learned path is the task's own, reduced among its ranks
            model.path_logits[task] = TaskExpert(model.path_logits[task], layout)
    return model


def shard_centres(margin: PartialFC, task: str, layout: Layout) -> None:
    """Make a Partial FC head this rank's shard of the task's centres (sliced from a whole matrix, as
    `train.init` loads one), reduced with no other rank, gathering over the task's ranks."""
    rank = dist.get_rank()
    start, count = centre_rows(margin.num_classes, layout.group_size(task), layout.rank_in_group(task, rank))
    if (margin.start, margin.count) != (start, count):
        if margin.count != margin.num_classes:
            raise ValueError(f"task {task}: centres {margin.start}+{margin.count} are neither whole nor this rank's")
        margin.weight = nn.Parameter(margin.weight.detach()[start:start + count].clone())
        margin.start, margin.count = start, count
    margin.group = task_groups(layout)[task] if layout.group_size(task) > 1 else None
    margin.sharded = True  # ufo writes the shard (ufo.checkpoint.save_centres), not DeepSpeed's module files
    margin.weight.allreduce = False
    margin.weight.group_name = centres_group_name(layout)
    margin.weight.ufo_rows = (start, count)


def sharded_centres(model: nn.Module) -> dict[str, nn.Parameter]:
    """A task-sharded rank's Partial FC centre shards by supernet name (`ufo_rows`: their rows)."""
    from ufo.checkpoint import canonical_name

    return {canonical_name(n): p for n, p in model.named_parameters() if hasattr(p, "ufo_rows")}


def optimizer_groups(groups: list[dict]) -> list[dict]:
    """Optimizer groups with the expert parameters in groups of their own (named for DeepSpeed)."""
    named = [{**g, "name": f"group{i}"} for i, g in enumerate(groups)]
    position = {id(p): k for k, p in enumerate(p for g in groups for p in g["params"])}
    split = split_params_into_different_moe_groups_for_optimizer(named, max_group_size=None)
    # DeepSpeed makes the expert groups in the order of a set of group names, which differs between
    # processes once there are two (Partial FC's centres): put them in the order of their parameters
    # (ranks of a task, and a resumed run, must have the same groups in the same order)
    shared = [g for g in split if not g.get("moe")]
    experts = sorted((g for g in split if g.get("moe") and g["params"]),
                     key=lambda g: (position[id(g["params"][0])], g["name"]))
    # a group whose parameters are all experts (a learned path's logits) is left empty: DeepSpeed
    # drops empty groups, and the lr schedule must see the groups the engine keeps
    return [g for g in shared if g["params"]] + experts


def engine_config(config: dict, model: nn.Module, layout: Layout, max_norm: float) -> tuple[dict, Any]:
    """The DeepSpeed config of a task-sharded rank, and ufo's own gradient clipping where the
    engine's is wrong (ZeRO-0), to call between backward and step; else None."""
    config = {**config, "zero_optimization": dict(config["zero_optimization"])}
    zero = config["zero_optimization"]
    if zero["stage"] == 0:
        config["gradient_clipping"] = 0.0
        return config, (lambda: clip_grad_norm(model, max_norm, layout)) if max_norm > 0 else None
    # ZeRO 1/2 reduce buckets flushed by element count mix shared and task gradients at points that
    # differ between tasks of unequal size, and the world's collectives then disagree
    # (stage_1_and_2.py, reduce_independent_p_g_buckets_and_remove_grads): a bucket as large as the
    # largest rank's gradients makes one flush at the end of every backward, the same on every rank.
    local = torch.tensor([float(sum(p.numel() for p in model.parameters()))], device=_device())
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    largest = int(local.item())
    given = zero.get("reduce_bucket_size")
    if given is not None and int(given) < largest:
        raise ConfigError(f"deepspeed.overrides.zero_optimization.reduce_bucket_size: {int(given):,} is below the "
                          f"largest rank's {largest:,} parameters; under task_sharded the bucket must hold them all "
                          "(leave it unset: ufo sizes it)")
    zero["reduce_bucket_size"] = max(largest, int(given or 0))
    return config, None


def _reduced_over(param: nn.Parameter) -> int:
    """0: the world's parameter, 1: a task's, 2: one rank's (Partial FC centres)."""
    if getattr(param, "allreduce", True):
        return 0
    return 2 if hasattr(param, "ufo_rows") else 1


def fix_zero_norm(engine) -> None:
    """ZeRO 1/2's gradient norm for clipping (stage_1_and_2.py, `scaled_global_norm`) all-reduces once
    per optimizer group over the world, pairing the ranks' groups by position: a Partial FC rank's
    centres are a group of their own (reduced with no other rank), so its groups no longer pair with
    the other tasks' ranks'. ufo's norm: the squares of every rank's gradient partitions (each value
    is in exactly one rank's partition: a shared or task parameter's partitions split it over the
    world or the task's ranks, a centre shard is its rank's alone) summed in one all-reduce."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "averaged_gradients"):
        return  # no ZeRO 1/2 optimizer: ZeRO-0 clips with `clip_grad_norm`

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        total = torch.zeros(1, dtype=torch.float32, device=_device())
        for i in range(len(optimizer.bit16_groups)):
            for grad in optimizer.averaged_gradients.get(i) or []:
                if grad is not None and not getattr(grad, "_zero_padding", False):
                    total += grad.detach().float().pow(2).sum().to(total.device)
        dist.all_reduce(total)
        norm = total.sqrt()[0].to(optimizer.device)
        return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))

    optimizer.scaled_global_norm = scaled_global_norm


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, layout: Layout) -> float:
    """Clip every gradient by the true global norm: shared gradients (the same on every rank) once,
    each task's (the same on its ranks) once. DeepSpeed's ZeRO-0 clipping averages the ranks'
    local norms (runtime/utils.py, clip_grad_norm_), which is wrong once ranks hold other tasks."""
    (task,) = layout.tasks_of(dist.get_rank())
    grads = [(p.grad, _reduced_over(p)) for p in model.parameters() if p.grad is not None]
    device = grads[0][0].device if grads else _device()
    total = torch.zeros(3, dtype=torch.float64, device=device)
    for grad, where in grads:
        total[where] += grad.detach().double().pow(2).sum()
    # every rank holds the shared gradient, each of a task's ranks that task's, a rank alone its
    # Partial FC centres': count each once
    total[0] /= layout.world_size
    total[1] /= layout.group_size(task)
    dist.all_reduce(total)
    norm = float(total.sum().sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for grad, _ in grads:
            grad.mul_(coef)
    return norm
