"""Training diagnostics (ufo/diagnostics.py): per-task gradient norms and cosines on the shared
parameters, loss ratios and the global gradient norm, from 3 real DeepSpeed ranks against one
process on the union of their batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_train import SharedRuns, reference_step, tiny_run

# (layout, placement, ZeRO stage) on 3 ranks; task_parallel 2 + 1: a task's gradient summed over its ranks
CASES = [("mixed", "replicated", 1), ("mixed", "replicated", 0), ("task_parallel", "task_sharded", 0),
         ("task_parallel", "task_sharded", 2), ("task_parallel", "replicated", 1)]
WORLD = 3


def diagnosed_run(tmp_path: Path, case: tuple) -> dict:
    layout, placement, stage = case
    tasks = ("face", "person", "digits") if layout == "mixed" else ("face", "digits")
    raw = tiny_run(tmp_path, tasks, steps=1, layout=layout, placement=placement, optimizer="sgd", momentum=0.0,
                   lr=0.5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, gradient_clipping=0.05,
                   diagnostics_every=1, weighting={"name": "static"})
    raw["deepspeed"] = {"zero_stage": stage}
    if layout == "task_parallel":
        raw["tasks"]["face"]["ranks"], raw["tasks"]["digits"]["ranks"] = 2, 1
    raw["tasks"]["digits"]["weight"] = 2.0
    return raw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return SharedRuns(tmp_path_factory.mktemp("diagnostics"), diagnosed_run, lambda case: CASES, world=WORLD)


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-zero{c[2]}")
def test_diagnostics_equal_one_process(runs, case):
    raw, _ = runs.get(case)
    record = json.loads((Path(raw["train"]["out_dir"]) / "history.jsonl").read_text().splitlines()[0])
    want: dict = {}
    reference_step(raw, WORLD, observe=want)
    tasks = list(raw["tasks"])
    grads = want["task_grads"]
    flat = [torch.cat([g.reshape(-1) for g in task.values() if g is not None]).double() for task in grads]
    for t, task in enumerate(tasks):
        assert math.isclose(record["shared_grad_norm"][task], float(flat[t].norm()), rel_tol=1e-4), task
        assert record["loss_ratio"][task] == 1.0  # the first step is every task's start
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks[i + 1:], i + 1):
            cos = float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()))
            assert abs(record["grad_cosine"][f"{a}-{b}"] - cos) < 1e-4, (a, b)
    # before clipping (0.05 bites: the norm is far above it)
    assert math.isclose(record["global_grad_norm"], want["grad_norm"], rel_tol=1e-4) and want["grad_norm"] > 0.1
