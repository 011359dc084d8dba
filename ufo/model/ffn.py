"""The multi-path feed-forward layer: one FFN-shared and one FFN-task per task in every block.

A token runs through exactly one of them. Rows of a micro-batch come as contiguous per-task
slices; rows that use the same FFN (at the same width) in this block are computed by one call.
An elastic width keeps a prefix of the FFN's hidden units: the rest are masked to zero, which
is exactly the narrower FFN whose weights are the first rows of fc1 and columns of fc2. A gated
route (a learned path's open block) runs its rows through FFN-shared and its task's FFN-task and
mixes the two by the gate's weights.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from timm.layers import Mlp
from torch import nn

SHARED = None


class Route(NamedTuple):
    """Rows [start, end) of the batch in one block: which FFN they take, at what width, gated or not,
    and how many of the block's attention heads they see."""

    key: str | None  # a task name for its FFN-task, SHARED for FFN-shared
    start: int
    end: int
    hidden: int | None = None  # how many of the FFN's hidden units (None: all)
    gate: torch.Tensor | None = None  # a learned path's open block: the weights (2,) of [FFN-shared, FFN-task]
    heads: int | None = None  # how many of the attention's heads, the first ones (None: all)


def run_mlp(mlp: Mlp, x: torch.Tensor, hidden: int | None = None) -> torch.Tensor:
    """timm's Mlp on x, keeping only its first `hidden` hidden units (None: all).

    The modules themselves are called (not their weights), so a ZeRO-3 engine gathers them as usual.
    """
    if hidden is None or hidden >= mlp.fc1.out_features:
        return mlp(x)
    h = mlp.drop1(mlp.act(mlp.fc1(x)))
    keep = torch.arange(h.shape[-1], device=h.device) < hidden
    return mlp.drop2(mlp.fc2(mlp.norm(h * keep.to(h.dtype))))


class MultiPathFFN(nn.Module):
    """`shared` (one timm `Mlp`) and `task[name]` (one `Mlp` per task), built with timm's arguments.

    A block may lack some of them (`model.ffns: on_path`): `shared` is then None and `task` holds
    only the tasks that take their FFN-task here.
    """

    # Call FFN-shared in every forward, on zero rows when no row takes it, so that it always gets a
    # gradient (zero where unused): ranks that hold different tasks then reduce the same tensors.
    always_shared = False

    def __init__(self, in_features: int, hidden_features: int, tasks: Sequence[str], shared: bool = True,
                 **mlp_kwargs):
        super().__init__()
        self.hidden_features = hidden_features
        self.shared = Mlp(in_features, hidden_features, **mlp_kwargs) if shared else None
        self.task = nn.ModuleDict({name: Mlp(in_features, hidden_features, **mlp_kwargs) for name in tasks})

    def has(self, key: str | None) -> bool:
        return self.shared is not None if key is SHARED else key in self.task

    def ffn(self, key: str | None) -> nn.Module:
        return self.shared if key is SHARED else self.task[key]

    def forward(self, x: torch.Tensor, routes: Sequence[Route]) -> torch.Tensor:
        """x: (B, N, C); routes cover rows 0..B in order."""
        runs: list[Route] = []  # consecutive ungated routes with the same FFN and width merge into one row range
        for route in routes:
            last = runs[-1] if runs else None
            if last and route.gate is None and last.gate is None and (last.key, last.hidden, last.end) == \
                    (route.key, route.hidden, route.start):
                runs[-1] = last._replace(end=route.end)
            else:
                runs.append(route)
        if self.always_shared and self.shared is not None and \
                all(run.key is not SHARED and run.gate is None for run in runs):
            runs.append(Route(SHARED, x.shape[0], x.shape[0]))
        if len(runs) == 1 and runs[0].gate is None:
            return run_mlp(self.ffn(runs[0].key), x, runs[0].hidden)

        # every FFN (at a width) is called once, on the rows of every run that needs it: a gated
        # run needs FFN-shared and its task's FFN-task
        needs: dict[tuple, list[int]] = {}
        for i, run in enumerate(runs):
            for key in ((SHARED, run.key) if run.gate is not None else (run.key,)):
                needs.setdefault((key, run.hidden), []).append(i)
        outputs: dict[tuple, torch.Tensor] = {}
        for (key, hidden), idx in needs.items():
            ffn = self.ffn(key)
            rows = [x[runs[i].start:runs[i].end] for i in idx]
            y = run_mlp(ffn, rows[0] if len(rows) == 1 else torch.cat(rows), hidden)
            for i, part in zip(idx, y.split([r.shape[0] for r in rows])):
                outputs[(i, key)] = part
        pieces = []
        for i, run in enumerate(runs):
            if run.gate is None:
                pieces.append(outputs[(i, run.key)])
            else:  # forward: exactly the chosen FFN's output (the other's weight is 0)
                pieces.append(run.gate[0] * outputs[(i, SHARED)] + run.gate[1] * outputs[(i, run.key)])
        return torch.cat(pieces)
