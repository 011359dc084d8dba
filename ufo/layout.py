"""Which ranks serve which task.

`task_parallel` (the UFO way): every rank serves exactly one task; ranks are divided among tasks
by each task's `ranks`, or in proportion to task weights. `mixed`: every rank serves every task,
each micro-batch holding a contiguous slice of each. The layout is pure arithmetic on
(world size, tasks); `init_distributed` joins (or makes) the process group the layout runs on.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from ufo.config import UfoConfig, sharding_unsupported
from ufo.errors import ConfigError

LayoutKind = Literal["task_parallel", "mixed"]
Placement = Literal["replicated", "task_sharded"]


@dataclass(frozen=True)
class Layout:
    kind: LayoutKind
    world_size: int
    groups: dict[str, tuple[int, ...]]  # task -> the global ranks that serve it, ascending
    placement: Placement = "replicated"
    placement_note: str = ""  # why `auto` chose what it chose, when that is not the obvious choice

    def tasks_of(self, rank: int) -> list[str]:
        """The tasks a rank serves (one in task_parallel, all in mixed), in config order."""
        return [task for task, ranks in self.groups.items() if rank in ranks]

    def held(self, rank: int) -> list[str]:
        """The tasks whose FFN-task MLPs and heads a rank holds: its own (task_sharded) or all."""
        return self.tasks_of(rank) if self.placement == "task_sharded" else list(self.groups)

    def rank_in_group(self, task: str, rank: int) -> int:
        return self.groups[task].index(rank)

    def group_size(self, task: str) -> int:
        return len(self.groups[task])

    def describe(self) -> str:
        """One line per task, for the start of a run and the tracking store."""
        lines = [f"layout {self.kind}: {self.world_size} rank{'s' if self.world_size > 1 else ''}, "
                 f"placement {self.placement}" + (f" ({self.placement_note})" if self.placement_note else "")]
        for task, ranks in self.groups.items():
            lines.append(f"  {task:<14} ranks {_ranges(ranks)}")
        return "\n".join(lines)


def make_layout(cfg: UfoConfig, world_size: int, kind: LayoutKind | None = None) -> Layout:
    """The layout for a run: `kind` (or `train.layout`), else task_parallel when there are enough ranks."""
    tasks = cfg.tasks
    kind = kind or cfg.train.layout
    if kind == "auto":
        kind = "task_parallel" if world_size >= len(tasks) else "mixed"
    if kind == "mixed":
        sharded = [t for t, c in tasks.items() if c.partial_fc is not None]
        if sharded:
            raise ConfigError(f"tasks.{sharded[0]}.partial_fc: shards the class centres over the task's own ranks, but "
                              f"this run is mixed ({world_size} rank{'s' if world_size > 1 else ''} for {len(tasks)} "
                              f"tasks); launch at least one rank per task (train.layout task_parallel), or set "
                              f"tasks.{sharded[0]}.partial_fc: null for a dense head")
        if cfg.train.placement == "task_sharded":
            raise ConfigError("train.placement: task_sharded needs train.layout task_parallel (one task per rank), "
                              f"but this run is mixed ({world_size} ranks for {len(tasks)} tasks)")
        return Layout("mixed", world_size, {task: tuple(range(world_size)) for task in tasks})
    if world_size < len(tasks):
        raise ConfigError(f"train.layout: task_parallel needs at least one rank per task: {len(tasks)} tasks "
                          f"({', '.join(tasks)}) but {world_size} rank{'s' if world_size > 1 else ''}; "
                          "launch more ranks or set train.layout: mixed")
    counts = _divide(world_size, {t: c.ranks for t, c in tasks.items()}, {t: c.weight for t, c in tasks.items()})
    groups, start = {}, 0
    for task, n in counts.items():
        groups[task] = tuple(range(start, start + n))
        start += n
    placement, note = placement_for(cfg)
    return Layout("task_parallel", world_size, groups, placement, note)


def centre_rows(num_classes: int, shards: int, index: int) -> tuple[int, int]:
    """The class centres (start, count) of Partial FC shard `index` of `shards`: num_classes // shards
    each, the first num_classes % shards one more (arcface_torch's split)."""
    base, extra = divmod(num_classes, shards)
    return index * base + min(index, extra), base + (index < extra)


def centres_of(cfg: UfoConfig, layout: Layout, rank: int) -> dict[str, tuple[int, int]]:
    """The centres a rank holds of each Partial FC task it serves (its place in the task's ranks)."""
    return {task: centre_rows(cfg.tasks[task].num_classes, layout.group_size(task), layout.rank_in_group(task, rank))
            for task in layout.tasks_of(rank) if cfg.tasks[task].partial_fc is not None}


def placement_for(cfg: UfoConfig) -> tuple[Placement, str]:
    """A task_parallel run's placement: `train.placement`, where `auto` shards the tasks unless the
    engine cannot (ZeRO-3; bf16 or fp16 under ZeRO-0) and says why."""
    if cfg.train.placement != "auto":
        return cfg.train.placement, ""
    unsupported = sharding_unsupported(cfg)
    return ("replicated", f"auto: {unsupported}") if unsupported else ("task_sharded", "")

def _divide(world: int, fixed: Mapping[str, int | None], weights: Mapping[str, float]) -> dict[str, int]:
    """Ranks per task: fixed counts where given, the rest by weight (largest remainders), one at least."""
    given = {t: n for t, n in fixed.items() if n is not None}
    if sum(given.values()) > world or (len(given) == len(fixed) and sum(given.values()) != world):
        raise ConfigError(f"tasks.*.ranks: the tasks ask for {sum(given.values())} ranks "
                          f"({', '.join(f'{t}={n}' for t, n in given.items())}) but the run has {world}")
    free = [t for t in fixed if fixed[t] is None]
    left = world - sum(given.values())
    if free and left < len(free):
        raise ConfigError(f"tasks.*.ranks: {left} ranks remain for {len(free)} tasks without a fixed count")
    counts = dict(given)
    if free:
        total = sum(weights[t] for t in free) or len(free)
        share = {t: (weights[t] or 0.0) / total * left if total else left / len(free) for t in free}
        base = {t: max(1, int(share[t])) for t in free}
        while sum(base.values()) > left:  # the one-rank minimum overshot: take from the largest
            base[max(base, key=lambda t: (base[t], -free.index(t)))] -= 1
        by_remainder = sorted(free, key=lambda t: (-(share[t] - int(share[t])), free.index(t)))
        for t in by_remainder[: left - sum(base.values())]:
            base[t] += 1
        counts.update(base)
    return {t: counts[t] for t in fixed}

def _ranges(ranks: tuple[int, ...]) -> str:
    return f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}" if ranks == tuple(
        range(ranks[0], ranks[-1] + 1)) else ",".join(map(str, ranks))

def import_deepspeed():
    """deepspeed, told to use its CPU accelerator where torch sees no GPU (this CUDA build of torch
    would otherwise make it look for one)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "mlflow" in sys.modules:
        import deepspeed
    else:
        # DeepSpeed's autotuner (which ufo does not use) imports MLflow, and pandas with it, when
        # DeepSpeed is imported: 1.3 s of every rank's start. Hidden while DeepSpeed loads (its
        # autotuner then logs nowhere), importable again for ufo's own tracking right after.
        sys.modules["mlflow"] = None  # type: ignore[assignment]
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed

def init_distributed(timeout: float | None = None) -> tuple[int, int, int]:
    """Join the launcher's process group (deepspeed, torchrun) or make a one-rank one.

    Returns (rank, world size, local rank). gloo on CPU, nccl on GPUs. `timeout` (seconds): how long
    any collective waits for the slowest rank, for this group and every group made after it
    (DeepSpeed's expert and data-parallel groups take torch's default, which is set to it: the one
    private torch API ufo uses, `distributed_c10d.default_pg_timeout`, torch pinned in pyproject).
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    deepspeed = import_deepspeed()
    if "WORLD_SIZE" not in os.environ and "SLURM_STEP_ID" in os.environ:
        os.environ.update(slurm_ranks(os.environ))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    kw = {}
    if timeout is not None and not dist.is_initialized():
        kw["timeout"] = c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timedelta(seconds=timeout)
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        # a plain `ufo train`: one process, whose group meets in a local file and talks over loopback
        # only: it opens no listener on the network (a TCP store would listen on every interface)
        import tempfile

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # read by every gloo group made later
        store = Path(tempfile.mkdtemp(prefix="ufo-pg-")) / "store"
        dist.init_process_group(backend, init_method=store.as_uri(), rank=0, world_size=1, **kw)
    if not dist.is_initialized() or not _deepspeed_joined(deepspeed):
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **kw)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks of one host share its cores; more threads than cores makes every rank crawl
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return dist.get_rank(), dist.get_world_size(), local_rank

def _deepspeed_joined(deepspeed) -> bool:
    return deepspeed.comm.comm.cdb is not None and deepspeed.comm.comm.cdb.is_initialized()


_task_groups: dict[tuple, dict] = {}
_own_group: list = []


def task_groups(layout: Layout) -> dict:
    """One process group per task (the ranks that serve it), made once, in the same order on every rank."""
    import torch.distributed as dist

    key = tuple(layout.groups.items())
    if key not in _task_groups:
        _task_groups[key] = {task: dist.new_group(list(ranks)) for task, ranks in layout.groups.items()}
    return _task_groups[key]


def own_group():
    """A process group of this rank alone, made once by this rank only (Partial FC's centre shards
    are reduced with no other rank)."""
    import torch.distributed as dist

    if not _own_group:
        _own_group.append(dist.new_group([dist.get_rank()], use_local_synchronization=True))
    return _own_group[0]


def leave_distributed() -> None:
    """Leave the process group before the process exits: left to interpreter exit, gloo's threads
    can abort a rank ("terminate called without an active exception", seen under srun)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _task_groups.clear()
    _own_group.clear()

def slurm_ranks(env: Mapping[str, str]) -> dict[str, str]:
    """The launcher variables of a rank that `srun` started as one task of a job step.

    Rank, world and local rank come from the step's task layout; the master is the step's first
    node (or MASTER_ADDR), its port MASTER_PORT or one derived from the job id.
    """
    import subprocess

    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if ntasks <= 1:
        return {}
    per_node = _expand_tasks(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", str(ntasks))))
    node = int(env.get("SLURM_NODEID", "0"))
    master = env.get("MASTER_ADDR")
    if not master:
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost"))
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        master = (hosts.stdout.split() or ["localhost"])[0]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(ntasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(per_node[node] if node < len(per_node) else 1), "MASTER_ADDR": master,
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)}

def _expand_tasks(spec: str) -> list[int]:
    """Slurm's tasks per node, `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        n, _, times = part.partition("(x")
        counts += [int(n)] * (int(times.rstrip(")")) if times else 1)
    return counts
