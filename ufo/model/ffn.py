"""The multi-path feed-forward layer: one FFN-shared and one FFN-task per task in every block.

A token runs through exactly one of them. Rows of a micro-batch come as contiguous per-task
slices; rows that use the same FFN (at the same width) in this block are computed by one call.
An elastic width keeps a prefix of the FFN's hidden units: the rest are masked to zero, which
is exactly the narrower FFN whose weights are the first rows of fc1 and columns of fc2. A gated
route (a learned path's open block) runs its rows through FFN-shared and its task's FFN-task and
mixes the two by the gate's weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import Mlp
from torch import nn

# A route says, for rows [start, end) of the batch, which FFN they take (a task name for its
# FFN-task, or SHARED for FFN-shared), how many of its hidden units (None: all), and a gate: None,
# or (for a task's open learned block) the weights (2,) of [FFN-shared, FFN-task] to mix both by.
SHARED = None
Route = tuple[str | None, int, int, int | None, "torch.Tensor | None"]


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
        runs: list[list] = []  # consecutive ungated routes with the same FFN and width merge into one row range
        for key, start, end, hidden, gate in routes:
            last = runs[-1] if runs else None
            if last and gate is None and last[4] is None and last[0] == key and last[3] == hidden and last[2] == start:
                last[2] = end
            else:
                runs.append([key, start, end, hidden, gate])
        if self.always_shared and self.shared is not None and \
                all(run[0] is not SHARED and run[4] is None for run in runs):
            runs.append([SHARED, x.shape[0], x.shape[0], None, None])
        if len(runs) == 1 and runs[0][4] is None:
            return run_mlp(self.ffn(runs[0][0]), x, runs[0][3])

        # every FFN (at a width) is called once, on the rows of every run that needs it: a gated
        # run needs FFN-shared and its task's FFN-task
        needs: dict[tuple, list[int]] = {}
        for i, (key, _, _, hidden, gate) in enumerate(runs):
            for k in ((SHARED, key) if gate is not None else (key,)):
                needs.setdefault((k, hidden), []).append(i)
        outputs: dict[tuple, torch.Tensor] = {}
        for (key, hidden), idx in needs.items():
            ffn = self.ffn(key)
            rows = [x[runs[i][1]:runs[i][2]] for i in idx]
            y = run_mlp(ffn, rows[0] if len(rows) == 1 else torch.cat(rows), hidden)
            for i, part in zip(idx, y.split([r.shape[0] for r in rows])):
                outputs[(i, key)] = part
        pieces = []
        for i, (key, _, _, _, gate) in enumerate(runs):
            if gate is None:
                pieces.append(outputs[(i, key)])
            else:  # forward: exactly the chosen FFN's output (the other's weight is 0)
                pieces.append(gate[0] * outputs[(i, SHARED)] + gate[1] * outputs[(i, key)])
        return torch.cat(pieces)
