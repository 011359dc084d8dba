"""What the benchmarks share: ranks spawned on this machine and joined into one job, a counter of
the bytes they send in collectives, the plain timm ViT they are measured against, fresh run
directories, and how a result is printed (its table, or JSON).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.models.vision_transformer import VisionTransformer

from ufo.config import UfoConfig
from ufo.errors import ConfigError
from ufo.model import vit_args
from ufo.model.supernet import apply_heads, norm_layer


def show(result: dict[str, Any], format_result: Callable[[dict[str, Any]], str], as_json: bool) -> None:
    """Print a benchmark's result: its table, or the JSON it returned."""
    print(json.dumps(result, indent=2) if as_json else format_result(result))


class PlainWithHeads(torch.nn.Module):
    """A plain timm ViT (one FFN per block) ending in the supernet's task heads, with its forward."""

    def __init__(self, cfg: UfoConfig, heads: torch.nn.ModuleDict):
        super().__init__()
        self.vit = VisionTransformer(**vit_args(cfg.model), **norm_layer(cfg.model), num_classes=0)
        self.heads = copy.deepcopy(heads)

    def forward(self, images, slices, labels=None, reduction="mean", hits=False):
        features = self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)
        return apply_heads(self.heads, features, slices, labels, reduction, hits)


def join_rank(rank: int, world: int, port: int) -> None:
    """The launcher variables of one of the benchmark's spawned ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def fresh_runs(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """A run directory left from before would be resumed, not benchmarked: refuse it, or remove it."""
    for name in names:
        if (out / name).exists():
            if not overwrite:
                raise ConfigError(f"{out / name}: exists; pass --overwrite to replace it or choose another --out")
            shutil.rmtree(out / name)


class CollectiveCounter:
    """Counts what this rank sends in torch.distributed's collectives (a ring model per op), by
    wrapping them before the engine binds them; `on` selects the window that counts."""

    OPS = ("all_reduce", "reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather",
           "reduce_scatter", "_all_gather_base", "_reduce_scatter_base")

    def __init__(self):
        self.on, self.sent, self.calls = False, 0.0, 0
        for name in self.OPS:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn, inspect.signature(fn)))

    def _wrap(self, name, fn, signature):
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


def spawn_ranks(fn, args: tuple, world: int) -> list[dict]:
    """Run `fn(rank, world, port, *args, out)` on `world` spawned ranks of one job; each rank's
    `rank_done` result, in rank order."""
    with tempfile.TemporaryDirectory() as out:
        port = 29300 + os.getpid() % 300
        mp.start_processes(fn, args=(world, port, *args, out), nprocs=world, start_method="spawn")
        return [json.loads(open(f"{out}/rank{r}.json").read()) for r in range(world)]


def rank_done(out: str, rank: int, result: dict) -> None:
    """A spawned rank's result, for `spawn_ranks` to collect."""
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
