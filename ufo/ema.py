"""An exponential moving average of the weights (`train.ema`), with timm's ModelEmaV3 semantics
(`timm/utils/model_ema.py`): after every `every`-th optimizer step, ema <- decay * ema + (1 - decay)
* weights (a lerp); the decay is 0 at the first update (the EMA starts as the weights), then
`decay`, or with `warmup` timm's 1 - (1 + step)^(-3/4), at most `decay`. Buffers (a BNNeck's
running statistics) are not averaged: the EMA model uses the live ones, as timm's copy does.

Each rank keeps the EMA of the fp32 masters it owns (`ufo/ds_masters.py`): partitioned exactly as
the optimizer's master weights are (ZeRO 1-3: a 1/N share; without ZeRO every rank holds all of
them, as it holds the masters; task_sharded: its task's and the shared ones), never a whole
replica on a rank that holds a partition. Evaluating
or saving the EMA copies it into the masters (and the working weights from them), then puts the
live masters back: the live weights after that are bit-identical to before. A checkpoint holds each
rank's EMA partitions (an exact resume on the same ranks) and `ema.safetensors`, the whole EMA by
parameter name, assembled parameter by parameter (under task_sharded each task's first rank writes
its task's part, `ema_rankNNNNN.safetensors`): what `ufo export --ema` reads and what a resume on
another number of ranks re-partitions.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from ufo.ds_masters import check_version, full_fp32, master_flats, refresh_weights, set_full_fp32

FILE = "ema.safetensors"


class Ema:
    def __init__(self, engine, decay: float, every: int = 1, warmup: bool = False):
        check_version()
        self.decay, self.every, self.warmup = decay, every, warmup
        self.flats = [flat.detach().float().clone() for flat in master_flats(engine)]
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """timm's ModelEmaV3.get_decay at the `updates`-th update (1-based)."""
        step = updates - 1
        if step <= 0:
            return 0.0
        if self.warmup:
            return max(min(1 - (1 + step) ** -0.75, self.decay), 0.0)
        return self.decay

    def update(self, engine, step: int) -> None:
        """After the optimizer step `step` (1-based): averaged in when `step` is a multiple of `every`."""
        if step % self.every:
            return
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        with torch.no_grad():
            for ema, master in zip(self.flats, master_flats(engine)):
                ema.lerp_(master.detach().float(), weight)

    @contextmanager
    def applied(self, engine, weights: bool = True) -> Iterator[None]:
        """The EMA in the masters (and, with `weights`, in the working weights) for the duration."""
        masters = master_flats(engine)
        live = [m.detach().clone() for m in masters]
        with torch.no_grad():
            for master, ema in zip(masters, self.flats):
                master.copy_(ema)
        if weights:
            refresh_weights(engine)
        try:
            yield
        finally:
            with torch.no_grad():
                for master, saved in zip(masters, live):
                    master.copy_(saved)
            if weights:
                refresh_weights(engine)

    def state_dict(self) -> dict:
        return {"flats": [f.clone() for f in self.flats], "updates": self.updates}

    def load_state_dict(self, state: dict) -> bool:
        """This rank's saved partitions; False (nothing loaded) when they do not fit its masters."""
        flats = state.get("flats") or []
        if [f.shape for f in flats] != [f.shape for f in self.flats]:
            return False
        self.flats = [f.float().clone() for f in flats]
        self.updates = int(state["updates"])
        return True

    def whole(self, engine, names: dict[int, str], keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """The whole EMA of every parameter this rank `keep`s, by name (every rank holding a part of a
        parameter takes part in assembling it, in turn; the others drop it at once)."""
        out = {}
        with self.applied(engine, weights=False):
            for param in engine.module.parameters():
                if param.requires_grad:
                    full = full_fp32(param)
                    if keep(names[id(param)]):
                        out[names[id(param)]] = full.detach().float().cpu().clone()
        return out

    def load_whole(self, engine, state: dict[str, torch.Tensor], names: dict[int, str], updates: int) -> None:
        """Partition a whole EMA (`ema.safetensors`) into this rank's share, as its masters are."""
        masters = master_flats(engine)
        live = [m.detach().clone() for m in masters]
        for param in engine.module.parameters():
            if param.requires_grad and names[id(param)] in state:
                set_full_fp32(param, state[names[id(param)]].to(param.device))
        self.flats = [m.detach().float().clone() for m in master_flats(engine)]
        with torch.no_grad():
            for master, saved in zip(masters, live):
                master.copy_(saved)
        self.updates = updates


def save_whole(state: dict[str, torch.Tensor], name: str, tag_dir: Path) -> None:
    """The average's file `name` in a checkpoint (nothing when this rank keeps none of it)."""
    from safetensors.torch import save_file

    from ufo.atomic import atomic_file

    if state:
        with atomic_file(tag_dir / name) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


def file_of(rank: int) -> str:
    """The file a rank writes: rank 0 the shared parameters and its tasks' (`ema.safetensors`); under
    task_sharded each other task's first rank that task's (`ema_rankNNNNN.safetensors`)."""
    return FILE if rank == 0 else f"ema_rank{rank:05d}.safetensors"


def read_whole(tag_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's whole average, from all of its files ({} when it has none)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(tag_dir.glob("ema*.safetensors")):
        out.update(load_file(str(file)))
    return out
