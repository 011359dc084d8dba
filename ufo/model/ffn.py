"""The multi-path feed-forward layer: one FFN-shared and one FFN-task per task in every block.

A token runs through exactly one of them. Rows of a micro-batch come as contiguous per-task
slices; rows that use the same FFN in this block are computed by one call (one matmul pair).
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import Mlp
from torch import nn

# A route says, for rows [start, end) of the batch, which FFN they take: a task name for its
# FFN-task, or SHARED for FFN-shared.
SHARED = None
Route = tuple[str | None, int, int]


class MultiPathFFN(nn.Module):
    """`shared` (one timm `Mlp`) and `task[name]` (one `Mlp` per task), built with timm's arguments."""

    def __init__(self, in_features: int, hidden_features: int, tasks: Sequence[str], **mlp_kwargs):
        super().__init__()
        self.shared = Mlp(in_features, hidden_features, **mlp_kwargs)
        self.task = nn.ModuleDict({name: Mlp(in_features, hidden_features, **mlp_kwargs) for name in tasks})

    def ffn(self, key: str | None) -> nn.Module:
        return self.shared if key is SHARED else self.task[key]

    def forward(self, x: torch.Tensor, routes: Sequence[Route]) -> torch.Tensor:
        """x: (B, N, C); routes cover rows 0..B in order."""
        runs: list[list] = []  # consecutive routes with the same FFN merge into one row range
        for key, start, end in routes:
            if runs and runs[-1][0] == key and runs[-1][2] == start:
                runs[-1][2] = end
            else:
                runs.append([key, start, end])
        if len(runs) == 1:
            return self.ffn(runs[0][0])(x)

        pieces: list[torch.Tensor | None] = [None] * len(runs)
        by_ffn: dict[str | None, list[int]] = {}
        for i, (key, _, _) in enumerate(runs):
            by_ffn.setdefault(key, []).append(i)
        for key, idx in by_ffn.items():
            ffn = self.ffn(key)
            if len(idx) == 1:
                _, start, end = runs[idx[0]]
                pieces[idx[0]] = ffn(x[start:end])
                continue
            # slices that share this FFN but are not adjacent: one call over their rows
            y = ffn(torch.cat([x[runs[i][1]:runs[i][2]] for i in idx]))
            for i, part in zip(idx, y.split([runs[i][2] - runs[i][1] for i in idx])):
                pieces[i] = part
        return torch.cat(pieces)  # type: ignore[arg-type]
