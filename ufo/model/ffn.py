"""The multi-path feed-forward layer: one FFN-shared and one FFN-task per task in every block.

A token runs through exactly one of them. Rows of a micro-batch come as contiguous per-task
slices; rows that use the same FFN (at the same width) in this block are computed by one call.
An elastic width keeps a prefix of the FFN's hidden units: the rest are masked to zero, which
is exactly the narrower FFN whose weights are the first rows of fc1 and columns of fc2.
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import Mlp
from torch import nn

# A route says, for rows [start, end) of the batch, which FFN they take (a task name for its
# FFN-task, or SHARED for FFN-shared) and how many of its hidden units (None: all).
SHARED = None
Route = tuple[str | None, int, int, int | None]


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
        runs: list[list] = []  # consecutive routes with the same FFN and width merge into one row range
        for key, start, end, hidden in routes:
            if runs and runs[-1][0] == key and runs[-1][3] == hidden and runs[-1][2] == start:
                runs[-1][2] = end
            else:
                runs.append([key, start, end, hidden])
        if self.always_shared and self.shared is not None and all(run[0] is not SHARED for run in runs):
            runs.append([SHARED, x.shape[0], x.shape[0], None])
        if len(runs) == 1:
            return run_mlp(self.ffn(runs[0][0]), x, runs[0][3])

        pieces: list[torch.Tensor | None] = [None] * len(runs)
        by_ffn: dict[tuple, list[int]] = {}
        for i, (key, _, _, hidden) in enumerate(runs):
            by_ffn.setdefault((key, hidden), []).append(i)
        for (key, hidden), idx in by_ffn.items():
            ffn = self.ffn(key)
            if len(idx) == 1:
                _, start, end, _ = runs[idx[0]]
                pieces[idx[0]] = run_mlp(ffn, x[start:end], hidden)
                continue
            # slices that share this FFN but are not adjacent: one call over their rows
            y = run_mlp(ffn, torch.cat([x[runs[i][1]:runs[i][2]] for i in idx]), hidden)
            for i, part in zip(idx, y.split([runs[i][2] - runs[i][1] for i in idx])):
                pieces[i] = part
        return torch.cat(pieces)  # type: ignore[arg-type]
